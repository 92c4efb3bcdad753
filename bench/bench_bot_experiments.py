#!/usr/bin/env python
"""Bot experiments with a zero-latency fake model: is the rate limit the bottleneck, and
how much memory does the bots worker take while 5 runs play at once?

Sets up a throw-away manager (temporary LAB_DATA_DIR: SQLite, the embedded Redis, and
LAB_BOT_RUNS=5), deploys the bot tests' oTree 6 project on Docker the way an instance
deploys, starts the fake OpenAI-compatible server (tests/fake_llm.py) in its own process
and a real Celery worker on the `bots` queue (5 processes, as `LAB_BOT_RUNS=5` starts it).
Then, `--repeats` times each:

1. an experiment of 20 runs x 3 bots (the 3-player, 3-round guessing game: 9 model calls
   a run, 180 in all), 5 runs at once, with the provider's lab-wide limit at `--rate`
   requests per minute: the time from creating the experiment to its end, runs per minute,
   and the rate at which the fake server received the model requests (first to last
   request) next to the limit — when the limit is the bottleneck, the two agree;
2. the same experiment without a limit (the manager's own speed, for comparison), while
   the worker's memory is sampled every 20 ms: the peak RSS of the worker (its main
   process and its 5 children together) while 5 runs play at once, and before the
   experiment (idle, after a warm-up run in every child).

Medians of the repeats are printed as a table. Needs a Docker engine with the images
(`python manage.py build_images`); everything it created is removed at the end.

    .venv/bin/python bench/bench_bot_experiments.py [--repeats 3] [--rate 240]
"""

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
DATA_DIR = tempfile.mkdtemp(prefix="lab-bench-exp-", dir="/tmp")
os.environ["LAB_DATA_DIR"] = DATA_DIR
for name in ("REDIS_URL", "DATABASE_URL"):
    os.environ.pop(name, None)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
os.environ["LAB_LOG_LEVEL"] = "WARNING"
os.environ["LAB_THROTTLE_BOT_RUN"] = "off"  # the benchmark starts experiments back to back
os.environ["LAB_BOT_RUNS"] = "5"

import django  # noqa: E402

django.setup()

import httpx2  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from bots import experiments  # noqa: E402
from bots.models import BotExperiment, BotRun, Provider  # noqa: E402
from manager import datadir, embedded_redis  # noqa: E402
from manager.accounts.models import User  # noqa: E402
from tests import bots_otree  # noqa: E402

NAME = "bench-exp"
RUNS, BOTS, PARALLEL = 20, 3, 5


def group_rss_mib(pid: int) -> float:
    """RSS of process `pid` and its children (the prefork pool), MiB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class PeakRSS:
    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        self.peak = group_rss_mib(self.pid)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, group_rss_mib(self.pid))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


def fake_times(fake_url: str) -> list[float]:
    return httpx2.post(fake_url.removesuffix("/v1") + "/stats", json={}, timeout=10).json()["times"]


def run_experiment(owner, instance, provider, *, runs: int, config: str = "guess", bots: int = BOTS,
                   timeout: float = 900) -> tuple[float, BotExperiment]:
    design = {"session_config": config, "num_participants": bots, "num_bots": bots,
              "models": [{"provider": provider.name, "model": "fake-1"}], "temperatures": [0.5],
              "repetitions": runs, "max_parallel": PARALLEL, "rate_limit": 6000, "concurrency": 10}
    start = time.perf_counter()
    experiment = experiments.create_experiment(owner, instance, design)
    deadline = time.monotonic() + timeout
    while True:
        experiment.refresh_from_db()
        if not experiment.is_active:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"experiment #{experiment.number} did not end in {timeout} s: "
                             f"{experiments.progress(experiment)}")
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    if experiment.status != "finished" or experiment.runs.exclude(status="finished").exists():
        bad = experiment.runs.exclude(status="finished").first()
        raise SystemExit(f"experiment #{experiment.number}: {experiment.status_reason}; "
                         f"e.g. run #{bad.number}: {bad.status_reason}")
    return elapsed, experiment


def max_overlap(experiment) -> int:
    runs = list(experiment.runs.all())
    edges = sorted([(r.started_at, 1) for r in runs] + [(r.finished_at, -1) for r in runs], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _t, step in edges:
        now += step
        most = max(most, now)
    return most


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="experiments of each kind")
    parser.add_argument("--rate", type=int, default=240, help="the provider's lab-wide limit (requests per minute)")
    args = parser.parse_args()

    sock = datadir.redis_socket_path()
    redis = embedded_redis.start(settings.DATA_DIR, sock, stdout=subprocess.DEVNULL)
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_llm"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    worker = None
    deployed = False
    try:
        embedded_redis.wait_ready(sock, proc=redis)
        call_command("migrate", verbosity=0)
        fake_url = fake.stdout.readline().strip()
        owner = User.objects.create_user("bench", "bench@lab.test", "pw-bench-123456")
        print("deploying the oTree 6 test project (image build, PostgreSQL, Redis) …", flush=True)
        started = time.perf_counter()
        deployed = bots_otree.deploy(owner, NAME)
        print(f"  deployed in {time.perf_counter() - started:.1f} s at {deployed.app_url}", flush=True)
        from instances.models import Instance

        instance = Instance.objects.get(name=NAME)
        provider = Provider.objects.create(name="Fake", base_url=fake_url, api_key="sk-bench",
                                           offered_models=[{"name": "fake-1"}])
        log = open(Path(DATA_DIR) / "worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "manager", "worker", "-Q", "bots", "-l",
                                   "WARNING", "-c", str(PARALLEL), "-P", "prefork", "-n", f"bench-{os.getpid()}@%h"],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        log.close()
        print("warming up the worker (one 5-run experiment) …", flush=True)
        run_experiment(owner, instance, provider, runs=PARALLEL)
        fake_times(fake_url)
        idle = group_rss_mib(worker.pid)

        limited, limited_rates, calls = [], [], 0
        unlimited, peaks, overlaps = [], [], []
        for i in range(args.repeats):
            Provider.objects.filter(pk=provider.pk).update(requests_per_minute=args.rate)
            provider.refresh_from_db()
            elapsed, experiment = run_experiment(owner, instance, provider, runs=RUNS)
            times = sorted(fake_times(fake_url))
            calls = len(times)
            limited.append(elapsed)
            limited_rates.append((len(times) - 1) / (times[-1] - times[0]) * 60)
            print(f"  at {args.rate}/min: {elapsed:.1f} s, {limited_rates[-1]:.0f} requests/min", flush=True)

            Provider.objects.filter(pk=provider.pk).update(requests_per_minute=0)
            provider.refresh_from_db()
            with PeakRSS(worker.pid) as mem:
                elapsed, experiment = run_experiment(owner, instance, provider, runs=RUNS)
            fake_times(fake_url)
            unlimited.append(elapsed)
            peaks.append(mem.peak)
            overlaps.append(max_overlap(experiment))
            print(f"  unlimited: {elapsed:.1f} s, peak RSS {mem.peak:.0f} MiB, {overlaps[-1]} runs at once",
                  flush=True)
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        if deployed:
            bots_otree.remove(NAME)
        if fake.poll() is None:
            fake.stdin.close()
            fake.wait(timeout=10)
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(DATA_DIR, ignore_errors=True)

    med = statistics.median
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\n{os.cpu_count()} cores, {mem_total:.0f} GiB, Debian {debian}, Python {platform.python_version()}, "
          f"oTree 6.0.15 on Docker; fake model answering at once; {RUNS} runs x {BOTS} bots ({calls} model calls), "
          f"{PARALLEL} runs at once, SQLite manager database\n")
    print("| measure | repeats | median | min | max |")
    print("|---|---|---|---|---|")
    floor = (calls - 1) / args.rate * 60
    print(f"| limit {args.rate}/min: experiment start → finished (the limit alone needs {floor:.1f} s) | "
          f"{len(limited)} | {med(limited):.1f} s | {min(limited):.1f} s | {max(limited):.1f} s |")
    print(f"| limit {args.rate}/min: runs per minute | {len(limited)} | {RUNS / med(limited) * 60:.1f} | "
          f"{RUNS / max(limited) * 60:.1f} | {RUNS / min(limited) * 60:.1f} |")
    print(f"| limit {args.rate}/min: model requests received per minute | {len(limited_rates)} | "
          f"{med(limited_rates):.0f} ({(med(limited_rates) - args.rate) / args.rate * 100:+.1f}%) | "
          f"{min(limited_rates):.0f} | {max(limited_rates):.0f} |")
    print(f"| no limit: experiment start → finished | {len(unlimited)} | {med(unlimited):.1f} s | "
          f"{min(unlimited):.1f} s | {max(unlimited):.1f} s |")
    print(f"| no limit: runs per minute | {len(unlimited)} | {RUNS / med(unlimited) * 60:.1f} | "
          f"{RUNS / max(unlimited) * 60:.1f} | {RUNS / min(unlimited) * 60:.1f} |")
    print(f"| bots worker RSS, 5 runs playing at once (main + 5 children; idle {idle:.0f} MiB) | {len(peaks)} | "
          f"{med(peaks):.0f} MiB | {min(peaks):.0f} MiB | {max(peaks):.0f} MiB |")
    print(f"| most runs playing at once (from their start and end times) | {len(overlaps)} | {med(overlaps):.0f} | "
          f"{min(overlaps)} | {max(overlaps)} |")


if __name__ == "__main__":
    main()
