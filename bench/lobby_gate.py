#!/usr/bin/env python
"""How fast does opening the lobby gate reach the kiosks?

Starts its own `manage.py labserver` (embedded Redis, daphne, Celery worker and beat) in a
temporary data dir on a free port, writes an instance with a live release whose room has
N participant labels into its database, and connects N kiosk websockets
(`/ws/lobby/<instance>/<room>/?label=...`, what each seat page opens) through the real
labserver. Per run: the gate is held, every seat clicks "I am ready", then the
experimenter opens the gate with the board's real HTTP POST (session cookie + CSRF), and
the script records when each kiosk is told to go to the room.

Measured per run: from sending the POST to the `go` message arriving at each kiosk. The
table shows medians over the runs of: the first kiosk, the median kiosk and the LAST kiosk
(every seat told), the worst last kiosk, and the POST's own response time.

    .venv/bin/python bench/lobby_gate.py                  # 100 kiosks, 10 runs
    .venv/bin/python bench/lobby_gate.py --kiosks 20 100 200 --runs 5

Bounded: every wait has a deadline; the whole run stops after --budget seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from notify_latency import (  # noqa: E402
    Clients, bench_labserver, bench_user, machine, print_latency_table, ws_connect, ws_messages,
)

from tests.labserver_helpers import free_port  # noqa: E402

INSTANCE, ROOM = "bench-lobby", "lab"


class Kiosks(Clients):
    """N kiosk sockets (notify_latency's client loop); records when each gets `go`."""

    def __init__(self, host: str, port: int):
        super().__init__(host, port, session_key="")  # kiosks have no login
        self.states = 0
        self.go: dict[str, float] = {}

    async def _kiosk(self, label, reader, writer):
        try:
            async for text in ws_messages(reader, writer):
                now = time.time()
                event = json.loads(text)
                with self._lock:
                    if event.get("type") == "state":
                        self.states += 1
                    elif event.get("type") == "go":
                        self.go[label] = now
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.errors.append(f"kiosk {label}: socket lost: {exc!r}")
        except asyncio.CancelledError:
            pass

    async def _connect_kiosks(self, labels):
        headers = {"Origin": f"http://{self.host}:{self.port}"}
        for label in labels:
            path = f"/ws/lobby/{INSTANCE}/{ROOM}/?label={quote(label, safe='')}"
            reader, writer = await ws_connect(self.host, self.port, path, headers)
            self.writers.append(writer)
            self.tasks.append(asyncio.ensure_future(self._kiosk(label, reader, writer)))

    def wait(self, what, done, timeout: float):
        deadline = time.monotonic() + timeout
        while not done():
            if self.errors:
                raise RuntimeError(self.errors[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout} s")
            time.sleep(0.005)

    def connect(self, labels, timeout: float = 60) -> None:
        asyncio.run_coroutine_threadsafe(self._connect_kiosks(labels), self.loop).result(timeout)
        self.wait(f"not all {len(labels)} kiosks were told their state", lambda: self.states >= len(labels), timeout)

    def take_go(self) -> dict[str, float]:
        with self._lock:
            got, self.go = self.go, {}
        return got


class Board:
    """The experimenter's browser: session cookie and CSRF token, POSTs like the board's forms."""

    def __init__(self, base: str, session_key: str):
        self.base = base
        self.cookie = f"sessionid={session_key}"
        request = urllib.request.Request(f"{base}/instances/{INSTANCE}/", headers={"Cookie": self.cookie})
        with urllib.request.urlopen(request, timeout=30) as response:
            cookies = response.headers.get_all("Set-Cookie") or []
        token = [c.split(";")[0].split("=", 1)[1] for c in cookies if c.startswith("csrftoken=")]
        if not token:
            raise RuntimeError("the instance page set no CSRF cookie")
        self.token = token[0]

    def gate(self, action: str) -> float:
        """POST the gate form (as htmx does); returns the response time in seconds."""
        request = urllib.request.Request(
            f"{self.base}/instances/{INSTANCE}/lobby/rooms/{ROOM}/gate/", method="POST",
            data=f"gate={action}".encode(),
            headers={"Cookie": f"{self.cookie}; csrftoken={self.token}", "X-CSRFToken": self.token,
                     "HX-Request": "true", "Content-Type": "application/x-www-form-urlencoded"})
        started = time.time()
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"gate {action}: HTTP {response.status}")
            response.read()
        return time.time() - started


def make_instance(user, labels):
    from instances.models import Instance, Release

    instance = Instance.objects.create(name=INSTANCE, owner=user, public_port=free_port(), status="running")
    Release.objects.create(instance=instance, number=1, commit="b" * 40, status="live", language_code="en",
                           rooms=[{"name": ROOM, "display_name": "Lab", "participant_labels": labels}])


def one_run(board: Board, kiosks: Kiosks, labels, timeout: float) -> tuple[list[float], float]:
    """Hold, everyone ready, open: the latencies (s) of all kiosks and the POST's time."""
    from lobby import services

    board.gate("hold")
    ref = services.find_room(INSTANCE, ROOM)
    for label in labels:
        if services.mark_ready(ref, label)[0] != "ready":
            raise RuntimeError(f"seat {label} did not become ready")
    kiosks.take_go()
    started = time.time()
    response_time = board.gate("open")
    kiosks.wait("not every kiosk was told to go", lambda: len(kiosks.go) >= len(labels), timeout)
    arrivals = kiosks.take_go()
    services.reset(ref.instance.owner, ref)
    return sorted(t - started for t in arrivals.values()), response_time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kiosks", type=int, nargs="+", default=[100])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per kiosk count (after one warm-up)")
    parser.add_argument("--budget", type=float, default=300, help="stop after this many seconds in total")
    parser.add_argument("--verbose", action="store_true", help="show the labserver's output")
    args = parser.parse_args()
    started = time.monotonic()

    results = []
    # LAB_RUNTIME=process: nothing tries to run the instance written into the database.
    with bench_labserver(args.verbose, LAB_RUNTIME="process") as server:
        port = server.port
        user, session_key = bench_user()
        most = max(args.kiosks)
        all_labels = [f"seat{n:03d}" for n in range(1, most + 1)]
        make_instance(user, all_labels)
        board = Board(server.url, session_key)
        for n in args.kiosks:
            labels = all_labels[:n]
            kiosks = Kiosks("127.0.0.1", port)
            try:
                kiosks.connect(labels)
                runs = []
                for i in range(args.runs + 1):
                    if time.monotonic() - started > args.budget:
                        print(f"budget of {args.budget:.0f} s used up; stopping early", flush=True)
                        break
                    latencies, response_time = one_run(board, kiosks, labels, timeout=20)
                    if i > 0:  # the first is a warm-up
                        runs.append((latencies, response_time))
                    time.sleep(0.2)
            finally:
                kiosks.close()
            if runs:
                results.append((n, runs))
                last = statistics.median(r[0][-1] for r in runs)
                print(f"  {n:>4} kiosks: {len(runs)} runs, median last kiosk {last * 1000:.1f} ms", flush=True)
            if time.monotonic() - started > args.budget:
                break

    print()
    print(machine())
    print("from the experimenter's POST that opens the gate to the `go` message at the kiosks")
    print("medians over the runs, milliseconds")
    print()
    print_latency_table("kiosk", results, arrivals=lambda run: run[0], extra=("POST answered", lambda run: run[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
