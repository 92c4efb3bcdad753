#!/usr/bin/env python
"""Waking a sleeping instance: how long until its first request is answered, and where the
time goes.

Starts a real `manage.py labserver` (temporary LAB_DATA_DIR, embedded Redis, worker, git
server, Caddy) with `LAB_RUNTIME=process` (default) or `docker`, creates one instance and
pushes a small oTree 6 project to it. Then, `--runs` times (after one warm-up wake that is
shown but not counted): the instance is made idle (no request for longer than the lab's
sleep time, its sessions read: none live) and put to sleep (`instances.sleep.put_to_sleep`,
as the sleep sweep does; with LAB_SLEEP_DATABASES (default true) its PostgreSQL and Redis stop
too), left asleep `--pause` seconds, and woken:

* `direct` (always): `instances.sleep.wake` is called in this process (what the proxy, the
  lobby or a bot run call), then one HTTP request goes to the instance's public URL through
  Caddy; the time is from the call to that answer. It is broken down by timing the steps
  of the reconcile in this process: the instance lock and database rows, PostgreSQL and
  Redis started and answering (the runtime's `_ensure_services`), the app started
  (the rest of `ensure`), the app answering HTTP (the reconciler's `_app_status`, which
  polls), the proxy's routes, and the request through Caddy;
* `front door` (`--front-door`): nothing is called; one HTTP request (not a browser's: no
  `Accept: text/html`) goes to the sleeping instance's public URL, and the proxy must hold
  it and wake the instance; the time is until the app's answer (any status below 500).

    .venv/bin/python bench/wake.py                        # process runtime, 7 wakes
    .venv/bin/python bench/wake.py --runtime docker --runs 7 --front-door

Runs as root for the process runtime. Everything it made is removed at the end, also on
Ctrl-C (the instance deleted through the API, then whatever is left of its manager id).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sleep_density import Instances, Manager, api, machine_facts, sleep_one, wait_status  # noqa: E402
from tests.otree_projects import valid_project  # noqa: E402

STEPS = ["lock + rows", "db + redis up", "app started", "app answers", "status + proxy", "via Caddy",
         "app answers (own probe)"]


class Clock:
    """Marks when each step of one wake ended (perf_counter)."""

    def __init__(self):
        self.marks: dict[str, float] = {}

    def mark(self, what: str) -> None:
        self.marks.setdefault(what, time.perf_counter())


CLOCK = Clock()


def instrument(runtime_name: str) -> None:
    """Wrap the steps of a wake (in this process only) so each marks when it began/ended."""
    from instances import proxy, reconciler

    if runtime_name == "process":
        from instances.runtime.process import ProcessRuntime as cls
    else:
        from instances.runtime.docker import DockerRuntime as cls

    def wrap(owner, attr, before=None, after=None):
        original = getattr(owner, attr)

        def wrapper(*a, **kw):
            if before:
                CLOCK.mark(before)
            try:
                return original(*a, **kw)
            finally:
                if after:
                    CLOCK.mark(after)

        setattr(owner, attr, wrapper)

    wrap(cls, "_ensure_services", before="ensure begins", after="services up")
    original_ensure = cls.ensure

    def ensure(self, spec):
        state = original_ensure(self, spec)
        CLOCK.mark("ensure ends")
        if state.app_url:  # when did the app really answer? (the reconciler polls)
            threading.Thread(target=probe, args=(state.app_url,), daemon=True).start()
        return state

    cls.ensure = ensure
    wrap(reconciler, "_app_status", before="app status begins", after="app answers")
    wrap(proxy, "sync_routes", after="proxy synced")


def probe(url: str, timeout: float = 30) -> None:
    """Mark "app probe" when `url` first answers below 500 (polled every 10 ms)."""
    deadline = time.perf_counter() + timeout
    opener = urllib.request.build_opener(NoRedirect)
    while time.perf_counter() < deadline:
        try:
            with opener.open(url, timeout=2) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError):
            status = 0
        if 0 < status < 500:
            CLOCK.mark("app probe")
            return
        time.sleep(0.01)


def first_answer(url: str, timeout: float, headers=None) -> tuple[float, int]:
    """Seconds until `url` answers below 500 (retrying refused/5xx), and that status."""
    opener = urllib.request.build_opener(NoRedirect)
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while True:
        try:
            with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError):
            status = 0
        if 0 < status < 500:
            return time.perf_counter() - t0, status
        if time.perf_counter() > deadline:
            raise SystemExit(f"{url} did not answer within {timeout:g} s (last status {status})")
        time.sleep(0.02)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


def sleep_now(server, token, name: str, reader: Instances) -> None:
    """Put it to sleep; then nothing of it may run any more (else the next wake would be
    measured against a half-stopped instance)."""
    sleep_one(name, "bench: wake")
    wait_status(server, token, [name], {"sleeping"}, 60, "sleeping")
    t0 = time.monotonic()
    first = running(reader, name)
    while (left := running(reader, name)) and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    if left:
        raise SystemExit(f"{name} is sleeping but {left} still run 30 s later")
    if first:
        print(f"  (still running when it was `sleeping`: {first}; gone {time.monotonic() - t0:.2f} s later)",
              file=sys.stderr)


def woken_meanwhile(manager, name: str, reader: Instances) -> str:
    """'' while the instance is still asleep with nothing running, else what woke it."""
    from instances.models import Instance

    instance = Instance.objects.get(name=name)
    if instance.status == "sleeping" and instance.asleep and not running(reader, name):
        return ""
    at = f"{instance.woke_at:%H:%M:%S}" if instance.woke_at else "-"
    return f"status {instance.status}, woken at {at} by {instance.wake_reason!r}"


def running(reader: Instances, name: str) -> list[str]:
    """What of the instance that sleeps still runs (zombies not counted): process names, or
    containers; only the app's with LAB_SLEEP_DATABASES=false (its db and redis stay up)."""
    from django.conf import settings

    from sleep_density import tree

    everything = settings.LAB_SLEEP_DATABASES
    if reader.runtime_name != "process":
        return [c["Names"][0] for c in reader.containers(name)
                if everything or c["Labels"].get("org.otree-lab.component") not in ("db", "redis")]
    pids = reader.pids(name)
    if not everything:
        app = (reader.runtime._state(name).get("processes") or {}).get("app") or {}
        pids = tree({app["pid"]}) & pids if app.get("pid") and app.get("running") else set()
    found = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
        if state not in "ZX":
            found.append(f"{comm}[{pid}]")
    return found


def wake_direct(name: str, url: str) -> dict[str, float]:
    from instances.sleep import wake

    CLOCK.marks = {}
    t0 = time.perf_counter()
    instance = wake(name, "bench: wake")
    woke = time.perf_counter()
    if instance is None or instance.status != "running":
        raise SystemExit(f"{name} did not wake: {instance and (instance.status, instance.status_reason)}")
    via_caddy, _status = first_answer(url, 30)
    m = CLOCK.marks
    return {
        "lock + rows": m["ensure begins"] - t0,
        "db + redis up": m["services up"] - m["ensure begins"],
        "app started": m["ensure ends"] - m["services up"],
        "app answers": m["app answers"] - m["app status begins"],
        "status + proxy": (woke - t0) - (m["app answers"] - t0),
        "app answers (own probe)": m.get("app probe", float("nan")) - m["ensure ends"],
        "via Caddy": via_caddy,
        "total": woke - t0 + via_caddy,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", choices=["process", "docker"], default="process")
    parser.add_argument("--runs", type=int, default=7, help="wakes measured (default 7), after one warm-up")
    parser.add_argument("--pause", type=float, default=3, help="seconds asleep before each wake (default 3)")
    parser.add_argument("--front-door", action="store_true", help="also wake through the proxy (a request)")
    parser.add_argument("--verbose", action="store_true", help="show the labserver's output")
    args = parser.parse_args()
    goal = 2.0 if args.runtime == "process" else 3.0

    sleep_dbs = os.environ.get("LAB_SLEEP_DATABASES", "true")
    manager = Manager(args.runtime, 1, echo=args.verbose)
    direct, front, loads, spontaneous = [], [], [], []
    try:
        manager.start()
        instrument(args.runtime)
        name = manager.create(["wk"], 60)[0]
        manager.push_all(valid_project("wake"), 1)
        wait_status(manager.server, manager.token, [name], {"running"}, 120, "running")
        url = api(f"{manager.server.url}/api/v1/instances/{name}", manager.token)["url"].rstrip("/") + "/"
        first_answer(url, 30)
        reader = Instances(args.runtime, manager.manager_id)
        for run in range(args.runs + 1):
            sleep_now(manager.server, manager.token, name, reader)
            time.sleep(args.pause)
            row = wake_direct(name, url)
            loads.append(os.getloadavg()[0])
            print(f"  direct wake {run or 'warm-up'}: {row['total']:.2f} s "
                  + ", ".join(f"{k} {row[k]:.2f}" for k in STEPS), file=sys.stderr)
            if run:
                direct.append(row)
        if args.front_door:
            for run in range(args.runs + 1):
                for _attempt in range(3):
                    sleep_now(manager.server, manager.token, name, reader)
                    time.sleep(args.pause)
                    woke = woken_meanwhile(manager, name, reader)
                    if not woke:
                        break
                    spontaneous.append(woke)
                    print(f"  (it woke by itself while asleep: {woke}; put to sleep again)", file=sys.stderr)
                else:
                    raise SystemExit("it woke by itself three times in a row")
                seconds, status = first_answer(url, 60, headers={"Accept": "*/*"})
                loads.append(os.getloadavg()[0])
                print(f"  front-door wake {run or 'warm-up'}: {seconds:.2f} s (HTTP {status})", file=sys.stderr)
                if run:
                    front.append(seconds)
                    status_now = api(f"{manager.server.url}/api/v1/instances/{name}", manager.token)["status"]
                    if status_now != "running":
                        raise SystemExit(f"answered {status} but the instance is {status_now}")
        manager.delete_all(timeout=120)
    finally:
        manager.cleanup()

    print()
    print(f"wake of a sleeping instance (oTree 6 app, tests/otree_projects.valid_project), {args.runtime} runtime, "
          f"LAB_SLEEP_DATABASES={sleep_dbs}; {len(direct)} wakes after one warm-up, asleep {args.pause:g} s before "
          f"each; {machine_facts()}; load average (1 min) during the wakes: "
          f"{min(loads):.2f}–{max(loads):.2f}")
    print()
    print("| wake | median s | min | max | goal |")
    print("|---|---|---|---|---|")
    totals = [r["total"] for r in direct]
    print(f"| direct (`instances.sleep.wake`, then a request through Caddy) | {statistics.median(totals):.2f} | "
          f"{min(totals):.2f} | {max(totals):.2f} | ≤ {goal:g} s |")
    for step in STEPS:
        values = [r[step] for r in direct]
        print(f"| … {step} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | |")
    if front:
        print(f"| front door (a request to the sleeping instance's URL) | {statistics.median(front):.2f} | "
              f"{min(front):.2f} | {max(front):.2f} | ≤ {goal:g} s |")
    if spontaneous:
        print(f"\nBetween the front-door wakes the instance woke by itself {len(spontaneous)} times while asleep "
              f"(those runs were not counted): {spontaneous}")
    print()
    print("Steps: lock + rows = wake() until the runtime starts anything (instance lock, database rows); "
          "db + redis up = PostgreSQL and Redis started and answering; app started = the app's process or "
          "container started; app answers = until the reconciler saw it answer HTTP; status + proxy = status "
          "row and the proxy's routes; via Caddy = one request to the public URL afterwards; app answers (own probe) = "
          "from the app's start until it first answered a request polled every 10 ms by this script (not part of "
          "the total: the reconciler polls on its own).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
