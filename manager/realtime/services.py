"""Pushing to browsers: the only place that talks to the channel layer from sync code."""

import logging

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


def notify_user(user_id, message: str, level: str = "info", link: str = "", **extra) -> None:
    """Show a toast in every open tab of this user."""
    if user_id is None:
        return
    send_to_group(
        user_group(user_id),
        {"type": "notify", "level": level, "message": message, "link": link, **extra},
    )
