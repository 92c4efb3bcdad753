"""Test hosts for what an instance must (not) reach, made by the tests themselves.

- `outside_host(address)`: a host "outside this machine" — a network namespace joined to
  the host by a veth pair, with `address` (e.g. 198.51.100.7, or the metadata address
  169.254.169.254) on it and a host route to it. Traffic from the host (the process
  runtime's users) and from containers (forwarded and masqueraded by Docker) goes there as
  it would to another machine; a recording HTTP server inside answers and logs every
  request, so a test sees whether anything arrived.
- `host_listener(bind)`: a recording TCP/HTTP server on THIS machine (e.g. on 0.0.0.0:<port>,
  what a lab's other services do, or on "::" / "::1"), to prove instances cannot reach the
  host itself.

Every object is removed when its context ends (namespace, veth, route, server). Bounded
waits only. Needs root and iproute2 (`ip netns`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.http_helpers import StandIn
from tests.waits import wait_until

# The recording server: standard library only, run inside the namespace with `ip netns exec`.
RECORDER = r'''
import http.server, json, os, sys, time
log_path, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def _record(self):
        with open(log_path, "a") as fh:
            fh.write(json.dumps({"method": self.command, "path": self.path, "peer": self.client_address[0],
                                 "time": time.time()}) + "\n")
    def do_GET(self):
        self._record()
        if os.path.isfile(os.path.join(root, self.path.lstrip("/").split("?")[0])):
            return super().do_GET()
        body = b"reached the test host\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._record()
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
'''


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def netns_available() -> bool:
    """Whether this process may make network namespaces (root with iproute2)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


@dataclass
class TestHost:
    """A recording HTTP server on `address:port` (see the module's text)."""

    address: str
    port: int
    log: Path
    files: Path  # served as they are (e.g. an sdist a build installs)
    netns: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def hits(self) -> list[dict]:
        try:
            return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []


_counter = 0
_counter_lock = threading.Lock()


def _link_net() -> tuple[str, str]:
    """Two addresses of a /30 for one veth pair (198.18.0.0/15, the benchmarking range),
    distinct per pair within this process and unlikely to meet another test run's."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = (os.getpid() * 7 + _counter) % 16000
    base = (198 << 24) | (18 << 16) | (n * 4)
    to_text = lambda v: ".".join(str((v >> s) & 255) for s in (24, 16, 8, 0))  # noqa: E731
    return to_text(base + 1), to_text(base + 2)


@contextlib.contextmanager
def outside_host(address: str, port: int = 80):
    """A host outside this machine at `address` (see the module's text)."""
    tag = uuid.uuid4().hex[:8]
    ns, host_if, ns_if = f"otl-{tag}", f"otlh{tag}", f"otln{tag}"
    host_ip, ns_ip = _link_net()
    work = Path(tempfile.mkdtemp(prefix="otl-netns-"))
    (work / "files").mkdir()
    os.chmod(work, 0o755)
    (work / "recorder.py").write_text(RECORDER)
    log = work / "hits.jsonl"
    server = None
    route_added = False
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("link", "set", "lo", "up", netns=ns)
        _ip("addr", "add", f"{ns_ip}/30", "dev", ns_if, netns=ns)
        _ip("addr", "add", f"{address}/32", "dev", "lo", netns=ns)
        _ip("link", "set", ns_if, "up", netns=ns)
        _ip("route", "add", "default", "via", host_ip, netns=ns)
        _ip("route", "replace", f"{address}/32", "via", ns_ip, "dev", host_if)
        route_added = True
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-I", str(work / "recorder.py"),
                                   str(log), str(port), str(work / "files")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def probe():
            if server.poll() is not None:
                raise RuntimeError(f"the test host's server exited: {server.stderr.read().decode()[-500:]}")
            with socket.create_connection((address, port), timeout=1):
                pass

        wait_until(lambda: probe() or True, 10, 0.05, f"the test host's server on {address}:{port}",
                   ignore=(OSError,))
        log.unlink(missing_ok=True)  # the readiness probe is not a hit
        yield TestHost(address=address, port=port, log=log, files=work / "files", netns=ns,
                       extra={"link": (host_ip, ns_ip), "interface": host_if})
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        if route_added:
            _ip("route", "del", f"{address}/32", check=False)
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def host_listener(bind: str = "0.0.0.0", port: int = 0):
    """A service of the lab machine itself listening on `bind` (all interfaces by
    default): a StandIn whose `connections` lists every TCP connection it accepted (a
    probe may connect without speaking HTTP) and `requests` every request it answered."""
    with StandIn(lambda request: b"reached the lab machine itself\n", bind=bind, port=port) as listener:
        yield listener


TRANSIENT = ("veth", "otlh", "br-")  # containers', test hosts' and Docker networks' (they come and go)


def host_addresses(version: int = 4, *, lasting: bool = False) -> list[str]:
    """Every usable address of this machine of one IP version (loopback, eth0, Docker
    bridges …; IPv6 link-local ones with their interface, e.g. fe80::1%eth0). `lasting`:
    only those of interfaces that stay while a test runs (not other runs' containers,
    test hosts and networks)."""
    out = subprocess.run(["ip", f"-{version}", "-o", "addr", "show"], capture_output=True, text=True,
                         timeout=10).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != ("inet" if version == 4 else "inet6"):
            continue
        if "tentative" in fields or "dadfailed" in fields:  # not usable (yet): a veth just made
            continue
        if lasting and fields[1].split("@")[0].startswith(TRANSIENT):
            continue
        addr = fields[3].split("/")[0]
        found.append(f"{addr}%{fields[1]}" if addr.startswith("fe80:") else addr)
    return found
