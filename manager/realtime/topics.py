"""What a socket may subscribe to, and who may.

A topic is "<kind>:<key>"; each kind registers a function (user, key) -> group name or
None (not allowed / unknown). The consumer asks here before joining any group, so
permission checks live beside the data they protect, not in the consumer.
"""

from collections.abc import Callable

from manager.realtime.services import user_group

_registry: dict[str, Callable] = {}


def register(kind: str, resolver: Callable) -> None:
    _registry[kind] = resolver


def resolve(user, topic: str) -> str | None:
    kind, _, key = str(topic).partition(":")
    resolver = _registry.get(kind)
    if resolver is None or not key:
        return None
    return resolver(user, key)


def _user_topic(user, key):
    return user_group(user.pk) if key == str(user.pk) else None


register("user", _user_topic)
