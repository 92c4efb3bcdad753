#!/usr/bin/env python
"""How fast is a new instance ready for code, and how much memory does an idle one use?

Creates N instances one after the other through the Docker runtime (`DockerRuntime.ensure`
with no app: networks, volume, PostgreSQL, Redis, until `pg_isready` and `redis-cli ping`
answer), lets them sit idle, reads the memory of each one's db and redis containers from
their cgroup (v1 `memory.stat`; the engine's stats API where that is not readable), then
removes them and prints a table.

    .venv/bin/python bench/instance_create.py                 # 5 instances, 20 s idle
    .venv/bin/python bench/instance_create.py --count 10 --idle 30
    .venv/bin/python bench/instance_create.py --runtime swarm  # SwarmRuntime.ensure instead

`--runtime swarm` needs the engine to be a swarm manager already (`docker swarm init`; the
script never changes the swarm): overlay networks and one service each for PostgreSQL and
Redis, on this machine's node (see `place_on_this_node`), memory read from the tasks'
containers.

Needs the Docker engine and the images (`python manage.py build_images`). Uses its own
manager id and a temporary LAB_DATA_DIR, so it touches nothing else on the engine, and it
removes everything it made when it ends (also on Ctrl-C or error). Bounded: --budget
(default 300 s) stops creating early, every wait has a deadline.
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

MIB = 2**20


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cgroup_memory(api, container_id: str) -> dict[str, int]:
    """usage, cache, rss, shmem, inactive_file of a container (bytes)."""
    root = Path("/sys/fs/cgroup/memory/docker") / container_id
    try:
        usage = int((root / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        stat = {k: int(v) for k, v in stat.items()}
    except OSError:
        raw = api.stats(container_id, stream=False, one_shot=True)["memory_stats"]
        usage, stat = raw.get("usage", 0), raw.get("stats", {})
    get = lambda key: stat.get(f"total_{key}", stat.get(key, 0))  # noqa: E731
    return {
        "usage": usage,
        "cache": get("cache"),
        "rss": get("rss"),
        "shmem": get("shmem"),
        "inactive_file": get("inactive_file"),
    }


def place_on_this_node() -> None:
    """The swarm runtime normally puts a new instance on the node with the most unreserved
    memory; the benchmark measures this machine, so only here, in this script, it always
    chooses the local node (another node that has joined the swarm meanwhile, e.g. a
    docker-in-docker test node, must neither get the instances nor break the run)."""
    from instances.runtime.swarm import SwarmRuntime

    SwarmRuntime._choose_node = lambda self, memory_mb: self.local_node


def container_id(runtime, api, name: str, component: str) -> str:
    """The id of the running container of an instance's db or redis (docker or swarm)."""
    if runtime.name == "swarm":
        service = runtime._service(name, component)
        task, _ = runtime._current_task(service["ID"])
        return runtime._task_container(task)
    return api.inspect_container(runtime.container_name(name, component))["Id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5, help="instances to create (default 5)")
    parser.add_argument("--idle", type=float, default=20, help="seconds idle before memory is read (default 20)")
    parser.add_argument("--budget", type=float, default=300, help="stop creating after this many seconds")
    parser.add_argument("--runtime", choices=["docker", "swarm"], default="docker",
                        help="the backend to create the instances on (default docker)")
    parser.add_argument("--manager-id", default="", help="the manager id its resources carry (default: b + random)")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="labbench-")
    os.environ["LAB_DATA_DIR"] = data_dir
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
    import django

    django.setup()
    from django.conf import settings

    from instances.runtime.base import InstanceSpec, RuntimeError_
    from instances.runtime.docker import DockerRuntime
    from tests import docker_helpers as dh

    images = [settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS]
    if not dh.engine_ok():
        print("no Docker engine answers", file=sys.stderr)
        return 2
    if not dh.images_present(*images):
        print(f"images {images} missing: run `python manage.py build_images`", file=sys.stderr)
        return 2

    manager_id = args.manager_id or "b" + dh.new_manager_id()[1:]
    if args.runtime == "swarm":
        from instances.runtime.swarm import SwarmRuntime

        place_on_this_node()
        runtime = SwarmRuntime(manager_id=manager_id, ready_timeout=60)
        if not runtime.available():
            print("the Docker engine is not a swarm manager (docker swarm init)", file=sys.stderr)
            return 2
    else:
        runtime = DockerRuntime(manager_id=manager_id, ready_timeout=60)
    api = dh.api()
    started = time.monotonic()
    rows = []
    try:
        for i in range(args.count):
            if time.monotonic() - started > args.budget:
                print(f"budget of {args.budget:g} s used up after {i} instances", file=sys.stderr)
                break
            name = f"bench{i}"
            spec = InstanceSpec(name=name, db_name="otree", db_user="otree", db_password=f"pw-{i}-bench",
                                memory_mb=512, cpus=1.0)
            t0 = time.perf_counter()
            state = runtime.ensure(spec)
            elapsed = time.perf_counter() - t0
            if not state.services_ready:
                raise RuntimeError_(f"{name}: ensure returned but services are not ready: {state}")
            rows.append({"name": name, "create": elapsed})
            print(f"  {name}: ready for code after {elapsed:.2f} s", file=sys.stderr)

        print(f"  idle for {args.idle:g} s ...", file=sys.stderr)
        time.sleep(args.idle)
        for row in rows:
            for component in ("db", "redis"):
                cid = container_id(runtime, api, row["name"], component)
                row[component] = cgroup_memory(api, cid)
        for row in rows:
            t0 = time.perf_counter()
            runtime.remove(row["name"])
            row["remove"] = time.perf_counter() - t0
    finally:
        if args.runtime == "swarm":
            from tests.swarm_helpers import purge as swarm_purge

            swarm_purge(manager_id)
        dh.purge(manager_id)  # (also the firewall chains of `manager_id`)
        shutil.rmtree(data_dir, ignore_errors=True)

    if not rows:
        return 1

    def idle(row, component):  # the goal's measure: usage minus page cache
        m = row[component]
        return (m["usage"] - m["cache"]) / MIB

    def resident(row, component):  # anonymous memory plus shared memory (PostgreSQL's buffers)
        m = row[component]
        return (m["rss"] + m["shmem"]) / MIB

    print()
    print(f"{len(rows)} instances on the {args.runtime} runtime, {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
          f"Python {platform.python_version()}, images {', '.join(images)}")
    print()
    print("| instance | create → ready (s) | remove (s) | db MiB | redis MiB | idle MiB (usage − cache) "
          "| rss + shmem MiB | usage incl. cache MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        total = idle(row, "db") + idle(row, "redis")
        res = resident(row, "db") + resident(row, "redis")
        print(f"| {row['name']} | {row['create']:.2f} | {row['remove']:.2f} | {idle(row, 'db'):.1f} | "
              f"{idle(row, 'redis'):.1f} | {total:.1f} | {res:.1f} | "
              f"{(row['db']['usage'] + row['redis']['usage']) / MIB:.1f} |")
    creates = [r["create"] for r in rows]
    totals = [idle(r, "db") + idle(r, "redis") for r in rows]
    residents = [resident(r, "db") + resident(r, "redis") for r in rows]
    print()
    print(f"create → ready: median {statistics.median(creates):.2f} s, p95 {percentile(creates, 95):.2f} s, "
          f"max {max(creates):.2f} s (goal: median ≤ 3 s)")
    print(f"idle instance (db + redis, usage − page cache): median {statistics.median(totals):.1f} MiB, "
          f"max {max(totals):.1f} MiB (goal: ≤ 40 MiB); rss + shmem median {statistics.median(residents):.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
