"""The instance's oTree app as the manager reads it: its REST API and REST exports, with
the instance's REST key (oTree 5.4+: `otree-rest-key`), at the app's own address on the
host (the runtime's `app_url`, not the public proxy).

The app runs the experimenter's code: whatever it answers is untrusted. Nothing here
follows a redirect, every read has a time limit and a size limit, and the errors carry
only a short, single-line excerpt of what it said.

Each request has two time limits: `timeout` for the connection and each read of the
socket, and a total (`total` seconds, or an absolute `deadline` on the monotonic clock
shared by several requests) after which the socket is shut down whatever the app is
doing (an app that answers one byte at a time, in its headers or its body, never holds
the manager longer). The body is read as it comes (no content decoding: the manager asks
for `identity`), at most CHUNK bytes per read.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

from instances.runtime import RuntimeError_, get_runtime

REST_KEY_HEADER = "otree-rest-key"
TIMEOUT = 20  # seconds per request (connect and each read)
TOTAL = 120  # seconds one request may take in all, unless the caller says otherwise
JSON_LIMIT = 8 * 2**20  # bytes of a JSON answer (the session list, one session)
CHUNK = 64 * 1024


class OTreeUnavailable(Exception):
    """The app could not be asked or answered something else than expected; the message
    says what, for a user. `kind`: "status" (it answered another HTTP status: `status`),
    "too_large" (the body exceeded the limit), "slow" (the total time limit passed),
    "connection" (no answer, a broken one), "asleep" (a sleeping instance: instances.sleep)
    or "" (not running, not JSON, ...)."""

    def __init__(self, message: str, *, kind: str = "", status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status


class _SinkFailed(Exception):
    """The caller's sink raised (e.g. a full disk): not the app's fault, re-raised as is."""

    def __init__(self, exc: BaseException):
        super().__init__(str(exc))
        self.exc = exc


def _excerpt(data: bytes) -> str:
    text = " ".join(data[:400].decode("utf-8", errors="replace").split())
    return text[:200]


def app_url(instance) -> str:
    """Where the instance's app answers on this machine (OTreeUnavailable when it does not
    run; kind "asleep" for a sleeping instance: a caller that needs the app wakes it first,
    instances.sleep.wake)."""
    if type(instance).objects.filter(pk=instance.pk, asleep=True).exists():
        raise OTreeUnavailable(f"{instance.name} is asleep: its app is stopped until something wakes it (a request "
                               "to its URL, or Wake now on its page)", kind="asleep")
    try:
        url = get_runtime(instance).state(instance.name).app_url
    except RuntimeError_ as exc:
        raise OTreeUnavailable(f"the runtime of {instance.name} does not answer: {exc}") from None
    if not url:
        raise OTreeUnavailable(f"the oTree app of {instance.name} is not running")
    return url.rstrip("/")


def _cut(sock, cut: threading.Event) -> None:
    """The total time is up: shut the socket down, so a read blocked on it returns (an
    answer read until then is incomplete, whatever it looks like: `cut` says so)."""
    cut.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def stream(instance, path: str, *, params: dict | None = None, sink, limit: int, base_url: str = "",
           timeout: float = TIMEOUT, total: float = TOTAL, deadline: float | None = None) -> int:
    """GET `path` of the app with the REST key, writing the body into `sink(bytes)`; returns
    its size. OTreeUnavailable when the app does not answer 200, the body exceeds `limit`
    bytes, or the request takes longer than `total` seconds (or goes past `deadline`, a
    time.monotonic() value). Redirects are answers like any other status: never followed."""
    base = base_url or app_url(instance)
    url = urlsplit(base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise OTreeUnavailable(f"the oTree app's address {base!r} is not an http(s) URL")
    started = time.monotonic()
    end = started + total if deadline is None else min(started + total, deadline)
    slow = f"the oTree app took longer than {max(0.0, end - started):.0f} s to answer {path}"
    target = f"{url.path.rstrip('/')}{path}" + (f"?{urlencode(params)}" if params else "")
    remaining = end - time.monotonic()
    if remaining <= 0:
        raise OTreeUnavailable(f"no time was left to ask the oTree app for {path}", kind="slow")
    connection_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(url.hostname, url.port, timeout=min(timeout, remaining))
    watchdog, cut = None, threading.Event()
    try:
        conn.connect()
        watchdog = threading.Timer(max(0.0, end - time.monotonic()), _cut, args=(conn.sock, cut))
        watchdog.daemon = True
        watchdog.start()
        conn.request("GET", target, headers={REST_KEY_HEADER: instance.rest_key, "Accept-Encoding": "identity"})
        resp = conn.getresponse()
        if resp.status != 200:
            said = _excerpt(resp.read1(400) if resp.status != 204 else b"")
            raise OTreeUnavailable(f"the oTree app answered {path} with HTTP {resp.status}"
                                   + (f": {said}" if said else ""), kind="status", status=resp.status)
        size = 0
        while True:
            chunk = resp.read1(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise OTreeUnavailable(f"the oTree app's answer to {path} is larger than {_mib(limit)}",
                                       kind="too_large")
            if time.monotonic() >= end:
                raise OTreeUnavailable(slow, kind="slow")
            try:
                sink(chunk)
            except BaseException as exc:  # noqa: BLE001 - re-raised as is below
                raise _SinkFailed(exc) from None
        if cut.is_set():
            raise OTreeUnavailable(slow, kind="slow")
        if resp.length:  # a Content-Length the body did not reach
            raise OTreeUnavailable(f"the oTree app's answer to {path} was cut short", kind="connection")
        return size
    except _SinkFailed as failed:
        raise failed.exc from None
    except (OSError, http.client.HTTPException) as exc:
        if cut.is_set() or time.monotonic() >= end:
            raise OTreeUnavailable(slow, kind="slow") from None
        raise OTreeUnavailable(f"the oTree app did not answer {path} ({type(exc).__name__})",
                               kind="connection") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()


def _mib(limit: int) -> str:
    return f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit} bytes"


def get_bytes(instance, path: str, *, params: dict | None = None, limit: int = JSON_LIMIT, base_url: str = "",
              timeout: float = TIMEOUT, total: float = TOTAL, deadline: float | None = None) -> bytes:
    buf = bytearray()
    stream(instance, path, params=params, sink=buf.extend, limit=limit, base_url=base_url, timeout=timeout,
           total=total, deadline=deadline)
    return bytes(buf)


def get_json(instance, path: str, *, params: dict | None = None, limit: int = JSON_LIMIT, base_url: str = "",
             timeout: float = TIMEOUT, total: float = TOTAL, deadline: float | None = None) -> Any:
    data = get_bytes(instance, path, params=params, limit=limit, base_url=base_url, timeout=timeout, total=total,
                     deadline=deadline)
    try:
        return json.loads(data)
    except ValueError:
        raise OTreeUnavailable(f"the oTree app answered {path} with something else than JSON: "
                               f"{_excerpt(data)}") from None
