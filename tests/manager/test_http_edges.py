"""Requests the web server refuses before the app sees them get a real answer (not a closed
connection or an empty page), directly from daphne and through Caddy in front of it: header
fields over 16 KB (431), a URL over 16 KB (414), a malformed request (400), a body over its
cap (413: under /api/ the API's JSON), and a multipart POST without a boundary (the API: a
JSON 400; the pages: the 400 page). A real labserver with
subdomain routing, spoken to over plain sockets."""

import json
import re
import socket
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from urllib.parse import urlencode

import pytest

from instances.git.webcap import HEADER_TIMEOUT, HEADERS_MAX_BYTES
from tests.http_helpers import raw_exchange
from tests.labserver_helpers import (BASE_DIR, LabServer, child_env, free_port, migrate, new_data_dir, remove_data_dir,
                                     remove_instances)

pytestmark = pytest.mark.slow

HOST = "manager.lab.test"


class Lab:
    def __init__(self, server: LabServer, caddy_port: int, token: str):
        self.server, self.token = server, token
        self.ports = {"daphne": server.port, "caddy": caddy_port}


@pytest.fixture(scope="module")
def lab():
    data_dir = new_data_dir()
    port, caddy_port = free_port(), free_port()
    extra = {"LAB_ROUTING": "subdomain", "LAB_DOMAIN": "lab.test", "LAB_PUBLIC_HOST": HOST,
             "LAB_PROXY_LISTEN": f"127.0.0.1:{caddy_port}", "LAB_THROTTLE_TOKEN": "off",
             "LAB_BACKUP_UPLOAD_MAX_MB": "2", "LAB_LARGE_BODIES": "1"}
    server = None
    try:
        migrate(data_dir, port)
        server = LabServer(data_dir, port, **extra)
        server.wait_ready()
        token = subprocess.run([sys.executable, "manage.py", "create_token", "admin"], cwd=BASE_DIR,
                               env=child_env(data_dir, port, **extra), capture_output=True, text=True,
                               timeout=60, check=True).stdout.strip()
        yield Lab(server, caddy_port, token)
    finally:
        if server is not None:
            server.kill_everything()
            remove_instances(data_dir, port, **extra)  # the upload test's instance: its database and Redis
        remove_data_dir(data_dir)


def exchange(port: int, request: bytes, timeout: float = 20) -> tuple[int, dict, bytes]:
    """Send `request` whole (as far as the server takes it) and read the answer to its end:
    (status, headers, body); status 0 when the server closed without a word."""
    answer, _ = raw_exchange(port, request, timeout=timeout)
    if not answer:
        return 0, {}, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(path: str, *fields: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n" + "".join(f"{f}\r\n" for f in fields)
            + "Connection: close\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize("via", ["daphne", "caddy"])
def test_oversized_headers_and_urls_are_answered(lab, via):
    port = lab.ports[via]
    big = "x" * (HEADERS_MAX_BYTES + 1000)
    # One header field over the size (Twisted closed the connection without an answer) …
    status, headers, body = exchange(port, get("/healthz/", f"Cookie: junk={big}"))
    assert status == 431, (status, body[:300])
    assert headers["content-type"].startswith("text/plain") and b"header fields are larger than this server" in body
    # … many fields, together over it (Twisted sent an empty 400) …
    fields = [f"X-Pad-{n}: {'y' * 4000}" for n in range(5)]
    status, headers, body = exchange(port, get("/healthz/", *fields))
    assert status == 431 and b"16 KB in all" in body, (status, body[:300])
    # … under /api/ as JSON.
    status, headers, body = exchange(port, get("/api/v1/instances", f"Authorization: Bearer {lab.token}",
                                               f"X-Big: {big}"))
    assert status == 431 and headers["content-type"] == "application/json", (status, headers)
    assert json.loads(body)["detail"].startswith("Request refused: its header fields are larger")
    # A URL over the size: 414 (JSON under /api/).
    status, headers, body = exchange(port, get("/api/v1/instances/" + "a" * (HEADERS_MAX_BYTES + 10)))
    assert status == 414 and "address (URL) is longer" in json.loads(body)["detail"], (status, body[:300])
    status, headers, body = exchange(port, get("/lobby/" + "a" * (HEADERS_MAX_BYTES + 10)))
    assert status == 414 and headers["content-type"].startswith("text/plain"), (status, body[:300])
    # Headers just under the size still reach the app.
    status, _, body = exchange(port, get("/healthz/", f"X-Pad: {'z' * (HEADERS_MAX_BYTES - 600)}"))
    assert (status, body) == (200, b"ok")


def test_malformed_requests_get_a_400_with_a_reason(lab):
    port = lab.ports["daphne"]
    status, headers, body = exchange(port, f"GET /healthz/ HTTP/1.1\r\nHost: {HOST}\r\nno colon here\r\n\r\n"
                                     .encode())
    assert status == 400 and b"could not read it as HTTP/1.1" in body, (status, body[:300])
    status, _, body = exchange(port, b"BROKEN\r\n\r\n")
    assert status == 400 and b"could not read it as HTTP/1.1" in body
    assert exchange(port, get("/healthz/"))[0] == 200  # the server took no harm


def multipart_without_boundary(path: str, *fields: str) -> bytes:
    body = b'--x\r\nContent-Disposition: form-data; name="name"\r\n\r\nstudy\r\n--x--\r\n'
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\n" + "".join(f"{f}\r\n" for f in fields)
            + f"Content-Type: multipart/form-data\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


@pytest.mark.parametrize("via", ["daphne", "caddy"])
def test_a_multipart_post_without_boundary_gets_a_clear_400(lab, via):
    port = lab.ports[via]
    auth = f"Authorization: Bearer {lab.token}"
    status, headers, body = exchange(port, multipart_without_boundary("/api/v1/instances", auth))
    assert status == 400 and headers["content-type"] == "application/json", (status, headers, body[:300])
    assert "Content-Type: application/json" in json.loads(body)["detail"]
    status, _, body = exchange(port, multipart_without_boundary("/api/v1/me/ssh-keys", auth))
    assert status == 400 and json.loads(body)["detail"].startswith("The request body is not valid JSON")
    # A page, posted from a browser that has the CSRF cookie: the 400 page, not a 500 (nor an
    # empty answer). (Without the cookie the CSRF check refuses it first: 403.)
    status, headers, _ = exchange(port, get("/accounts/login/"))
    cookie = re.search(r"csrftoken=([A-Za-z0-9]+)", headers["set-cookie"]).group(1)
    status, headers, body = exchange(port, multipart_without_boundary(
        "/accounts/login/", f"Cookie: csrftoken={cookie}", f"X-CSRFToken: {cookie}", f"Origin: http://{HOST}"))
    assert status == 400 and headers["content-type"].startswith("text/html"), (status, body[:500])
    assert b"The server could not read what was sent" in body


@pytest.mark.parametrize("via", ["daphne", "caddy"])
def test_a_body_over_the_cap_gets_a_413_in_the_apis_words_under_api(lab, via):
    """Under /api/ the web server's 413 is the API's JSON with the API's own sentence (it
    said text/plain and talked about git pushes); pages get a sentence about the size."""
    port = lab.ports[via]
    api_error = {"detail": "The request body is too large."}

    def post(path: str, *fields: str) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\n" + "".join(f"{f}\r\n" for f in fields)
                + "Connection: close\r\n\r\n").encode()

    auth, json_type = f"Authorization: Bearer {lab.token}", "Content-Type: application/json"
    # A declared length over the cap (16 MB): answered before the body is sent.
    status, headers, body = exchange(port, post("/api/v1/instances", auth, json_type, "Content-Length: 20000000"))
    assert status == 413 and headers["content-type"] == "application/json", (status, headers, body[:300])
    assert json.loads(body) == api_error
    # A chunked body (64 MB), cut off once past the cap (what follows is read and dropped,
    # at most as much again, so the client reads the answer), never read to its end.
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    answer, sent = raw_exchange(port, post("/api/v1/me/ssh-keys", auth, json_type, "Transfer-Encoding: chunked"),
                                (chunk for _ in range(1024)))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, answer[:300]
    assert json.loads(body) == api_error and sent < 48 * 1024 * 1024
    # Under the web server's cap but over what Django reads (2.5 MB): the same words.
    big = b'{"title": "' + b"x" * 3_000_000 + b'"}'
    status, headers, body = exchange(port, post("/api/v1/me/ssh-keys", auth, json_type,
                                                f"Content-Length: {len(big)}") + big)
    assert status == 413 and json.loads(body) == api_error, (status, body[:300])
    # A page: a sentence about the size, nothing about git pushes.
    status, headers, body = exchange(port, post("/accounts/login/", "Content-Length: 20000000"))
    assert status == 413 and headers["content-type"].startswith("text/plain"), (status, headers)
    assert body == b"Request refused: its body is larger than this server takes (16 MB).\n"
    assert exchange(port, get("/healthz/"))[0] == 200  # the server took no harm


def slow_client(port: int, head: bytes, *, trickle: bytes, every: float, bound: float) -> tuple[bytes, int]:
    """Send `head`, then one byte of `trickle` every `every` seconds (none when it is empty),
    reading whatever comes back, until the server closes the connection. Returns (the
    answer, the bytes trickled). Fails after `bound` seconds with the connection still open."""
    deadline = time.monotonic() + bound
    answer, sent = b"", 0
    with socket.create_connection(("127.0.0.1", port), timeout=every) as sock:
        sock.sendall(head)
        while True:
            assert time.monotonic() < deadline, f"still open after {bound} s (answer so far: {answer[:200]!r})"
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if trickle:
                    try:
                        sock.sendall(trickle[sent % len(trickle):][:1])
                        sent += 1
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                continue
            except ConnectionResetError:
                return answer, sent
            if not data:
                return answer, sent
            answer += data


SLOW_CLIENTS = {
    # A header field trickled, one byte a second, forever.
    "trickled": (f"GET /api/v1/me HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode(), b"abcdefgh", 1.0),
    # Half a request, then nothing at all.
    "half-sent": (f"GET /healthz/ HTTP/1.1\r\nHost: {HOST}\r\n".encode(), b"", 1.0),
    # The request line itself trickled.
    "request line": (b"GET /lobby/", b"abcdefgh", 1.0),
}


@pytest.fixture(scope="module")
def slow_clients(lab) -> dict[str, dict[str, object]]:
    """Every slow client against daphne and through Caddy at once (each is cut off only
    after HEADER_TIMEOUT, so both servers' tests wait that long once): via -> name -> the
    answer and the bytes trickled, or the exception."""
    bound = HEADER_TIMEOUT + 40  # the timeout, the drain after the answer, and a margin
    results: dict[str, dict[str, object]] = {via: {} for via in lab.ports}

    def run(via, name, head, trickle, every):
        try:
            results[via][name] = slow_client(lab.ports[via], head, trickle=trickle, every=every, bound=bound)
        except BaseException as exc:  # noqa: BLE001 - reported by the tests
            results[via][name] = exc

    threads = [threading.Thread(target=run, args=(via, name, *spec))
               for via in lab.ports for name, spec in SLOW_CLIENTS.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(bound + 10)
    return results


@pytest.mark.parametrize("via", ["daphne", "caddy"])
def test_a_request_head_that_does_not_arrive_in_time_is_answered_and_closed(lab, slow_clients, via):
    """Slowloris: a client that sends a request's head a byte at a time (each byte starts
    Twisted's idle timeout again) or stops half-way used to hold its connection for as long
    as it liked. The head must be complete within HEADER_TIMEOUT of its first byte: after
    that, daphne answers 408 with a sentence (JSON under /api/) and closes the connection;
    Caddy in front (its read_header_timeout, the same 20 s) closes it."""
    port = lab.ports[via]
    results, clients = slow_clients[via], SLOW_CLIENTS
    for name in clients:
        assert not isinstance(results.get(name), BaseException), (name, results.get(name))
    sentence = f"Request refused: its request line and header fields did not arrive within {HEADER_TIMEOUT} seconds."
    if via == "caddy":  # Go's server closes such a connection, with a bare 400 or 408 or without a word
        for name in clients:
            answer, _ = results[name]
            assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 408")), (name, answer[:300])
        assert results["trickled"][1] >= 2
        assert exchange(port, get("/healthz/"))[0] == 200
        return
    answer, trickled = results["trickled"]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout") and b"application/json" in head, answer[:300]
    assert json.loads(body) == {"detail": sentence} and trickled >= 2  # (it kept sending: still cut off)
    for name in ("half-sent", "request line"):
        answer, _ = results[name]
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), (name, answer[:300])
        assert answer.endswith(sentence.encode() + b"\n"), (name, answer[:300])
    status, _, body = exchange(port, get("/healthz/"))
    assert (status, body) == (200, b"ok")  # the server took no harm


def test_every_status_line_has_its_reason_phrase(lab):
    """Twisted knows no reason phrase for 422 or 429: daphne sent "429 Unknown Status"."""
    port = lab.ports["daphne"]

    def status_line(request: bytes) -> bytes:
        answer, _ = raw_exchange(port, request)
        return answer.split(b"\r\n", 1)[0]

    body = b'{"key": "not a key"}'
    line = status_line(f"POST /api/v1/me/ssh-keys HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {lab.token}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                       .encode() + body)
    assert line == b"HTTP/1.1 422 " + HTTPStatus(422).phrase.encode(), line
    # Password resets of one address over the limit (5 a minute): 429.
    _, headers, _ = exchange(port, get("/accounts/password/reset/"))
    cookie = re.search(r"csrftoken=([A-Za-z0-9]+)", headers["set-cookie"]).group(1)
    form = urlencode({"csrfmiddlewaretoken": cookie, "email": "someone@lab.test"}).encode()
    attempt = (f"POST /accounts/password/reset/ HTTP/1.1\r\nHost: {HOST}\r\nCookie: csrftoken={cookie}\r\n"
               f"Origin: http://{HOST}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
               f"Content-Length: {len(form)}\r\nConnection: close\r\n\r\n").encode() + form
    lines = [status_line(attempt) for _ in range(7)]
    assert lines[-1] == b"HTTP/1.1 429 Too Many Requests", lines


@pytest.mark.parametrize("via", ["daphne"])
def test_backup_uploads_through_the_web_server(lab, via):
    """Through the real web server (LAB_BACKUP_UPLOAD_MAX_MB=2 here): a declared length over
    the limit is refused before the body is sent; a body between the limit and the web
    server's cap reaches Django, whose upload handler stops at the limit (413, the limit's
    sentence); a dump under the limit is stored."""
    port = lab.ports[via]
    auth = f"Authorization: Bearer {lab.token}"
    made = exchange(port, (f"POST /api/v1/instances HTTP/1.1\r\nHost: {HOST}\r\n{auth}\r\n"
                           "Content-Type: application/json\r\nContent-Length: 37\r\nConnection: close\r\n\r\n"
                           '{"name": "up-test", "owner": "admin"}').encode())
    assert made[0] == 201, made

    def upload(content: bytes, declared: int | None = None) -> tuple[int, dict, bytes]:
        boundary = "lab-test-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.dump\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        head = (f"POST /api/v1/instances/up-test/backups HTTP/1.1\r\nHost: {HOST}\r\n{auth}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {declared or len(body)}\r\nConnection: close\r\n\r\n").encode()
        return exchange(port, head + (b"" if declared else body), timeout=60)

    status, _, body = upload(b"", declared=5 * 1024 * 1024)
    assert status == 413 and json.loads(body) == {"detail": "The request body is too large."}, (status, body[:300])
    status, _, body = upload(b"PGDMP" + b"\0" * (2 * 1024 * 1024 + 100))  # over 2 MB, under the server's 3 MB
    assert status == 413 and "LAB_BACKUP_UPLOAD_MAX_MB" in json.loads(body)["detail"], (status, body[:300])
    status, _, body = upload(b"PGDMP" + b"\1" * 1_500_000)
    assert status == 201 and json.loads(body)["size"] == 1_500_005, (status, body[:300])


def test_large_bodies_are_received_one_at_a_time_here(lab):
    """LAB_LARGE_BODIES=1 here: while one body over 16 MB arrives (a git push; the login is
    checked only once it is whole), another is answered 503 with the reason — before its
    body is sent when its length is declared, once past 16 MB when it is chunked — and the
    slot is free again as soon as the first ends."""
    port = lab.ports["daphne"]

    def push_head(*fields: str) -> bytes:
        return (f"POST /git/nothing.git/git-receive-pack HTTP/1.1\r\nHost: {HOST}\r\n"
                + "".join(f"{f}\r\n" for f in fields) + "Connection: close\r\n\r\n").encode()

    def continued() -> bytes:
        """The first line the server answers a declared 20 MB push with (100 Continue: it takes it)."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(push_head("Content-Length: 20000000", "Expect: 100-continue"))
            return sock.recv(200).split(b"\r\n", 1)[0]

    holder = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        holder.sendall(push_head("Content-Length: 20000000") + b"\0" * 1_000_000)  # and then it waits
        status, headers, body = exchange(port, push_head("Content-Length: 20000000"))
        assert status == 503 and headers.get("retry-after") == "60", (status, headers, body[:300])
        assert b"receiving 1 other large upload or git push right now (LAB_LARGE_BODIES)" in body, body
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        answer, sent = raw_exchange(port, push_head("Transfer-Encoding: chunked"), (chunk for _ in range(512)))
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
        assert 16 * 1024 * 1024 < sent < 33 * 1024 * 1024  # refused once past 16 MB, not read to its end
    finally:
        holder.close()
    for _ in range(50):  # the server sees the holder's connection end (bounded: 10 s)
        if continued() == b"HTTP/1.1 100 Continue":
            break
        time.sleep(0.2)
    assert continued() == b"HTTP/1.1 100 Continue"
    assert exchange(port, get("/healthz/"))[0] == 200
