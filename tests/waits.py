"""The one bounded wait of the test suite: poll until something is true, never longer
than a deadline, and say what was awaited (and the last value or error) when it is not."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1,
               message: str | Callable[[], str] = "", ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and
    return that. After `timeout` seconds fail (AssertionError) with `message` and the last
    value. Exceptions of the `ignore` types count as "not yet" (e.g. a port not open yet);
    any other exception, an AssertionError too, ends the wait at once (e.g. the awaited
    process has exited). `message` may be a function, called only on failure (e.g. for
    the end of a log)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"{what or 'condition'} not within {timeout} s (last: {last!r})")
        time.sleep(interval)
