"""The swarm's nodes, as the lab managers' dashboard shows them.

`swarm_nodes()` asks the swarm runtime (`nodes()`) at most once every CACHE_SECONDS per
manager (Django's cache, shared by every manager process), so the dashboard stays fast
however often it is opened; a swarm that does not answer gives one sentence instead of a
table, cached as well, so a stuck engine does not slow every page view down.
"""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache

from instances.models import Instance
from instances.runtime import backend_class

CACHE_SECONDS = 5
ENGINE_TIMEOUT = 5  # seconds one engine call of the dashboard may take


def _key() -> str:
    return f"dashboard:swarm-nodes:{settings.LAB_MANAGER_ID}"


def _gib(mb: int) -> str:
    return f"{mb / 1024:.1f}"


def _row(node: dict) -> dict:
    return {
        "id": node["id"], "short_id": node["id"][:12], "hostname": node["hostname"] or node["id"][:12],
        "address": node["address"], "state": node["state"], "ready": node["state"] == "ready",
        "message": node["message"], "availability": node["availability"], "role": node["role"],
        "instances": node["instances"], "local": node["local"],
        "memory": f"{_gib(node['reserved_mb'])} of {_gib(node['memory_mb'])} GiB",
        "full": node["memory_mb"] > 0 and node["reserved_mb"] >= node["memory_mb"],
        "free": _gib(max(0, node["memory_mb"] - node["reserved_mb"])),  # GiB not yet reserved
    }


def _ask() -> dict:
    """{"swarm": False} when this lab has no swarm: the swarm runtime is not available, not
    configured (LAB_RUNTIME) and runs no instance; else {"swarm": True, "nodes": [rows],
    "problem": one sentence or ""}."""
    backend = backend_class("swarm")
    if backend is None:
        return {"swarm": False}
    expected = settings.LAB_RUNTIME == "swarm" or Instance.objects.filter(runtime="swarm").exists()
    try:
        runtime = backend(timeout=ENGINE_TIMEOUT)
        if not runtime.available():
            if not expected:
                return {"swarm": False}
            return {"swarm": True, "nodes": [], "problem": (
                "The swarm does not answer: the Docker engine here is unreachable or no longer a swarm "
                "manager (docker node ls).")}
        nodes = runtime.nodes()
    except Exception as exc:  # noqa: BLE001 - the dashboard says so instead of failing
        return {"swarm": True, "nodes": [], "problem": f"The swarm did not list its nodes: {exc}"}
    return {"swarm": True, "nodes": [_row(n) for n in nodes], "problem": ""}


def swarm_nodes() -> dict | None:
    """None when this lab has no swarm; else {"nodes": [...], "problem": ""}, at most
    CACHE_SECONDS old."""
    found = cache.get(_key())
    if found is None:
        found = _ask()
        cache.set(_key(), found, CACHE_SECONDS)
    return found if found.get("swarm") else None


def forget() -> None:
    """Drop the cached answer (tests; after a node was added or removed)."""
    cache.delete(_key())
