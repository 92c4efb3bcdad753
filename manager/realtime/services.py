"""Pushing to browsers: the only place that talks to the channel layer from sync code."""

import json
import logging
import time
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


def user_group(user_id) -> str:
    return f"user.{user_id}"


def send_to_group(group: str, event: dict) -> None:
    """Deliver `event` (a JSON-safe dict with a "type" key the browser understands) to
    every socket in `group`. A realtime hiccup never fails the caller's work."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group, {"type": "push", "event": event})
    except Exception:  # pragma: no cover - logged, not raised: the state is in the DB
        log.exception("could not push %s to %s", event.get("type"), group)


# A notification stays replayable this long, for tabs that were between two pages (e.g. the
# redirect after the form that started the task) when it was sent.
REPLAY_SECONDS = 15
REPLAY_KEEP = 20


def _replay_key(user_id) -> str:
    return f"lab:recent:{user_group(user_id)}"


def notify_user(user_id, message: str, level: str = "info", link: str = "", **extra) -> None:
    """Show a toast in every open tab of this user (tabs tell repeats apart by `id`)."""
    if user_id is None:
        return
    event = {"type": "notify", "id": uuid.uuid4().hex, "ts": time.time(), "level": level, "message": message,
             "link": link, **extra}
    try:
        from manager.locks import client

        key = _replay_key(user_id)
        client().pipeline().lpush(key, json.dumps(event)).ltrim(key, 0, REPLAY_KEEP - 1).expire(
            key, REPLAY_SECONDS).execute()
    except Exception:  # pragma: no cover - the live push below still goes out
        log.exception("could not keep notification for replay")
    send_to_group(user_group(user_id), event)


def recent_notifications(user_id) -> list[dict]:
    """This user's notifications of the last REPLAY_SECONDS, oldest first."""
    from manager.locks import client

    cutoff = time.time() - REPLAY_SECONDS
    events = [json.loads(raw) for raw in client().lrange(_replay_key(user_id), 0, REPLAY_KEEP - 1)]
    return [e for e in reversed(events) if e.get("ts", 0) >= cutoff]
