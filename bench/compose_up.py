#!/usr/bin/env python
"""The compose install (docker-compose.yml): how long from `up -d` to the login page over
HTTPS, and how much memory do the manager's services use when idle?

    .venv/bin/python bench/compose_up.py                  # 3 cold + 3 restart runs, memory
    .venv/bin/python bench/compose_up.py --runs 5 --settle 60
    .venv/bin/python bench/compose_up.py --build          # rebuild otree-lab/manager first

Its own compose project (`otl-bench-<pid>`), its own env file (LAB_TLS=internal, manager
on https://localhost:29443, instances on 127.0.0.1:29100-29199, daphne on 127.0.0.1:29000,
git SSH on 127.0.0.1:29022; `--port-base` moves them all), run as
`LAB_ENV_FILE=f docker-compose --env-file f -p NAME ...` like the README says:

- cold: fresh volumes (`down -v` before), the manager image already built: from
  `up -d` to the first 200 of `GET https://localhost:29443/accounts/login/` (the internal
  CA's certificate is made in that time; not verified by the client);
- restart: `up -d --force-recreate` of the same volumes, to the same answer (polling starts
  when `up -d` returns: the old containers are gone then);
- idle memory: once every service reports healthy (no instance), after --settle seconds,
  --samples readings (--interval s apart: the beat's sweeps every 60 s make the
  workers' pools grow and shrink) of each container's cgroup (v1 `memory.usage_in_bytes` minus
  `total_inactive_file`, what `docker stats` shows; the engine's stats where the cgroup
  files are not readable), the median per service and of the total.

Needs Docker, docker-compose (1.29 or `docker compose`), and the images
(otree-lab/manager, postgres:15, redis:7). Cleans up when it ends (also on Ctrl-C or
error): `exec -T worker python manage.py firewall --remove`, `down -v`, its temp folder.
Every wait is bounded (--timeout per start, --health-timeout for health).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
MIB = 2**20
MANAGER_SERVICES = ["web", "worker", "bots", "beat", "git", "caddy", "db", "redis"]


def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    sys.exit("docker-compose (or the compose plugin) is missing")


class Project:
    def __init__(self, name: str, env_file: Path, verbose: bool):
        self.name, self.env_file, self.verbose = name, env_file, verbose
        self.base = [*compose_cmd(), "-f", str(BASE_DIR / "docker-compose.yml"),
                     "--env-file", str(env_file), "-p", name]
        self.env = {**os.environ, "LAB_ENV_FILE": str(env_file)}

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.base, *args], env=self.env, cwd=BASE_DIR, timeout=timeout,
                              capture_output=not self.verbose, text=True)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {(proc.stderr or '')[-2000:]}")
        return proc

    def containers(self) -> dict[str, str]:
        """{service: container id} of the running containers (not the one-shot migrate)."""
        out = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter",
                              f"label=com.docker.compose.project={self.name}"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        if not out:
            return {}
        info = json.loads(subprocess.run(["docker", "inspect", *out], capture_output=True, text=True,
                                         timeout=30).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c["Id"] for c in info}

    def health(self) -> dict[str, str]:
        ids = self.containers()
        if not ids:
            return {}
        info = json.loads(subprocess.run(["docker", "inspect", *ids.values()], capture_output=True,
                                         text=True, timeout=30).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]:
                c["State"].get("Health", {}).get("Status", c["State"]["Status"]) for c in info}

    def exists(self) -> bool:
        return bool(subprocess.run(["docker", "ps", "-aq", "--filter",
                                    f"label=com.docker.compose.project={self.name}"],
                                   capture_output=True, text=True, timeout=30).stdout.strip())

    def down(self) -> None:
        """The firewall rules first (the README's order), then containers and volumes."""
        if "worker" in self.containers():
            try:
                self.run("exec", "-T", "worker", "python", "manage.py", "firewall", "--remove",
                         timeout=120, check=False)
            except subprocess.TimeoutExpired:
                print("  (firewall --remove timed out)", file=sys.stderr)
        self.run("down", "-v", "--remove-orphans", "-t", "20", timeout=300, check=False)


def login_answers(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            return resp.status == 200 and b"password" in resp.read().lower()
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def timed_up(project: Project, url: str, timeout: float, *extra: str) -> tuple[float, float]:
    """(seconds until `up -d` returned, seconds until the login page answered)."""
    t0 = time.monotonic()
    project.run("up", "-d", *extra, timeout=timeout)
    t_up = time.monotonic() - t0
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if login_answers(url):
            return t_up, time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the login page {url} did not answer within {timeout:.0f} s: {project.health()}")


def wait_healthy(project: Project, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        states = project.health()
        if states and all(s == "healthy" for s in states.values()):
            return time.monotonic() - t0
        time.sleep(2)
    raise RuntimeError(f"not every service healthy within {timeout:.0f} s: {project.health()}")


def memory(container_id: str) -> tuple[int, int]:
    """(usage minus inactive_file as `docker stats` shows it, rss + shmem) in bytes."""
    root = Path("/sys/fs/cgroup/memory/docker") / container_id
    try:
        usage = int((root / "memory.usage_in_bytes").read_text())
        stat = {k: int(v) for k, v in (line.split() for line in (root / "memory.stat").read_text().splitlines())}
    except OSError:
        raw = json.loads(subprocess.run(
            ["curl", "-s", "--unix-socket", "/var/run/docker.sock",
             f"http://localhost/containers/{container_id}/stats?stream=false"],
            capture_output=True, text=True, timeout=30).stdout)["memory_stats"]
        usage, stat = raw.get("usage", 0), raw.get("stats", {})
    get = lambda key: stat.get(f"total_{key}", stat.get(key, 0))  # noqa: E731
    return usage - get("inactive_file"), get("rss") + get("shmem")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument("--settle", type=float, default=30, help="idle seconds before the memory samples")
    parser.add_argument("--samples", type=int, default=13, help="memory samples, --interval apart")
    parser.add_argument("--interval", type=float, default=10, help="seconds between memory samples (13 x 10 s: two sweep cycles)")
    parser.add_argument("--timeout", type=float, default=300, help="bound of one up -d to the login page")
    parser.add_argument("--health-timeout", type=float, default=240)
    parser.add_argument("--port-base", type=int, default=29000)
    parser.add_argument("--build", action="store_true", help="docker-compose build first")
    parser.add_argument("--no-times", action="store_true", help="only the idle memory (one cold start)")
    parser.add_argument("--no-memory", action="store_true", help="only the start times")
    parser.add_argument("--verbose", action="store_true", help="show compose's output")
    args = parser.parse_args()

    pb = args.port_base
    tmp = Path(tempfile.mkdtemp(prefix="otl-bench-compose-"))
    (tmp / "tls").mkdir()
    env_file = tmp / "lab.env"
    env_file.write_text("\n".join([
        "LAB_PUBLIC_HOST=localhost", "LAB_INSTANCE_HOST=127.0.0.1", "LAB_TLS=internal",
        f"LAB_HTTPS_PORT={pb + 443}", f"LAB_HTTP_PORT={pb + 80}",
        "LAB_HOST=127.0.0.1", f"LAB_PORT={pb}",
        f"LAB_SSH_PORT={pb + 22}", "LAB_SSH_BIND=127.0.0.1",
        f"LAB_INSTANCE_PORTS={pb + 100}-{pb + 199}",
        f"LAB_TLS_DIR={tmp / 'tls'}", "LAB_NAME=Bench Lab", "",
    ]))
    env_file.chmod(0o600)
    project = Project(f"otl-bench-{os.getpid()}", env_file, args.verbose)
    url = f"https://localhost:{pb + 443}/accounts/login/"

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    cold: list[tuple[float, float]] = []
    restart: list[tuple[float, float]] = []
    samples: dict[str, list[float]] = {}
    rss: dict[str, list[float]] = {}
    totals: list[float] = []
    try:
        if args.build:
            t0 = time.monotonic()
            project.run("build", timeout=1800)
            print(f"build: {time.monotonic() - t0:.1f} s")
        if subprocess.run(["docker", "image", "inspect", "otree-lab/manager:latest"],
                          capture_output=True).returncode:
            sys.exit("the image otree-lab/manager is missing: --build (or docker-compose build)")
        runs_cold = 1 if args.no_times else args.runs
        for i in range(runs_cold):
            if project.exists():
                project.down()
            cold.append(timed_up(project, url, args.timeout))
            print(f"cold {i + 1}: up -d returned {cold[-1][0]:.1f} s, login page {cold[-1][1]:.1f} s", flush=True)
        for i in range(0 if args.no_times else args.runs):
            restart.append(timed_up(project, url, args.timeout, "--force-recreate"))
            print(f"restart {i + 1}: up -d returned {restart[-1][0]:.1f} s, login page {restart[-1][1]:.1f} s",
                  flush=True)
        if not args.no_memory:
            healthy = wait_healthy(project, args.health_timeout)
            print(f"all healthy after {healthy:.0f} s more; settling {args.settle:.0f} s", flush=True)
            time.sleep(args.settle)
            for _ in range(args.samples):
                total = 0.0
                for service, cid in project.containers().items():
                    used, resident = memory(cid)
                    samples.setdefault(service, []).append(used / MIB)
                    rss.setdefault(service, []).append(resident / MIB)
                    total += used / MIB
                totals.append(total)
                time.sleep(args.interval)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        print("cleaning up...", flush=True)
        project.down()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"compose install, {os.cpu_count()} cores, {platform.platform()}, "
          f"{time.strftime('%Y-%m-%d')}, project {project.name}")
    if cold or restart:
        print()
        print("| case | runs | up -d returned (median) | login page over HTTPS (median) | max |")
        print("|---|---|---|---|---|")
        for label, rows in (("cold (fresh volumes)", cold), ("restart (up -d --force-recreate)", restart)):
            if rows:
                print(f"| {label} | {len(rows)} | {median([r[0] for r in rows]):.1f} s | "
                      f"{median([r[1] for r in rows]):.1f} s | {max(r[1] for r in rows):.1f} s |")
    if not totals:
        return 0
    print()
    print(f"Idle memory, all healthy, no instance, {args.settle:.0f} s settle, median of {len(totals)} samples:")
    print()
    print("| service | MiB (docker stats) | MiB (rss + shmem) |")
    print("|---|---|---|")
    order = sorted(samples, key=lambda s: -median(samples[s]))
    for service in order:
        print(f"| {service} | {median(samples[service]):.1f} | {median(rss[service]):.1f} |")
    print(f"| **total** | **{median(totals):.1f}** | {sum(median(rss[s]) for s in order):.1f} |")
    goal = median(totals) < 600
    print(f"\ntotal over the samples: min {min(totals):.1f}, max {max(totals):.1f} MiB (the beat's sweeps "
          "every 60 s start pool processes for a while)")
    print(f"goal: idle total (median) under 600 MiB: {'yes' if goal else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
