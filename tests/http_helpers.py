"""A small real HTTP server on loopback for the tests: a stand-in for an instance's app, a
service of the lab machine, the manager's answer … It calls `answer(request)` for every
GET and POST, in a thread of its own, and sends what that returns.

    with StandIn(lambda request: b"<p>hello</p>") as app:
        urlopen(app.url)            # app.requests: every Request it answered

`answer` returns bytes (sent as 200 text/html) or (status, headers, body). `StandIn` also
records every TCP connection it accepts (`connections`: a probe may connect without
speaking HTTP) and can listen on any address (IPv6 too).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: object = None  # the request's headers (http.client.HTTPMessage: get() ignores case)
    peer: str = ""
    time: float = 0.0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        request = Request(self.command, self.path, self.headers, self.client_address[0], time.time())
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.stand_in.requests.append(request)
        answer = self.server.stand_in.answer(request)
        status, headers, body = (200, {"Content-Type": "text/html; charset=utf-8"}, answer) \
            if isinstance(answer, bytes) else answer
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


class StandIn:
    """See the module's text."""

    def __init__(self, answer, *, bind: str = "127.0.0.1", port: int = 0):
        self.answer = answer
        self.requests: list[Request] = []
        self.connections: list[dict] = []
        stand_in = self

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET

            def verify_request(self, request, client_address):
                stand_in.connections.append({"peer": client_address[0], "time": time.time()})
                return True

        self.server = Server((bind, port), _Handler)
        self.server.stand_in = self
        self.bind = bind
        self.port = self.server.server_address[1]
        host = f"[{bind}]" if ":" in bind else bind
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_exchange(port: int, head: bytes, body_chunks=(), *, timeout: float = 30,
                 limit: int = 1_000_000) -> tuple[bytes, int]:
    """Send a request over a plain socket to 127.0.0.1:`port` — `head`, then the body in
    chunks for as long as the server takes them — and read the answer until the server
    closes (at most `limit` bytes). Returns (answer, body bytes sent); b"" when the server
    closed without a word."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while len(answer) < limit:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent
