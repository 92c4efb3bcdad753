#!/usr/bin/env python
"""The process runtime: how fast is a new instance ready for code, what does an idle one
cost, and how fast is it removed?

Creates N instances one after the other through `ProcessRuntime.ensure` (folder, system
user when root, PostgreSQL cluster with initdb, supervisor, PostgreSQL and Redis
answering), lets them sit idle, reads each one's memory (PSS of its supervisor, PostgreSQL
and Redis processes), removes them and prints a table. PostgreSQL's server programs must
be installed (else instances get SQLite and the figure says nothing about PostgreSQL).

    .venv/bin/python bench/process_runtime.py --count 10 --idle 20

Uses its own manager id and a temporary LAB_DATA_DIR, and removes everything it made when
it ends (also on Ctrl-C or error). Push → live on this runtime: `bench/deploy.py
--runtime process`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
sys.path.insert(0, str(BASE_DIR / "bench"))
from instance_create import MIB, percentile  # noqa: E402


def pss_mib(pids: list[int]) -> float:
    """PSS of the processes `pids` and all their descendants, in MiB."""
    import psutil

    total = 0
    for pid in pids:
        try:
            top = psutil.Process(pid)
            for proc in [top, *top.children(recursive=True)]:
                total += proc.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total / MIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--idle", type=float, default=20)
    parser.add_argument("--budget", type=float, default=300, help="stop creating after this many seconds")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="labbench-", dir="/tmp")
    os.environ["LAB_DATA_DIR"] = data_dir
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
    import django

    django.setup()
    from instances.runtime.base import InstanceSpec
    from instances.runtime.process import ProcessRuntime

    runtime = ProcessRuntime(manager_id="bproc", ready_timeout=60)
    if runtime.pg_bin is None:
        print("PostgreSQL's server programs are not installed (apt install postgresql)", file=sys.stderr)
        return 2
    rows, started = [], time.monotonic()
    try:
        for i in range(args.count):
            if time.monotonic() - started > args.budget:
                break
            name = f"bench{i}"
            t0 = time.perf_counter()
            state = runtime.ensure(InstanceSpec(name=name, db_name="otree", db_user="otree",
                                                db_password=f"pw-{i}-bench", memory_mb=512, cpus=1.0))
            elapsed = time.perf_counter() - t0
            assert state.services_ready, state
            rows.append({"name": name, "create": elapsed})
            print(f"  {name}: ready for code after {elapsed:.2f} s", file=sys.stderr)
        time.sleep(args.idle)
        for row in rows:
            row["memory"] = pss_mib(runtime.processes(row["name"]))
        for row in rows:
            t0 = time.perf_counter()
            runtime.remove(row["name"])
            row["remove"] = time.perf_counter() - t0
    finally:
        for name in runtime.owned_instances():
            runtime.remove(name)
        shutil.rmtree(data_dir, ignore_errors=True)

    creates = [r["create"] for r in rows]
    print(f"\n{len(rows)} instances, {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
          f"PostgreSQL programs in {runtime.pg_bin}, per-instance users: {runtime.own_users}\n")
    print("| measure | median | p95 / max |")
    print("|---|---|---|")
    print(f"| create → ready for code | {statistics.median(creates):.2f} s | {percentile(creates, 95):.2f} / "
          f"{max(creates):.2f} s |")
    memory = [r["memory"] for r in rows]
    print(f"| idle instance (supervisor + PostgreSQL + Redis, PSS) | {statistics.median(memory):.1f} MiB | "
          f"max {max(memory):.1f} MiB |")
    print(f"| remove | {statistics.median(r['remove'] for r in rows):.2f} s | — |")
    print("\ngoal: create → ready within 3 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
