"""Instance runtimes: `get_runtime()` returns the backend chosen by `settings.LAB_RUNTIME`."""

from __future__ import annotations

from django.conf import settings

from .base import Runtime, RuntimeError_


def get_runtime() -> Runtime:
    """The backend for this manager: `docker`, or `auto` = docker when an engine answers.

    A new object per call (cheap: the engine is contacted on first use), so no client
    connection is shared across the worker's forks.
    """
    kind = settings.LAB_RUNTIME
    if kind in ("docker", "auto"):
        from .docker import DockerRuntime

        runtime = DockerRuntime()
        if kind == "docker" or runtime.available():
            return runtime
        raise RuntimeError_(
            f"LAB_RUNTIME=auto: no Docker engine answers at {runtime.engine_url}, and the process "
            "runtime (the fallback) is not available yet; start Docker or set LAB_RUNTIME=docker"
        )
    raise RuntimeError_(f"LAB_RUNTIME={kind} is not available yet; use docker (or auto with a Docker engine)")


def backend_class(name: str):
    """The backend class named `name` (its `name` and `isolation` describe it), without
    contacting any engine; None for an unknown or empty name."""
    if name == "docker":
        from .docker import DockerRuntime

        return DockerRuntime
    return None


__all__ = ["Runtime", "RuntimeError_", "backend_class", "get_runtime"]
