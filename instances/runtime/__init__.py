"""Instance runtimes: `get_runtime(instance)` returns the backend that runs an instance.

Each instance records its backend (`Instance.runtime`) when it is created, so a Docker
engine that is briefly unreachable never moves an instance to another backend; a new
instance gets the configured default (`LAB_RUNTIME`; `auto` = docker when an engine
answers, else process). The process runtime isolates instances only as root
(LAB_PROCESS_ISOLATION=users) or not at all when the lab says so (=none): where neither
holds, a new process instance is refused (`Refused`, with what to do), never silently
given a runtime without isolation.
"""

from __future__ import annotations

from django.conf import settings

from .base import Runtime, RuntimeError_

BACKENDS = ("docker", "process")


def backend_class(name: str):
    """The backend class named `name` (its `name` and `isolation` describe it), without
    contacting any engine; None for an unknown or empty name."""
    if name == "docker":
        from .docker import DockerRuntime

        return DockerRuntime
    if name == "process":
        from .process import ProcessRuntime

        return ProcessRuntime
    return None


class Refused(RuntimeError_):
    """No new instance can be made on this machine as it is set up; the message says what
    to do (shown on the form, API 422)."""


def process_refusal(*, docker_missing: bool = False) -> str | None:
    """Why the process runtime refuses new instances here (from the settings), or None."""
    from .process import process_refusal as decide

    return decide(is_root=settings.LAB_IS_ROOT, isolation=settings.LAB_PROCESS_ISOLATION,
                  docker_missing=docker_missing)


def default_backend() -> str:
    """The backend a new instance gets; Refused when it would be the process runtime and
    that cannot isolate instances here (`process_refusal`)."""
    kind = settings.LAB_RUNTIME
    if kind == "auto":
        from .docker import DockerRuntime

        if DockerRuntime().available():
            return "docker"
        kind, docker_missing = "process", True
    else:
        docker_missing = False
    if kind == "process":
        refusal = process_refusal(docker_missing=docker_missing)
        if refusal:
            raise Refused(refusal)
        return kind
    if kind in BACKENDS:
        return kind
    raise RuntimeError_(f"LAB_RUNTIME={kind} is not available yet; use docker, process or auto")


def get_runtime(instance=None) -> Runtime:
    """The backend of `instance` (an Instance; its recorded backend), or the default one.

    A new object per call (cheap: an engine is contacted on first use), so no client
    connection is shared across the worker's forks.
    """
    name = getattr(instance, "runtime", "") or default_backend()
    cls = backend_class(name)
    if cls is None:
        raise RuntimeError_(f"unknown runtime {name!r}")
    return cls()


def available_runtimes() -> list[Runtime]:
    """Every backend usable on this machine (the orphan sweep asks each)."""
    found = []
    for name in BACKENDS:
        runtime = backend_class(name)()
        if runtime.available():
            found.append(runtime)
    return found


__all__ = ["BACKENDS", "Refused", "Runtime", "RuntimeError_", "available_runtimes", "backend_class",
           "default_backend", "get_runtime", "process_refusal"]
