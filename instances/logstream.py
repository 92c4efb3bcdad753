"""Live-following an instance's container logs over the realtime socket.

`follow()` yields the latest lines of a component whenever they change, checking every
`interval` seconds, for at most `max_seconds` (the page re-asks after that). The caller
(the websocket consumer) only forwards what it yields.
"""

import asyncio

from channels.db import database_sync_to_async

from instances import runtime as runtimes
from instances.runtime.base import RuntimeError_
from instances.selectors import visible_instances

COMPONENTS = {"app", "db", "redis"}


@database_sync_to_async
def _visible(user, name):
    return visible_instances(user).filter(name=name).first()


def _read(instance, component, tail):
    try:
        return runtimes.get_runtime(instance).logs(instance.name, component, tail=tail)
    except RuntimeError_ as exc:
        return f"(logs unavailable: {exc})"


async def follow(user, name, component="app", *, interval=1.0, max_seconds=900, tail=200):
    """Async generator of log snapshots; raises PermissionError when `user` may not see it."""
    if component not in COMPONENTS:
        raise PermissionError(f"unknown component {component!r}")
    instance = await _visible(user, name)
    if instance is None:
        raise PermissionError(f"no instance named {name!r} that you may see")
    last = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    while loop.time() < deadline:
        text = await asyncio.to_thread(_read, instance, component, tail)
        if text != last:
            last = text
            yield text
        await asyncio.sleep(interval)


@database_sync_to_async
def _release_snapshot(user, name, number):
    instance = visible_instances(user).filter(name=name).first()
    if instance is None:
        return None
    release = instance.releases.filter(number=number).first()
    if release is None:
        return None
    return {"log": release.log, "status": release.status, "status_label": release.get_status_display(),
            "reason": release.status_reason}


async def follow_release(user, name, number, *, interval=0.5, max_seconds=1800):
    """Async generator: a release's log and status whenever they change, until it ends."""
    last = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    while loop.time() < deadline:
        snap = await _release_snapshot(user, name, number)
        if snap is None:
            raise PermissionError(f"no release #{number} of an instance named {name!r} that you may see")
        snap["done"] = snap["status"] not in {"queued", "building", "starting"}
        if snap != last:
            last = snap
            yield snap
        if snap["done"]:
            return
        await asyncio.sleep(interval)
