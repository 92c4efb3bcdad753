"""Cross-process locks in Redis (one per instance, so its work never runs twice at once).

A lock lives `ttl` seconds and a watchdog thread renews it while its holder works, so a
long backup keeps it, while a killed worker's lock expires within `ttl` and the next pass
can proceed.
"""

import threading
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


def held(name: str) -> bool:
    """Whether anyone holds `name` now (a killed holder's lock counts until it expires)."""
    return bool(client().exists(f"lab:lock:{name}"))


@contextmanager
def lock(name: str, wait: float = 60):
    """Hold `name`; wait at most `wait` seconds for it, else raise Busy."""
    ttl = settings.LAB_LOCK_TTL
    lk = client().lock(f"lab:lock:{name}", timeout=ttl, blocking_timeout=wait, thread_local=False)
    if not lk.acquire():
        raise Busy(name)
    stop = threading.Event()

    def renew():
        while not stop.wait(ttl / 3):
            try:
                lk.reacquire()
            except redis.exceptions.RedisError:
                return

    watchdog = threading.Thread(target=renew, name=f"lock-{name}", daemon=True)
    watchdog.start()
    try:
        yield lk
    finally:
        stop.set()
        watchdog.join(timeout=5)
        try:
            lk.release()
        except redis.exceptions.LockError:
            pass  # expired meanwhile
