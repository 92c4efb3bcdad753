"""The proxy's wake endpoint: a request to a sleeping instance's URL wakes it.

While an instance sleeps, Caddy asks this endpoint before each request to its URL (see
instances.proxy: the marker file, the wake subrequest). It is raw ASGI, dispatched by
manager.asgi before Django (no session, no CSRF, no host check: Caddy calls it on daphne's
loopback address with the instance's Host), at proxy.WAKE_PATH.

- Only Caddy may call it: the wake key header (an HMAC of SECRET_KEY) is checked in constant
  time; anything else gets 404, as does an unknown instance.
- An instance that is awake: 200 at once (Caddy forwards the request to the app).
- An asleep instance: instances.sleep.wake(name, "a request to its URL") runs in a worker
  thread of a small pool of its own (never asgiref's one thread-sensitive executor, which
  every sync Django view shares); every request for that instance meanwhile waits for the
  same wake (one wake, however many requests arrive). Once its status is running: 200.
- Not awake within LAB_WAKE_HOLD_SECONDS: a browser loading a page (GET, Accept text/html,
  no websocket) gets a small "starting" page (503, Retry-After) that reloads itself every
  2 s; any other request a 503 with Retry-After. A wake that failed: 503 with a short public
  sentence (never the status reason, which may name internals).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings

from instances import proxy

log = logging.getLogger(__name__)

WAKE_WORKERS = 4  # wakes at once (each waits for an app to start); more wait in line
LOOKUP_WORKERS = 4  # the database reads of held requests
POLL_SECONDS = 0.25  # a held request looks again this often while another process wakes it
RETRY_AFTER = "2"

_wakers = ThreadPoolExecutor(max_workers=WAKE_WORKERS, thread_name_prefix="wake")
_lookups = ThreadPoolExecutor(max_workers=LOOKUP_WORKERS, thread_name_prefix="wake-lookup")
_wakes: dict[str, Future] = {}
_wakes_lock = threading.Lock()

STARTING_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Starting…</title>
<style>body{font-family:system-ui,sans-serif;margin:0;display:flex;min-height:100vh;align-items:center;
justify-content:center;color:#333;background:#f7f7f7}main{text-align:center;padding:2rem}
.dot{display:inline-block;width:.6rem;height:.6rem;margin:0 .2rem;border-radius:50%;background:#888;
animation:b 1s infinite alternate}.dot:nth-child(2){animation-delay:.3s}.dot:nth-child(3){animation-delay:.6s}
@keyframes b{to{opacity:.2}}</style></head>
<body><main><h1>This oTree instance is starting…</h1>
<p>It was asleep because nobody used it for a while. This page reloads itself in a moment.</p>
<p><span class="dot"></span><span class="dot"></span><span class="dot"></span></p></main></body></html>
"""
STARTING_TEXT = "This oTree instance is starting; try again in a moment.\n"
FAILED_TEXT = "This oTree instance could not be started. Its owner can see why on its page in the lab manager.\n"
NOT_FOUND_TEXT = "Not found.\n"


# --- the blocking parts (worker threads) -----------------------------------------------------------

def _look(name: str) -> tuple[bool, str] | None:
    """(asleep, status) of instance `name`, or None."""
    from django.db import connections

    from instances.models import Instance

    try:
        row = Instance.objects.filter(name=name, delete_requested=False).values_list("asleep", "status").first()
        return None if row is None else (row[0], row[1])
    finally:
        connections.close_all()


def _wake(name: str) -> str | None:
    """The wake itself: the status it left ("" when the instance is gone), None when it
    raised."""
    from django.db import connections

    from instances import sleep

    try:
        instance = sleep.wake(name, "a request to its URL")
        return "" if instance is None else instance.status
    except Exception:  # noqa: BLE001 - the reconciler wrote the reason; held requests get "could not be started"
        log.exception("waking %s for a request failed", name)
        return None
    finally:
        connections.close_all()


def _resync(name: str) -> None:
    """An instance that is awake but whose marker file is still there (another process woke
    it and has not synced yet, or a sync was lost): the marker goes, the upstream is current."""
    from django.db import connections

    try:
        proxy.sync_routes(name)
    finally:
        connections.close_all()


def shared_wake(name: str) -> Future:
    """The wake of `name` in progress in this process, or a new one: one per instance."""
    with _wakes_lock:
        future = _wakes.get(name)
        if future is None:
            future = _wakers.submit(_wake, name)
            _wakes[name] = future

            def forget(done: Future, name=name) -> None:
                with _wakes_lock:
                    if _wakes.get(name) is done:
                        del _wakes[name]

            future.add_done_callback(forget)
        return future


# --- ASGI --------------------------------------------------------------------------------------------

async def _in(pool: ThreadPoolExecutor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def _respond(send, status: int, body: str, content_type: str = "text/plain; charset=utf-8",
                   retry: bool = False) -> None:
    data = body.encode()
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode()),
               (b"cache-control", b"no-store")]
    if retry:
        headers.append((b"retry-after", RETRY_AFTER.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _is_page_load(headers: dict[str, str]) -> bool:
    method = headers.get(proxy.WAKE_METHOD_HEADER.lower(), "GET").upper()
    upgrade = headers.get(proxy.WAKE_UPGRADE_HEADER.lower(), "")
    return method == "GET" and not upgrade and "text/html" in headers.get("accept", "")


async def hold(name: str) -> str:
    """Wake `name` if it sleeps and wait until its app answers, at most LAB_WAKE_HOLD_SECONDS:
    "awake", "starting" (not yet), "failed" or "unknown" (no such instance)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.LAB_WAKE_HOLD_SECONDS
    while True:
        found = await _in(_lookups, _look, name)
        if found is None:
            return "unknown"
        asleep, status = found
        if not asleep and status == "running":
            if proxy.asleep_file(name).exists():
                await _in(_lookups, _resync, name)
            return "awake"
        if not asleep and status not in ("sleeping", "running"):
            return "failed"  # woken, but it did not come up (or it was stopped meanwhile)
        left = deadline - loop.time()
        if left <= 0:
            return "starting"
        if asleep:
            try:
                outcome = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(shared_wake(name))), left)
            except asyncio.TimeoutError:
                return "starting"
            if outcome is None:
                return "failed"
            continue  # look again (another process may be waking it: then wait for that one)
        # not asleep, still sleeping: another process wakes it
        await asyncio.sleep(min(POLL_SECONDS, max(left, 0)))


async def application(scope, receive, send) -> None:
    """ASGI (http only): Caddy's wake subrequest."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    key = headers.get(proxy.WAKE_KEY_HEADER.lower(), "")
    if not hmac.compare_digest(key.encode(), proxy.wake_key().encode()):
        return await _respond(send, 404, NOT_FOUND_TEXT)
    name = headers.get(proxy.WAKE_INSTANCE_HEADER.lower(), "")
    outcome = await hold(name) if name else "unknown"
    if outcome == "awake":
        return await _respond(send, 200, "awake\n")
    if outcome == "unknown":
        return await _respond(send, 404, "No oTree instance at this address.\n")
    if outcome == "failed":
        return await _respond(send, 503, FAILED_TEXT, retry=True)
    if _is_page_load(headers):
        return await _respond(send, 503, STARTING_PAGE, "text/html; charset=utf-8", retry=True)
    return await _respond(send, 503, STARTING_TEXT, retry=True)
