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

import importlib
import pkgutil

from django.conf import settings

from manager.env import ConfigError

from .base import Runtime, RuntimeError_


def backend_class(name: str):
    """The backend class named `name` (its `name` and `isolation` describe it), without
    contacting any engine; None for an unknown or empty name.

    A backend is one module of this package, named as the backend, that names its class in
    a module-level `BACKEND`; adding a backend is adding its file (README, "How to add a
    runtime backend"). Only that module is imported: a backend stays self-contained."""
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        return None
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise  # the backend exists but lacks something it imports: say so, do not hide it
        return None
    return getattr(module, "BACKEND", None)


def backend_names() -> tuple[str, ...]:
    """The names of every backend in this package (each module that has a `BACKEND`)."""
    return tuple(sorted(info.name for info in pkgutil.iter_modules(__path__) if backend_class(info.name)))


def check_setting() -> None:
    """LAB_RUNTIME names a backend that exists (or is `auto`): checked at start-up
    (InstancesConfig.ready), so a misspelt or missing backend stops every manager process
    with one sentence instead of failing the first instance."""
    kind = settings.LAB_RUNTIME
    if kind != "auto" and backend_class(kind) is None:
        raise ConfigError(f"LAB_RUNTIME must be auto or one of {', '.join(backend_names())} "
                          f"(a backend is a module of instances/runtime/), got {kind!r}")


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
    if backend_class(kind) is not None:
        return kind
    raise RuntimeError_(f"LAB_RUNTIME={kind}: no such runtime here; use auto or one of {', '.join(backend_names())}")


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
    for name in backend_names():
        runtime = backend_class(name)()
        if runtime.available():
            found.append(runtime)
    return found


__all__ = ["Refused", "Runtime", "RuntimeError_", "available_runtimes", "backend_class", "backend_names",
           "check_setting", "default_backend", "get_runtime", "process_refusal"]
