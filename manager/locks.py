"""Cross-process locks in Redis (one per instance, so its work never runs twice at once)."""

from contextlib import contextmanager

import redis
from django.conf import settings

_client = None


def client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL)
    return _client


class Busy(Exception):
    pass


@contextmanager
def lock(name: str, timeout: int = 600, wait: float = 30):
    """Hold `name` for at most `timeout` seconds (a killed holder's lock expires);
    wait at most `wait` seconds for it, else raise Busy."""
    lk = client().lock(f"lab:lock:{name}", timeout=timeout, blocking_timeout=wait)
    if not lk.acquire():
        raise Busy(name)
    try:
        yield lk
    finally:
        try:
            lk.release()
        except redis.exceptions.LockError:
            pass  # expired meanwhile
