#!/usr/bin/env python
"""Dashboard response time with many instances.

Creates a throw-away manager database (SQLite in a temporary LAB_DATA_DIR, the embedded
default) with N instances owned by 20 experimenters, then requests the dashboard as a
lab manager (who sees all of them) and as one experimenter, through Django's full
request stack (middleware, sessions, templates; no network). Prints median and p95 of
several rounds.

    .venv/bin/python bench/dashboard.py [--instances 200] [--requests 60] [--rounds 5]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="labbench-")
    os.environ.update({"LAB_DATA_DIR": data_dir, "DJANGO_SETTINGS_MODULE": "manager.settings"})
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    sys.path.insert(0, str(ROOT))
    from manager import datadir, embedded_redis

    sock = datadir.redis_socket_path()
    redis_proc = embedded_redis.start(Path(data_dir), sock, stdout=subprocess.DEVNULL)
    try:
        embedded_redis.wait_ready(sock, proc=redis_proc)
        import django

        django.setup()
        from django.core.management import call_command
        from django.test import Client
        from django.test.utils import setup_test_environment

        setup_test_environment()
        call_command("migrate", verbosity=0)
        from instances.models import Instance
        from manager.accounts.models import User

        boss = User.objects.create_user("boss", "boss@lab.test", "x", is_superuser=True, is_staff=True)
        owners = [User.objects.create_user(f"exp{i}", f"exp{i}@lab.test", "x") for i in range(20)]
        statuses = [s for s, _ in Instance.Status.choices]
        Instance.objects.bulk_create([
            Instance(name=f"study-{i:03d}", owner=owners[i % len(owners)], status=statuses[i % len(statuses)],
                     public_port=18000 + i)
            for i in range(args.instances)
        ])

        rows = []
        for label, user in (("lab manager (all instances)", boss), ("experimenter (own instances)", owners[0])):
            client = Client()
            client.force_login(user)
            assert client.get("/").status_code == 200  # warm-up
            medians, p95s = [], []
            for _ in range(args.rounds):
                times = []
                for _ in range(args.requests):
                    start = time.perf_counter()
                    response = client.get("/")
                    times.append((time.perf_counter() - start) * 1000)
                    assert response.status_code == 200
                times.sort()
                medians.append(statistics.median(times))
                p95s.append(times[int(0.95 * (len(times) - 1))])
            visible = Instance.objects.count() if user.is_superuser else user.instances.count()
            rows.append((label, visible, statistics.median(medians), statistics.median(p95s)))
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"\nDashboard GET / with {args.instances} instances; {args.rounds} rounds of {args.requests} requests, "
          f"median of the rounds (ms)\n")
    print(f"| {'viewer':30} | {'rows':>5} | {'median':>7} | {'p95':>7} |")
    print(f"|{'-' * 32}|{'-' * 7}|{'-' * 9}|{'-' * 9}|")
    for label, visible, median, p95 in rows:
        print(f"| {label:30} | {visible:5d} | {median:7.1f} | {p95:7.1f} |")


if __name__ == "__main__":
    main()
