"""A lab manager opens an instance in a real browser: the instance never sees the
manager's cookies, and its pages cannot use the manager's websocket as the visitor.

Real headless Chromium, the real manager (daphne serving manager.asgi on this test's
database and Redis), the real Caddy configured by instances.proxy. The instance's app is
a small recording HTTP server of this test behind Caddy (the runtime's lookup of the app
address is the only fake, as in test_proxy.py): it records every request's Host and
Cookie header, and every page it serves tries to open the manager's /ws/live/ socket and
reports what happened.

Two set-ups:
- `loopback`: the embedded default, manager on 127.0.0.1, instances on `localhost` (two
  sites, so SameSite=Lax alone would already keep the cookie off a cross-site socket);
- `one-domain`: manager.lab.test and inst.lab.test (Chromium maps both to 127.0.0.1): one
  *site*, so the browser sends the Lax session cookie with the instance page's websocket
  handshake, and only the origin check (scheme, host AND port) refuses it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from django.conf import global_settings

from instances import proxy
from instances.models import Instance
from tests.conftest import BOSS_PASSWORD, CHROMIUM, make_persona, need
from tests.e2e.test_e2e_notifications import CHROMIUM_ARGS, TIMEOUT_MS
from tests.http_helpers import StandIn
from tests.labserver_helpers import Daphne
from tests.instances.test_proxy import Caddy, FakeRuntime, free_ports
from tests.db_helpers import database_url
from tests.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SET_UPS = {
    "loopback": {"manager": "127.0.0.1", "instances": "localhost"},
    "one-domain": {"manager": "manager.lab.test", "instances": "inst.lab.test"},
}

# Served by the instance for every path: opens the manager's socket as the visitor and
# writes down each event (window.__ws; window.__wsDone once it closed).
PAGE = """<!DOCTYPE html><title>oTree instance</title><h1>instance page %(path)s</h1>
<script>
window.__ws = [];
const ws = new WebSocket(%(socket)r);
ws.onopen = () => window.__ws.push("open");
ws.onmessage = (e) => window.__ws.push("message " + e.data);
ws.onerror = () => window.__ws.push("error");
ws.onclose = (e) => { window.__ws.push("close " + e.code); window.__wsDone = true; };
</script>"""


class InstanceApp(StandIn):
    """Stands in for the experimenter's oTree app: records (path, Host, Cookie)."""

    def __init__(self):
        self.socket_url = ""
        super().__init__(lambda request: (PAGE % {"path": request.path.replace("<", ""),
                                                  "socket": self.socket_url}).encode())

    @property
    def seen(self) -> list[tuple[str, str | None, str | None]]:
        return [(r.path, r.headers.get("Host"), r.headers.get("Cookie")) for r in self.requests]


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, headless; *.lab.test resolves to 127.0.0.1 (the one-domain set-up)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            *CHROMIUM_ARGS, "--host-resolver-rules=MAP manager.lab.test 127.0.0.1, MAP inst.lab.test 127.0.0.1"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser():
    need(CHROMIUM.exists(), f"chromium ({CHROMIUM})")
    # Playwright's sync API keeps an event loop in this thread; Django refuses database
    # calls beside a running loop unless told that this loop is not its own.
    old = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "1"
    try:
        with chromium() as browser:
            yield browser
    finally:
        if old is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = old


@pytest.fixture(params=sorted(SET_UPS))
def lab(request, settings, monkeypatch, transactional_db, tmp_path_factory):
    hosts = SET_UPS[request.param]
    from tests.labserver_helpers import free_port

    manager_port = free_port()
    (instance_port,), _ = free_ports(1)
    app, neighbour = InstanceApp(), InstanceApp()
    app.socket_url = neighbour.socket_url = f"ws://{hosts['manager']}:{manager_port}/ws/live/"
    # The manager process checks the password with its own (default) hashers.
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    boss = make_persona("boss")  # (made after that line: its hash is one the manager process checks)
    Instance.objects.create(name="ann-study", owner=boss, public_port=instance_port, status="running",
                            runtime="process")

    # Caddy, as labserver runs it, with the same set-up's names.
    caddy_dir = tmp_path_factory.mktemp("cad", numbered=True)
    settings.LAB_CADDY_DIR = str(caddy_dir)
    settings.LAB_ROUTING = "port"
    settings.LAB_PUBLIC_HOST = hosts["manager"]
    settings.LAB_INSTANCE_HOST = hosts["instances"]
    settings.LAB_PROXY_BIND = "127.0.0.1"
    runtime = FakeRuntime()
    runtime.apps["ann-study"] = app.url
    monkeypatch.setattr("instances.runtime.get_runtime", lambda instance=None: runtime)
    caddy = Caddy(caddy_dir)

    env = {k: v for k, v in os.environ.items()
           if (not k.startswith("LAB_") or k == "LAB_LOGIN_RATE_LIMIT") and k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(LAB_DATA_DIR=os.environ["LAB_DATA_DIR"], LAB_HOST="127.0.0.1", LAB_PORT=str(manager_port),
               LAB_PUBLIC_HOST=hosts["manager"], LAB_INSTANCE_HOST=hosts["instances"], LAB_RUNTIME="process",
               DATABASE_URL=database_url(), PYTHONUNBUFFERED="1")
    manager = None
    try:
        caddy.start()
        assert proxy.sync_routes()["loaded"]
        manager = Daphne(manager_port, env, Path(os.environ["LAB_DATA_DIR"]) / f"daphne-{manager_port}.log")
        yield {"manager": f"http://{hosts['manager']}:{manager_port}", "instance": f"http://{hosts['instances']}:"
               f"{instance_port}/", "instance_port": instance_port, "app": app, "neighbour": neighbour, "daphne": manager,
               "hosts": hosts, "name": request.param}
    finally:
        if manager is not None:
            manager.stop()
        caddy.kill()
        for server in (app, neighbour):
            server.close()


def _log_in(page, base):
    page.goto(base + "/accounts/login/")
    page.fill("input[name=login]", "boss")
    page.fill("input[name=password]", BOSS_PASSWORD)
    page.click("main form button[type=submit]")
    page.wait_for_url(base + "/")


def _socket_events(page) -> list[str]:
    """What the page's socket to the manager went through: until it closed, or until it
    was told something (an accepted /ws/live/ says hello, naming the user, at once)."""
    page.wait_for_function("window.__wsDone === true || window.__ws.some(e => e.startsWith('message'))",
                           timeout=TIMEOUT_MS)
    return page.evaluate("window.__ws")


def _wait_logged(daphne, mark, origin):
    wait_until(lambda: f"refused: origin {origin} is not the manager's" in daphne.output()[mark:], 10,
               message=lambda: f"daphne logging the refusal of {origin} (its log ends: {daphne.output()[-3000:]})")


def test_an_opened_instance_never_sees_the_managers_cookies_nor_uses_its_socket(lab, browser):
    from playwright.sync_api import expect

    base, app, hosts = lab["manager"], lab["app"], lab["hosts"]
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        _log_in(page, base)
        # The manager's own page holds a live socket with the same session (the check can fail).
        page.wait_for_function("document.getElementById('live-status')?.textContent === 'live'", timeout=TIMEOUT_MS)

        cookies = {c["name"]: c for c in context.cookies()}
        assert {"sessionid", "csrftoken"} <= set(cookies), cookies
        for name in ("sessionid", "csrftoken"):
            # Host-only (no leading dot), HttpOnly, Lax: what the browser itself holds.
            assert cookies[name]["domain"] == hosts["manager"], cookies[name]
            assert cookies[name]["httpOnly"] is True and cookies[name]["sameSite"] == "Lax", cookies[name]
        secrets = [cookies["sessionid"]["value"], cookies["csrftoken"]["value"]]

        # "Open oTree admin" on the instance page: a new tab on the instances' host name.
        page.goto(base + "/instances/ann-study/")
        link = page.get_by_role("link", name="Open oTree admin")
        assert link.get_attribute("href") == lab["instance"] + "sessions"
        with context.expect_page() as opened:
            link.click()
        admin = opened.value
        admin.wait_for_load_state()
        assert admin.url == lab["instance"] + "sessions"
        expect(admin.locator("h1")).to_have_text("instance page /sessions")

        # The instance's page opens ws://<manager>/ws/live/ as its visitor: refused.
        mark = len(lab["daphne"].output())
        events = _socket_events(admin)
        assert "open" not in events and not any(e.startswith("message") for e in events), events

        # Someone opens the instance's port under the manager's host name (a link an
        # experimenter sent round): the browser sends the manager's cookies with it, so
        # Caddy answers it itself and sends the browser on to the instances' host name.
        other = context.new_page()
        other.goto(f"http://{hosts['manager']}:{lab['instance_port']}/demo/?x=1")
        assert other.url == lab["instance"] + "demo/?x=1"
        assert "open" not in _socket_events(other)

        # The proof of the refusal's reason: the manager logged it as a foreign origin (in
        # the one-domain set-up, the handshake did carry the session: only the origin check
        # stood in the way).
        _wait_logged(lab["daphne"], mark, lab["instance"].rstrip("/"))

        # A page on the manager's own host name but another port (where instances were
        # served before LAB_INSTANCE_HOST, or any other program of the lab server): the
        # browser sends it the manager's cookies, and with its socket the session: only
        # the port tells it apart from the manager's pages.
        neighbour = lab["neighbour"]
        page = context.new_page()
        page.goto(f"http://{hosts['manager']}:{neighbour.port}/other-program")
        assert any(secrets[0] in (cookie or "") for _, _, cookie in neighbour.seen)  # cookies ignore ports
        events = _socket_events(page)
        assert "open" not in events and not any(e.startswith("message") for e in events), events
        _wait_logged(lab["daphne"], mark, f"http://{hosts['manager']}:{neighbour.port}")
    finally:
        context.close()

    # Everything the instance ever received: requests for its own host name, no cookie of the manager's.
    assert [path for path, _, _ in app.seen if path != "/favicon.ico"] == ["/sessions", "/demo/?x=1"], app.seen
    for path, host, cookie in app.seen:
        assert host == f"{hosts['instances']}:{lab['instance_port']}", (path, host)
        assert not any(secret in (cookie or "") for secret in secrets), (path, cookie)
        assert "sessionid" not in (cookie or "") and "csrftoken" not in (cookie or ""), (path, cookie)
