#!/usr/bin/env python
"""How long is an instance down when a lab manager moves it to another swarm node?

Starts a second swarm node on this machine (a docker-in-docker worker, tests/swarm_node.py;
its dockerd trusts the lab's plain-HTTP registry), makes one instance with a small HTTP app
and a table of `--rows` rows on this machine's node, then moves it to the second node and
back `--runs` times (`SwarmRuntime.move_instance`: app stopped, pg_dump, PostgreSQL and
Redis started on the target, pg_restore, app started, old volume removed), checks the rows
after each move, and prints the medians of each direction. The first move to the node also
pulls the images there through the registry (shown apart, not in the medians).

    .venv/bin/python bench/swarm_move.py              # 3 round trips, 10 000 rows
    .venv/bin/python bench/swarm_move.py --runs 5 --rows 100000

Needs root, the engine as a swarm manager (`docker swarm init --advertise-addr <docker0's
address>`, so the node can join), the images (`python manage.py build_images`). Uses its own
manager id and removes the node and everything it made when it ends.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="round trips (default 3)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows in the instance's table (default 10 000)")
    args = parser.parse_args()
    os.environ["LAB_DATA_DIR"] = tempfile.mkdtemp(prefix="labbench-move-")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
    import django

    django.setup()
    from django.conf import settings

    from instances.runtime.base import AppSpec, InstanceSpec
    from instances.runtime.swarm import SwarmRuntime
    from tests import docker_helpers as dh
    from tests import swarm_helpers, swarm_node

    if not swarm_helpers.swarm_state().get("ControlAvailable"):
        print("the engine is not a swarm manager: docker swarm init --advertise-addr <docker0's address>",
              file=sys.stderr)
        return 2
    manager_id = "bmv" + secrets.token_hex(4)
    manager = swarm_node.manager_address().rpartition(":")[0]
    node = swarm_node.start_node(dockerd_args=(f"--insecure-registry={ipaddress.ip_network(manager + '/16', strict=False)}",),
                                 prefix="benchmv-node-", prefer_offline=False)
    rt = SwarmRuntime(manager_id=manager_id, ready_timeout=180)
    rt._choose_node = lambda memory_mb: rt.local_node  # the instance starts on this machine's node
    name, password = "bench-move", "pw-bench-move-123"
    spec = InstanceSpec(name=name, db_name="otree", db_user="otree", db_password=password, memory_mb=256, cpus=0.5,
                        app=AppSpec(image=settings.LAB_IMAGE_PYTHON, command=["python", "-m", "http.server", "8000"],
                                    release_id="bench"))
    times = {"to the node": [], "back": []}
    first = None
    try:
        rt.ensure(spec)
        db = rt._task_container(rt._running_db(name))
        code, out = rt._exec(db, ["psql", "-U", "otree", "-d", "otree", "-qc",
                                  f"CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1,{args.rows}) g"],
                             user="postgres")
        assert code == 0, out
        work = Path(tempfile.mkdtemp(prefix="labbench-move-dumps-"))
        for run in range(args.runs + 1):
            for direction, target in (("to the node", node.node_id), ("back", rt.local_node)):
                started = time.monotonic()
                rt.move_instance(name, spec, target, dump=work / f"{run}-{direction}.dump")
                seconds = time.monotonic() - started
                state = rt.state(name)
                assert state.app.health.value == "running", state
                if run == 0 and direction == "to the node":
                    first = seconds  # the images reach the node through the registry
                else:
                    times[direction].append(seconds)
                print(f"run {run} {direction}: {seconds:.1f} s", flush=True)
        db = rt._task_container(rt._running_db(name))
        code, out = rt._exec(db, ["psql", "-U", "otree", "-d", "otree", "-tAc", "SELECT count(*) FROM t"],
                             user="postgres")
        assert code == 0 and out.strip() == str(args.rows), out
    finally:
        try:
            rt.remove(name)
        finally:
            swarm_helpers.purge(manager_id)
            dh.purge(manager_id)
            node.remove()
    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; {time.strftime('%Y-%m-%d')}")
    print(f"instance: PostgreSQL with {args.rows} rows, a small HTTP app; {args.runs} round trips")
    print(f"| move | median | min | max |\n|---|---|---|---|")
    print(f"| first move to a new node (images pulled through the registry) | {first:.1f} s | | |")
    for direction, values in times.items():
        label = "this machine → second node" if direction == "to the node" else "second node → this machine"
        print(f"| {label} | {statistics.median(values):.1f} s | {min(values):.1f} s | {max(values):.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
