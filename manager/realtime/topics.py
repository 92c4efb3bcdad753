"""What a socket may subscribe to, and who may.

A topic is "<kind>:<key>"; each kind registers a function (user, key) -> group name or
None (not allowed / unknown). The consumer asks here before joining any group, so
permission checks live beside the data they protect, not in the consumer.

A kind may also register a snapshot (user, key) -> the event that describes the topic's
current state: the consumer sends it right after joining, so a page misses nothing that
happened between its rendering and its subscription.

An app may also register a follower: a message `{"<command>": ...}` that makes the socket
stream something (an instance's logs, a release's build) until it ends or is replaced.
`start(user, content)` returns (key, async generator, item -> event); the generator raises
PermissionError when the user may not see it, `start` raises ValueError for a malformed
request (both reach the page as an error message).
"""

from collections.abc import Callable

from manager.realtime.services import user_group

_registry: dict[str, Callable] = {}
_snapshots: dict[str, Callable] = {}
_followers: dict[str, Callable] = {}  # in registration order: the first command in a message wins


def register(kind: str, resolver: Callable, snapshot: Callable | None = None) -> None:
    _registry[kind] = resolver
    if snapshot is not None:
        _snapshots[kind] = snapshot


def register_follower(command: str, start: Callable) -> None:
    _followers[command] = start


def follower(content: dict) -> Callable | None:
    """The `start` of the first registered follower command in `content`, if any."""
    for command, start in _followers.items():
        if command in content:
            return start
    return None


def snapshot(user, topic: str) -> dict | None:
    """The current state of a topic `user` may subscribe to (None: none to send)."""
    kind, _, key = str(topic).partition(":")
    make = _snapshots.get(kind)
    if make is None or resolve(user, topic) is None:
        return None
    return make(user, key)


def resolve(user, topic: str) -> str | None:
    kind, _, key = str(topic).partition(":")
    resolver = _registry.get(kind)
    if resolver is None or not key:
        return None
    return resolver(user, key)


def _user_topic(user, key):
    return user_group(user.pk) if key == str(user.pk) else None


register("user", _user_topic)
