#!/usr/bin/env python
"""How fast does a finished background task reach the browsers?

Starts its own `manage.py labserver` (embedded Redis, daphne, Celery worker and beat) in a
temporary data dir on a free port, connects N authenticated websocket clients to
/ws/live/ (a minimal asyncio websocket client, below: no extra dependency), then repeatedly
creates an account through the account service. That enqueues the real Celery task
`accounts.send_invitation`; when it finishes in the worker it marks its Job finished and
notifies the user who started it through the Channels layer.

Measured per run: from the Job's `finished_at` (set in the worker right before the
notification is sent) to the `notify` message arriving at each client. The table shows
medians over the runs of: the first client, the median client, and the last client to
receive it (i.e. until *every* tab has it).

    .venv/bin/python bench/notify_latency.py                # clients 1 10 50 100, 10 runs each
    .venv/bin/python bench/notify_latency.py --clients 1 20 --runs 20

Bounded: every wait has a deadline; the whole run stops after --budget seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import statistics
import struct
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from tests.labserver_helpers import LabServer, free_port, migrate, new_data_dir, remove_data_dir  # noqa: E402


# --- websocket clients (asyncio loop in its own thread; Django's ORM stays in the main one) ---
#
# A minimal RFC 6455 client on asyncio streams: the manager's Django process already made
# txaio use Twisted (daphne), so autobahn's asyncio flavour cannot be loaded beside it.

async def ws_connect(host: str, port: int, path: str, headers: dict[str, str]):
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *[f"{k}: {v}" for k, v in headers.items()]]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = await reader.readuntil(b"\r\n\r\n")
    status = response.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise RuntimeError(f"websocket handshake refused: {status.decode(errors='replace')}")
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    if accept not in response:
        raise RuntimeError("websocket handshake: bad Sec-WebSocket-Accept")
    return reader, writer


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def ws_messages(reader, writer):
    """Yield text messages; answer pings; stop at close."""
    buffer = b""
    while True:
        b1, b2 = await reader.readexactly(2)
        fin, opcode, n = b1 & 0x80, b1 & 0x0F, b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(n)  # server frames are not masked
        if opcode == 0x8:  # close
            return
        if opcode == 0x9:  # ping
            writer.write(ws_frame(0xA, payload))
            continue
        if opcode in (0x1, 0x0):
            buffer += payload
            if fin:
                yield buffer.decode()
                buffer = b""


class Clients:
    def __init__(self, host: str, port: int, session_key: str):
        self.host, self.port, self.session_key = host, port, session_key
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.hello = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers = []
        self.tasks = []

    async def _client(self, reader, writer):
        try:
            async for text in ws_messages(reader, writer):
                now = time.time()
                event = json.loads(text)
                with self._lock:
                    if event.get("type") == "hello":
                        self.hello += 1
                    elif event.get("type") == "notify" and event.get("job"):
                        self.arrivals[event["job"]["id"]].append(now)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.errors.append(f"socket lost: {exc!r}")
        except asyncio.CancelledError:
            pass

    async def _connect(self, n: int):
        headers = {"Origin": f"http://{self.host}:{self.port}", "Cookie": f"sessionid={self.session_key}"}
        for _ in range(n):
            reader, writer = await ws_connect(self.host, self.port, "/ws/live/", headers)
            self.writers.append(writer)
            self.tasks.append(asyncio.ensure_future(self._client(reader, writer)))

    def connect(self, n: int, timeout: float = 60) -> None:
        asyncio.run_coroutine_threadsafe(self._connect(n), self.loop).result(timeout)
        deadline = time.monotonic() + timeout
        while self.hello < n:
            if self.errors:
                raise RuntimeError(self.errors[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.hello} of {n} sockets were accepted within {timeout} s")
            time.sleep(0.02)

    def wait_all(self, job_id: str, n: int, timeout: float) -> list[float]:
        deadline = time.monotonic() + timeout
        got: list[float] = []
        while time.monotonic() < deadline:
            with self._lock:
                got = list(self.arrivals.get(job_id, []))
            if len(got) >= n:
                return got
            if self.errors:
                raise RuntimeError(self.errors[0])
            time.sleep(0.005)
        raise RuntimeError(f"only {len(got)} of {n} clients got the notification of job {job_id} within {timeout} s")

    async def _close(self):
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            try:
                writer.write(ws_frame(0x8, struct.pack("!H", 1000)))
                writer.close()
            except (ConnectionError, RuntimeError):
                pass

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


# --- the Django side --------------------------------------------------------------------------

def setup_django(data_dir: Path, port: int) -> None:
    os.environ.update(LAB_DATA_DIR=str(data_dir), LAB_HOST="127.0.0.1", LAB_PORT=str(port))
    for key in ("REDIS_URL", "DATABASE_URL", "LAB_PUBLIC_URL", "LAB_PUBLIC_HOST", "LAB_SMTP_HOST"):
        os.environ.pop(key, None)
    os.environ["DJANGO_SETTINGS_MODULE"] = "manager.settings"
    import django

    django.setup()


@contextlib.contextmanager
def bench_labserver(verbose: bool, **env: str):
    """A labserver in a temporary data dir on a free port, with Django set up against its
    database in this process; always stopped and removed (on an error its output's tail
    is shown first)."""
    data_dir, port = new_data_dir(), free_port()
    server = None
    try:
        print(f"starting labserver in {data_dir} on port {port} ...", flush=True)
        migrate(data_dir, port)
        server = LabServer(data_dir, port, echo=verbose, **env)
        server.wait_ready(timeout=120)
        setup_django(data_dir, port)
        yield server
    except Exception:
        if server is not None and not verbose:
            print("--- labserver output (tail) ---\n" + "\n".join(server.lines[-60:]), file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.kill_everything()
        remove_data_dir(data_dir)


def print_latency_table(receiver: str, results, *, arrivals, extra=None) -> None:
    """The benchmarks' table: per receiver count, the medians over the runs of the first,
    the median and the last receiver, and the worst last one (ms). `results` holds
    (count, runs); `arrivals(run)` is a run's sorted arrival times (s); `extra` an optional
    (title, run -> seconds) column."""
    titles = [f"{receiver}s", "runs", f"first {receiver}", f"median {receiver}", f"last {receiver}", "max last"]
    titles += [extra[0]] if extra else []
    print("| " + " | ".join(f"{t:>{len(t)}}" for t in titles) + " |")
    print("|" + "|".join("-" * (len(t) + 2) for t in titles) + "|")
    for n, runs in results:
        times = [arrivals(r) for r in runs]
        values = [statistics.median(t[0] for t in times), statistics.median(statistics.median(t) for t in times),
                  statistics.median(t[-1] for t in times), max(t[-1] for t in times)]
        values += [statistics.median(extra[1](r) for r in runs)] if extra else []
        cells = [f"{n:>{len(titles[0])}}", f"{len(runs):>4}"]
        cells += [f"{v * 1000:>{len(t)}.1f}" for v, t in zip(values, titles[2:])]
        print("| " + " | ".join(cells) + " |")


def machine() -> str:
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def bench_user():
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    from manager.accounts.models import User

    user = User.objects.create(username="bench", email="bench@localhost", is_superuser=True, is_staff=True)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return user, session.session_key


def one_run(user, clients: Clients, n: int, seq: int, timeout: float) -> list[float]:
    """Latencies (s) of all n clients for one finished invitation task."""
    from manager.accounts.models import User
    from manager.accounts.services import create_user
    from manager.jobs.models import Job

    name = f"b{seq}"
    create_user(user, username=name, email=f"{name}@example.org")
    invited = User.objects.get(username=name)
    job = Job.objects.filter(kind="accounts.invite", link=f"/users/{invited.pk}/").get()
    arrivals = clients.wait_all(str(job.id), n, timeout)
    job.refresh_from_db()
    if job.status != Job.Status.SUCCEEDED:
        raise RuntimeError(f"the task failed: {job.message}")
    finished = job.finished_at.timestamp()
    return sorted(t - finished for t in arrivals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50, 100])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per client count (after one warm-up)")
    parser.add_argument("--budget", type=float, default=300, help="stop after this many seconds in total")
    parser.add_argument("--verbose", action="store_true", help="show the labserver's output")
    args = parser.parse_args()
    started = time.monotonic()

    results = []
    cold = None
    with bench_labserver(args.verbose) as server:
        port = server.port
        user, session_key = bench_user()
        seq = 0
        for n in args.clients:
            clients = Clients("127.0.0.1", port, session_key)
            try:
                clients.connect(n)
                runs = []
                for i in range(args.runs + 1):
                    if time.monotonic() - started > args.budget:
                        print(f"budget of {args.budget:.0f} s used up; stopping early", flush=True)
                        break
                    seq += 1
                    latencies = one_run(user, clients, n, seq, timeout=20)
                    if i > 0:  # the first is a warm-up
                        runs.append(latencies)
                    elif seq == 1:
                        cold = latencies
                    time.sleep(0.1)
            finally:
                clients.close()
            if runs:
                results.append((n, runs))
                first = statistics.median(r[0] for r in runs)
                print(f"  {n:>4} clients: {len(runs)} runs, median first {first * 1000:.1f} ms", flush=True)
            if time.monotonic() - started > args.budget:
                break

    print()
    print(machine())
    print("latency from the task finishing (Job.finished_at, in the worker) to the notify message at the clients")
    print("medians over the runs, milliseconds")
    print()
    print_latency_table("client", results, arrivals=lambda run: run)
    if cold:
        print()
        print(f"cold start (the worker's very first notification, not in the table): "
              f"{cold[-1] * 1000:.1f} ms to the last of {len(cold)} client(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
