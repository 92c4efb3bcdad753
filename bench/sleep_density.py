#!/usr/bin/env python
"""How many sleeping instances fit on one machine? Memory of N instances with a deployed
oTree app, all awake, then all asleep; the manager's own processes beside them.

Starts a real `manage.py labserver` in a temporary LAB_DATA_DIR (embedded Redis, worker,
git server, Caddy) with `LAB_RUNTIME=process` (default) or `docker`, creates N instances
through the JSON API and pushes the same small oTree 6 project to each with the git client
(the release pipeline's caches make every push after the first cheap: the process
runtime's shared environment, Docker's build cache). Then:

1. awake: after `--idle` seconds, the memory of the manager (the labserver and its
   children: daphne, Celery worker and beat, embedded Redis, Caddy, git server) and of each
   instance (process runtime: PSS of its supervisor and of every process of the instance's
   user — app, PostgreSQL cluster, Redis; Docker: PSS of the processes in its containers
   plus their containerd shims, and the cgroup's usage minus inactive file pages);
2. asleep: every instance is made idle (no request for longer than the lab's sleep time,
   its oTree sessions read: none live) and put to sleep with `instances.sleep.put_to_sleep`
   (what the sleep sweep calls), and the same is measured after `--idle` seconds;
3. the machine's used memory (MemTotal − MemAvailable) before, awake and asleep, as a
   cross-check that includes what PSS cannot see (kernel, page tables, dockerd);
4. disk per sleeping instance (its folder, or its volume; shared environments/images not
   counted per instance but shown once).

PSS (proportional set size, /proc/<pid>/smaps_rollup) counts a page shared by k processes
as 1/k in each, so the sums add up to what the processes really take together.

    .venv/bin/python bench/sleep_density.py                            # 100 instances, process runtime
    .venv/bin/python bench/sleep_density.py --runtime docker --count 40
    LAB_SLEEP_DATABASES=false .venv/bin/python bench/sleep_density.py  # db + redis stay up

Runs as root (the process runtime makes a user per instance). Everything it made is
removed at the end, also on Ctrl-C: each instance is deleted through the manager's own
delete path (the API's DELETE, final backup and all), then whatever is left of its own
manager id (containers, volumes, users, folders) is purged, and the data dir removed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.labserver_helpers import (  # noqa: E402
    BASE_DIR, LabServer, child_env, free_port, migrate, new_data_dir, remove_data_dir, remove_instances,
)
from tests.otree_projects import Checkout, valid_project  # noqa: E402

MIB = 2**20


# --- memory ---------------------------------------------------------------------------------

def pss(pid: int) -> int:
    """PSS of one process in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def uid_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def tree(roots: set[int]) -> set[int]:
    """`roots` and all their descendants (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        children.setdefault(parent_of(pid), []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def machine_used_mib() -> float:
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return (info["MemTotal"] - info["MemAvailable"]) / MIB


def du_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, timeout=120).stdout
    return int(out.split()[0]) if out.strip() else 0


def engine_mib() -> float:
    """PSS of the Docker engine's own processes (dockerd, containerd; not the shims): it
    keeps every container's state, running or not."""
    total = 0
    for pid in all_pids():
        try:
            exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].rsplit(b"/", 1)[-1]
        except OSError:
            continue
        if exe in (b"dockerd", b"containerd"):
            total += pss(pid)
    return total / MIB


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                            text=True).stdout.strip() or "-"
    return (f"{os.cpu_count()} cores ({platform.machine()}), {mem:.1f} GiB, Debian {debian}, kernel "
            f"{platform.release()}, Python {platform.python_version()}, Docker {docker}")


class Instances:
    """Reads the memory of the instances of one runtime (in the bench's process, with the
    labserver's settings)."""

    def __init__(self, runtime: str, manager_id: str):
        self.runtime_name = runtime
        self.manager_id = manager_id
        if runtime == "process":
            from instances.runtime.process import ProcessRuntime

            self.runtime = ProcessRuntime(manager_id=manager_id)
        else:
            import docker

            self.api = docker.APIClient(version="auto")

    def pids(self, name: str) -> set[int]:
        """Every process of the instance (process runtime)."""
        rt = self.runtime
        pids = set(rt.processes(name))
        ids = rt._ids_if_any(name)
        if ids is not None:
            pids |= {pid for pid in all_pids() if uid_of(pid) == ids[0]}
        return tree(pids)

    def containers(self, name: str) -> list[dict]:
        return self.api.containers(filters={"label": [f"org.otree-lab.manager={self.manager_id}",
                                                      f"org.otree-lab.instance={name}"]})

    def memory(self, names: list[str]) -> dict[str, dict]:
        """name -> {pss, cgroup (docker), processes, by component} in MiB."""
        result = {}
        if self.runtime_name == "process":
            for name in names:
                pids = self.pids(name)
                result[name] = {"pss": sum(pss(p) for p in pids) / MIB, "processes": len(pids)}
            return result
        shims = {}
        for pid in all_pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and b"containerd-shim" in cmd[0] and b"-id" in cmd:
                shims[cmd[cmd.index(b"-id") + 1].decode()] = pid
        for name in names:
            row = {"pss": 0.0, "cgroup": 0.0, "processes": 0, "shim": 0.0}
            for c in self.containers(name):
                cg = Path("/sys/fs/cgroup/memory/docker") / c["Id"]
                try:
                    procs = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
                    usage = int((cg / "memory.usage_in_bytes").read_text())
                    stat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
                    usage -= int(stat.get("total_inactive_file", 0))
                except OSError:
                    procs, usage = [], 0
                shim = pss(shims[c["Id"]]) if c["Id"] in shims else 0
                row["pss"] += (sum(pss(p) for p in procs) + shim) / MIB
                row["shim"] += shim / MIB
                row["cgroup"] += usage / MIB
                row["processes"] += len(procs) + (1 if shim else 0)
            result[name] = row
        return result

    def disk(self, names: list[str], data_dir: Path) -> tuple[float, float]:
        """(median MiB on disk per instance, MiB shared by all: environments / images)."""
        if self.runtime_name == "process":
            each = [du_bytes(data_dir / "instances" / n) / MIB for n in names]
            shared = du_bytes(data_dir / "venvs") / MIB
            return statistics.median(each), shared
        each = []
        for n in names:
            total = 0
            for v in self.api.volumes(filters={"label": f"org.otree-lab.instance={n}"}).get("Volumes") or []:
                if (v.get("Labels") or {}).get("org.otree-lab.manager") == self.manager_id:
                    total += du_bytes(Path(v["Mountpoint"]))
            each.append(total / MIB)
        return statistics.median(each), float("nan")


# --- the manager ----------------------------------------------------------------------------

def free_range(count: int) -> int:
    """The first port of `count` consecutive free ports."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        ok = True
        for port in range(base, base + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit(f"no {count} consecutive free ports")


def api(url, token, method="GET", body=None, timeout=30):
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def statuses(server, token) -> dict[str, str]:
    return {i["name"]: i["status"] for i in api(f"{server.url}/api/v1/instances", token)}


def wait_status(server, token, names, wanted: set[str], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = statuses(server, token)
        missing = {n: now.get(n) for n in names if now.get(n) not in wanted}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(missing)} instances not {what} within {timeout:g} s: "
                             f"{dict(list(missing.items())[:5])}")
        time.sleep(1)


class Manager:
    """A labserver of its own with a token, and the bench's process set up with the same
    settings (same database and Redis) so it can call the manager's services directly."""

    def __init__(self, runtime: str, ports: int, echo: bool = False, **extra: str):
        self.data_dir, self.port = new_data_dir(), free_port()
        public = free_range(ports)
        self.extra = {"LAB_INSTANCE_PORTS": f"{public}-{public + ports - 1}", "LAB_RUNTIME": runtime, **extra}
        self.env = child_env(self.data_dir, self.port, **self.extra)
        self.manager_id = os.environ.get("LAB_MANAGER_ID") or hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:10]
        self.work = Path(tempfile.mkdtemp(prefix="bench-sleep-"))
        self.server = None
        self.token = ""
        self.names: list[str] = []
        self.echo = echo

    def start(self) -> None:
        migrate(self.data_dir, self.port)
        self.server = LabServer(self.data_dir, self.port, echo=self.echo, **self.extra)
        self.server.wait_ready(timeout=180)
        self.token = subprocess.run([sys.executable, "manage.py", "create_token", "admin", "--name", "bench"],
                                    cwd=BASE_DIR, env=self.env, capture_output=True, text=True,
                                    check=True).stdout.strip()
        os.environ.update(self.env)
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
        import django

        django.setup()
        import logging

        logging.getLogger("instances").setLevel(logging.WARNING)  # (one line per instance put to sleep)

    def pids(self) -> set[int]:
        """The labserver and every process under it (not the instances' processes: the
        process runtime's supervisors detach themselves)."""
        return tree({self.server.proc.pid})

    def create(self, names: list[str], budget: float) -> list[str]:
        started = time.monotonic()
        for name in names:
            if time.monotonic() - started > budget:
                print(f"  budget of {budget:g} s used up after {len(self.names)} instances", file=sys.stderr)
                break
            api(f"{self.server.url}/api/v1/instances", self.token, "POST", {"name": name, "owner": "admin"})
            self.names.append(name)
        wait_status(self.server, self.token, self.names, {"ready_for_code"}, 60 + 10 * len(self.names),
                    "ready for code")
        return self.names

    def push_all(self, files: dict, parallel: int) -> list[float]:
        checkout = Checkout(self.work / "checkout")
        checkout.commit(files, "the project")

        def one(name):
            remote = f"http://admin:{self.token}@127.0.0.1:{self.port}/git/{name}.git"
            t0 = time.perf_counter()
            code, out = checkout.push_to(remote, timeout=900)
            if "Deployed:" not in out:
                raise SystemExit(f"push to {name} did not deploy:\n{out[-3000:]}")
            return time.perf_counter() - t0

        times = [one(self.names[0])]  # the first one fills the caches
        print(f"  first push: {times[0]:.1f} s", file=sys.stderr)
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            for i, elapsed in enumerate(pool.map(one, self.names[1:]), 2):
                times.append(elapsed)
                if i % 10 == 0:
                    print(f"  {i} pushed (load {load()})", file=sys.stderr)
        return times

    def delete_all(self, timeout: float) -> tuple[int, float]:
        """Delete every instance through the API (the manager's delete path: final backup,
        removal); returns (how many were gone in time, seconds)."""
        t0 = time.monotonic()
        for name in self.names:
            try:
                api(f"{self.server.url}/api/v1/instances/{name}?force=true", self.token, "DELETE")
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    print(f"  delete {name}: {exc.code} {exc.read()[:200]!r}", file=sys.stderr)
        deadline = time.monotonic() + timeout
        left = set(self.names)
        while left and time.monotonic() < deadline:
            left &= set(statuses(self.server, self.token))
            time.sleep(2)
        if left:
            print(f"  {len(left)} instances not deleted within {timeout:g} s (purged below): "
                  f"{sorted(left)[:5]}", file=sys.stderr)
        return len(self.names) - len(left), time.monotonic() - t0

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.kill_everything()
        remove_instances(self.data_dir, self.port, timeout=600, **self.extra)  # what the delete path left
        code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); "
                "django.setup()\nfrom tests import docker_helpers\n"
                f"docker_helpers.engine_ok() and docker_helpers.purge({self.manager_id!r})\n")
        subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=self.env, timeout=600, capture_output=True)
        remove_data_dir(self.data_dir)
        shutil.rmtree(self.work, ignore_errors=True)


def make_idle(name: str, minutes: int = 0):
    """As if instance `name` had had no request (nor a wake or a deploy) for longer than the
    lab's sleep time, with its oTree sessions read now (none live): what the sleep policy
    (`instances.sleep.why_awake`) asks before `put_to_sleep` may stop it. As the tests do
    (tests/instances/test_sleep.py `idle`)."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from instances import sessions
    from instances.models import Instance, Release

    past = timezone.now() - timedelta(minutes=(minutes or settings.LAB_SLEEP_AFTER_MINUTES) + 1)
    # No scheduled backups (0 = off): with its creation in the past a first backup would be
    # due, and a sleeping instance that is due is woken for it.
    Instance.objects.filter(name=name).update(last_request_at=past, woke_at=None, created_at=past,
                                              backup_interval_minutes=0)
    Release.objects.filter(instance__name=name).update(finished_at=past)
    instance = Instance.objects.get(name=name)
    sessions.refresh(instance)
    instance.refresh_from_db()
    return instance


def sleep_one(name: str, reason: str) -> float:
    """Put instance `name` to sleep as the sleep sweep does; returns the seconds
    `put_to_sleep` took (the app, and with LAB_SLEEP_DATABASES its db and redis, stopped)."""
    from instances.sleep import put_to_sleep, why_awake

    for _attempt in range(20):  # (None also when the instance's lock is held at that moment: the minute's sweeps)
        instance = make_idle(name)
        t0 = time.perf_counter()
        if put_to_sleep(instance.pk, reason) is not None:
            return time.perf_counter() - t0
        time.sleep(0.5)
    instance.refresh_from_db()
    raise SystemExit(f"{name} did not fall asleep: {why_awake(instance) or 'its lock stayed busy'} "
                     f"(status {instance.status})")


def put_all_to_sleep(names: list[str]) -> list[float]:
    return [sleep_one(name, "bench: sleep_density") for name in names]


def summary(rows: dict[str, dict], key: str) -> tuple[float, float, float]:
    values = [r[key] for r in rows.values()]
    return (statistics.median(values), sum(values), max(values)) if values else (0.0, 0.0, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="instances (default 100)")
    parser.add_argument("--runtime", choices=["process", "docker"], default="process")
    parser.add_argument("--idle", type=float, default=30, help="seconds before each measurement (default 30)")
    parser.add_argument("--parallel", type=int, default=2, help="pushes at a time after the first (default 2)")
    parser.add_argument("--budget", type=float, default=1800, help="stop creating after this many seconds")
    parser.add_argument("--target", type=int, default=500, help="instances to extrapolate to (default 500)")
    parser.add_argument("--verbose", action="store_true", help="show the labserver's output")
    args = parser.parse_args()
    if os.geteuid() != 0 and args.runtime == "process":
        print("the process runtime makes a user per instance: run as root", file=sys.stderr)
        return 2

    sleep_dbs = os.environ.get("LAB_SLEEP_DATABASES", "true")
    print(f"{machine_facts()}; load before: {load()}", file=sys.stderr)
    used_before = machine_used_mib()
    manager = Manager(args.runtime, args.count, echo=args.verbose)
    result = {}
    try:
        manager.start()
        time.sleep(args.idle)
        result["manager_start"] = sum(pss(p) for p in manager.pids()) / MIB
        result["engine_start"] = engine_mib()
        t0 = time.monotonic()
        names = manager.create([f"sd{i:03d}" for i in range(args.count)], args.budget)
        result["create"] = time.monotonic() - t0
        print(f"  {len(names)} instances ready for code in {result['create']:.0f} s", file=sys.stderr)
        pushes = manager.push_all(valid_project("density"), args.parallel)
        result["pushes"] = pushes
        wait_status(manager.server, manager.token, names, {"running"}, 300, "running")
        reader = Instances(args.runtime, manager.manager_id)

        def measure(label):
            time.sleep(args.idle)
            load_now = load()
            rows = reader.memory(names)
            mgr = sum(pss(p) for p in manager.pids()) / MIB
            if label == "asleep":
                from instances.models import Instance

                woke = list(Instance.objects.filter(name__in=names).exclude(status="sleeping")
                            .values_list("name", "status", "wake_reason"))
                if woke:
                    print(f"  not asleep while measured: {woke}", file=sys.stderr)
                result["woke"] = woke
            result[label] = {"rows": rows, "manager": mgr, "used": machine_used_mib(), "load": load_now,
                             "manager_processes": len(manager.pids()), "engine": engine_mib()}
            print(f"  {label}: instances {summary(rows, 'pss')[1]:.0f} MiB PSS, manager {mgr:.0f} MiB, "
                  f"load {load_now}", file=sys.stderr)

        measure("awake")
        t0 = time.monotonic()
        result["sleep_times"] = put_all_to_sleep(names)
        wait_status(manager.server, manager.token, names, {"sleeping"}, 120, "sleeping")
        print(f"  all asleep after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        measure("asleep")
        result["disk"] = reader.disk(names, manager.data_dir)
        deleted, seconds = manager.delete_all(timeout=120 + 10 * len(names))
        result["deleted"] = (deleted, seconds)
    finally:
        manager.cleanup()
    leftovers = []
    if args.runtime == "docker":
        leftovers = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=org.otree-lab.manager={manager.manager_id}"],
                                   capture_output=True, text=True).stdout.split()
    else:
        import pwd

        leftovers = [e.pw_name for e in pwd.getpwall() if manager.manager_id in e.pw_gecos]

    n = len(names)
    print()
    print(f"{n} instances with a deployed oTree 6 app (tests/otree_projects.valid_project), {args.runtime} runtime, "
          f"LAB_SLEEP_DATABASES={sleep_dbs}; {machine_facts()}")
    print(f"machine used before the labserver: {used_before:.0f} MiB; load average (1/5/15 min) while "
          f"measuring: awake {result['awake']['load']}, asleep {result['asleep']['load']}")
    print()
    docker = args.runtime == "docker"
    print("| state | instance PSS median MiB | instance PSS max | instances total MiB | "
          + ("instances cgroup total MiB | " if docker else "") + "processes per instance | manager PSS MiB | "
          "manager + instances MiB | " + ("Docker engine PSS MiB | " if docker else "") + "machine used MiB |")
    print("|---|---|---|---|" + ("---|" if docker else "") + "---|---|---|" + ("---|" if docker else "") + "---|")
    for label in ("awake", "asleep"):
        r = result[label]
        med, total, high = summary(r["rows"], "pss")
        procs = statistics.median(row["processes"] for row in r["rows"].values())
        cg = f" {summary(r['rows'], 'cgroup')[1]:.0f} |" if docker else ""
        print(f"| {label} | {med:.1f} | {high:.1f} | {total:.0f} |{cg} {procs:g} | {r['manager']:.0f} "
              f"({r['manager_processes']} processes) | {total + r['manager']:.0f} | "
              + (f"{r['engine']:.0f} | " if docker else "") + f"{r['used']:.0f} |")
    awake, asleep = result["awake"], result["asleep"]
    print()
    print(f"manager alone (no instance yet, after {args.idle:g} s): {result['manager_start']:.0f} MiB PSS"
          + (f"; Docker engine then: {result['engine_start']:.0f} MiB PSS" if docker else ""))
    per_pss = summary(asleep["rows"], "pss")[1] / n
    per_machine = (asleep["used"] - used_before - asleep["manager"]) / n
    print()
    print(f"per sleeping instance: {per_pss:.2f} MiB PSS (mean); by the machine's used memory "
          f"((used asleep − used before − manager) / {n}): {per_machine:.2f} MiB")
    if result.get("woke"):
        print(f"NOT asleep when the asleep figures were read (they count in them): {result['woke']}")
    disk_each, disk_shared = result["disk"]
    print(f"disk per sleeping instance: median {disk_each:.1f} MiB"
          + ("" if disk_shared != disk_shared else f" (+ {disk_shared:.0f} MiB of environments shared by all)"))
    pushes = result["pushes"]
    print(f"create {n} instances → ready for code: {result['create']:.0f} s; pushes: first {pushes[0]:.1f} s, then "
          f"median {statistics.median(pushes[1:]) if len(pushes) > 1 else float('nan'):.1f} s "
          f"({args.parallel} at a time); put_to_sleep median {statistics.median(result['sleep_times']):.2f} s")
    deleted, seconds = result["deleted"]
    print(f"deleted through the API: {deleted}/{n} in {seconds:.0f} s; left after cleanup: {leftovers or 'nothing'}")
    target = args.target
    for what, per in (("PSS", per_pss), ("machine used", per_machine)):
        if per < 0:
            print(f"extrapolated to {target} ({what}): not usable, the machine's other processes changed by more "
                  "than the instances left behind")
            continue
        total = asleep["manager"] + target * per
        print(f"extrapolated to {target} sleeping instances ({what}): manager {asleep['manager']:.0f} MiB + "
              f"{target} × {per:.2f} MiB = {total / 1024:.2f} GiB (goal: under 12 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
