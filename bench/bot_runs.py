#!/usr/bin/env python
"""Bot runs with a zero-latency fake model: how fast, how small, how well paced.

Sets up a throw-away manager (temporary LAB_DATA_DIR: SQLite, the embedded Redis),
deploys the bot tests' oTree 6 project on Docker the way an instance deploys (image
build with pip, its own PostgreSQL and Redis), starts the fake OpenAI-compatible server
(tests/fake_llm.py) in its own process, and runs bot runs in this process exactly as the
worker task does (`bots.tasks.run_bots`):

1. `--runs` times the 3-player, 3-round guessing game with 3 bots (wait pages after every
   guess): seconds from the task's start to the run's end, session creation included
   (goal: under 3 s);
2. `--runs-50` times 50 bots in one session (the same game with the whole session as one
   group), each in a fresh worker process: duration, and that process's memory while they
   play — its peak RSS minus its RSS after a 1-bot warm-up run (imports, connections),
   divided by 50 (goal: under 10 MiB per bot);
3. `--runs-pace` times 50 bots at a rate limit of `--rate` requests per minute: the rate
   at which the fake server received the model requests while the bots had more to send
   than the limit allows (each round's burst: 50 bots want an answer at once), as requests
   per minute (goal: within 5% of the limit). Between rounds nobody asks the model (oTree's
   wait page, the results page), so those gaps are not counted.

Medians of the runs are printed as a table. Needs a Docker engine with the images
(`python manage.py build_images`); everything it created is removed at the end.

    .venv/bin/python bench/bot_runs.py [--runs 5] [--runs-50 3] [--runs-pace 3] [--rate 300]
"""

import argparse
import os
import platform
import shutil
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
# The measuring worker processes (--child) use the parent's data dir: its database and Redis.
DATA_DIR = os.environ.get("LAB_BENCH_DATA_DIR") or tempfile.mkdtemp(prefix="lab-bench-bots-", dir="/tmp")
os.environ["LAB_DATA_DIR"] = os.environ["LAB_BENCH_DATA_DIR"] = DATA_DIR
for name in ("REDIS_URL", "DATABASE_URL"):
    os.environ.pop(name, None)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
os.environ["LAB_LOG_LEVEL"] = "WARNING"
os.environ["LAB_THROTTLE_BOT_RUN"] = "off"  # the benchmark starts runs back to back

import django  # noqa: E402

django.setup()

import httpx2  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from bots import services  # noqa: E402
from bots.models import BotRun, ModelCall, Provider  # noqa: E402
from bots.tasks import run_bots  # noqa: E402
from manager import datadir, embedded_redis  # noqa: E402
from manager.accounts.models import User  # noqa: E402
from tests import bots_otree  # noqa: E402

NAME = "bench-bots"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Samples this process's RSS every 20 ms while active."""

    def __enter__(self):
        self.peak = rss_mib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self.peak = max(self.peak, rss_mib())


def new_run(owner, instance, provider, config, participants, rate, concurrency):
    services.enqueue = lambda run: None  # this process plays the run itself (below)
    return services.create_run(owner, instance, session_config=config, num_participants=participants,
                               num_bots=participants, provider=provider, model="fake-1", rate_limit=rate,
                               concurrency=concurrency, temperature=0.5)


def play(run) -> float:
    start = time.perf_counter()
    run_bots.apply(args=[run.pk])
    elapsed = time.perf_counter() - start
    run.refresh_from_db()
    if run.status != "finished" or "gave up" in run.status_reason:
        raise SystemExit(f"run #{run.number} did not finish: {run.status} {run.status_reason}")
    return elapsed


def fake_times(fake_url: str) -> list[float]:
    return httpx2.post(fake_url.removesuffix("/v1") + "/stats", json={}, timeout=10).json()["times"]


def burst_rates(times: list[float], rate: int) -> list[float]:
    """Requests per minute within each burst (arrivals closer than 5 intervals together)."""
    times = sorted(times)
    gap = 5 * 60 / rate
    bursts, current = [], [times[0]]
    for t in times[1:]:
        if t - current[-1] > gap:
            bursts.append(current)
            current = []
        current.append(t)
    bursts.append(current)
    return [(len(b) - 1) / (b[-1] - b[0]) * 60 for b in bursts if len(b) >= 10]


def child(run_id: int, warmup_id: int) -> None:
    """In a fresh process: a 1-bot warm-up run, then the measured run; prints JSON."""
    import json

    play(BotRun.objects.get(pk=warmup_id))
    base = rss_mib()
    with PeakRSS() as mem:
        elapsed = play(BotRun.objects.get(pk=run_id))
    print(json.dumps({"elapsed": elapsed, "base": base, "peak": mem.peak}))


def measured_in_child(run, warmup) -> dict:
    import json

    out = subprocess.run([sys.executable, __file__, "--child", str(run.pk), str(warmup.pk)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"the measuring worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of the 3-bot game")
    parser.add_argument("--runs-50", type=int, default=3, help="runs of 50 bots in one session")
    parser.add_argument("--runs-pace", type=int, default=3, help="paced runs of 50 bots")
    parser.add_argument("--rate", type=int, default=300, help="rate limit of the paced runs (requests per minute)")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    sock = datadir.redis_socket_path()
    redis = embedded_redis.start(settings.DATA_DIR, sock, stdout=subprocess.DEVNULL)
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_llm"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
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
        play(new_run(owner, instance, provider, "guess", 3, 6000, 10))  # warm-up (connections, imports)
        fake_times(fake_url)

        small = [play(new_run(owner, instance, provider, "guess", 3, 6000, 10)) for _ in range(args.runs)]
        calls_small = ModelCall.objects.filter(run=BotRun.objects.latest("pk")).count()

        big, per_bot, bases = [], [], []
        for _ in range(args.runs_50):
            warmup = new_run(owner, instance, provider, "survey", 1, 6000, 1)
            result = measured_in_child(new_run(owner, instance, provider, "crowd", 50, 6000, 50), warmup)
            big.append(result["elapsed"])
            bases.append(result["base"])
            per_bot.append((result["peak"] - result["base"]) / 50)
        fake_times(fake_url)

        rates = []
        for _ in range(args.runs_pace):
            play(new_run(owner, instance, provider, "crowd", 50, args.rate, 50))
            rates.extend(burst_rates(fake_times(fake_url), args.rate))
    finally:
        if deployed:
            bots_otree.remove(NAME)
        if fake.poll() is None:
            fake.stdin.close()
            fake.wait(timeout=10)
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(DATA_DIR, ignore_errors=True)

    med = statistics.median
    error = (med(rates) - args.rate) / args.rate * 100
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    print(f"\n{os.cpu_count()} cores, Debian {debian}, Python {platform.python_version()}, oTree 6.0.15 on Docker; "
          "fake model answering at once\n")
    print("| measure | runs | median | min | max | goal |")
    print("|---|---|---|---|---|---|")
    print(f"| 3-player 3-round game, 3 bots ({calls_small} model calls): start → finished | {len(small)} | "
          f"{med(small):.2f} s | {min(small):.2f} s | {max(small):.2f} s | < 3 s |")
    print(f"| 50 bots in one session, 3 rounds: start → finished | {len(big)} | {med(big):.2f} s | {min(big):.2f} s | "
          f"{max(big):.2f} s | — |")
    print(f"| memory per bot (peak RSS − RSS after warm-up {med(bases):.0f} MiB, ÷ 50) | {len(per_bot)} | "
          f"{med(per_bot):.2f} MiB | {min(per_bot):.2f} MiB | {max(per_bot):.2f} MiB | < 10 MiB |")
    worst = max(abs(r - args.rate) for r in rates) / args.rate * 100
    print(f"| pacing at {args.rate}/min, 50 bots: requests received per minute, per burst | {len(rates)} bursts | "
          f"{med(rates):.0f}/min ({error:+.1f}%) | {min(rates):.0f} | {max(rates):.0f} (worst {worst:.1f}% off) | "
          "within 5% |")


if __name__ == "__main__":
    main()
