#!/usr/bin/env python
"""git push → new release serving, and the memory of an idle instance running oTree.

Starts a real `manage.py labserver` in a temporary LAB_DATA_DIR (embedded Redis, worker,
git SSH server, Caddy), creates one instance through the JSON API, and pushes a small
oTree 6 project over HTTPS with the git client:

1. the first push (pip installs oTree: not a goal, shown for reference);
2. `--runs` code-only pushes: time from `git push` to the push output's `Deployed:` line
   (goal: at most 5 s);
3. `--runs` pushes that change requirements.txt (a new small package each time): the
   same time, next to the pip install time the build log reports (goal: pip + 5 s);
4. the memory of the idle instance (app + PostgreSQL + Redis, cgroup usage minus page
   cache) after `--idle` seconds (goal: at most 120 MiB).

`--runtime docker` (default) needs a Docker engine and the images (`python manage.py
build_images`); `--runtime swarm` the same engine as a swarm manager (`docker swarm init`;
the script does not change the swarm), the instance on this machine's node;
`--runtime process` needs PostgreSQL's server programs. Everything it created (containers,
services or processes, images or environments, the data dir) is removed at the end. The
manager id is LAB_MANAGER_ID when set, else the one derived from the temporary data dir.

    .venv/bin/python bench/deploy.py [--runs 5] [--idle 20] [--runtime process|swarm]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.labserver_helpers import (  # noqa: E402
    BASE_DIR, LabServer, child_env, free_port, migrate, new_data_dir, remove_data_dir, remove_instances,
)
from tests.otree_projects import Checkout, valid_project  # noqa: E402

SMALL_PACKAGES = ["six", "idna", "certifi", "attrs", "packaging", "pyparsing", "wcwidth", "toml", "tomli", "decorator"]


def push(checkout, files, message, remote):
    """Commit `files` (the whole tree) and push it; returns (seconds the push took, its output)."""
    checkout.commit(files, message)
    start = time.perf_counter()
    _code, out = checkout.push_to(remote, timeout=900)
    elapsed = time.perf_counter() - start
    if "Deployed:" not in out:
        raise SystemExit(f"push did not deploy:\n{out[-3000:]}")
    return elapsed, out


def pip_install_seconds(requirements: str, image: str = "python:3.11-slim", runtime: str = "docker") -> float:
    """How long `pip install -r requirements.txt` alone takes in a fresh container of the
    build's base image, or a fresh virtual environment (process runtime): what a
    requirements push must at least spend."""
    if runtime == "process":
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "requirements.txt").write_text(requirements)
            python = getattr(sys, "_base_executable", sys.executable)
            start = time.perf_counter()
            subprocess.run([python, "-m", "venv", f"{tmp}/venv"], check=True, capture_output=True, timeout=300)
            subprocess.run([f"{tmp}/venv/bin/pip", "install", "-q", "-r", f"{tmp}/requirements.txt"], check=True,
                           capture_output=True, timeout=900)
            return time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "requirements.txt").write_text(requirements)
        subprocess.run(["docker", "create", "--name", "bench-pip", image, "pip", "install", "-q", "--no-cache-dir",
                        "-r", "/tmp/requirements.txt"], check=True, capture_output=True)
        try:
            subprocess.run(["docker", "cp", f"{tmp}/requirements.txt", "bench-pip:/tmp/requirements.txt"],
                           check=True, capture_output=True)
            start = time.perf_counter()
            subprocess.run(["docker", "start", "-a", "bench-pip"], check=True, capture_output=True, timeout=900)
            return time.perf_counter() - start
        finally:
            subprocess.run(["docker", "rm", "-f", "bench-pip"], capture_output=True)


# Imported first by every Python process of the labserver (PYTHONPATH, `--runtime swarm`
# only): the swarm runtime normally puts a new instance on the node with the most unreserved
# memory; this benchmark measures this machine, so here, and only in the processes this
# script starts, SwarmRuntime._choose_node always returns the local node (another node that
# has joined the swarm meanwhile, e.g. a docker-in-docker test node, must neither get the
# instance nor break the run). The class is patched as soon as its module is imported.
LOCAL_NODE_HOOK = """\
import importlib.machinery
import sys


class _LocalNode:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "instances.runtime.swarm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.SwarmRuntime._choose_node = lambda self, memory_mb: self.local_node

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _LocalNode())
"""


def local_node_hook(folder: Path) -> str:
    """A `sitecustomize` in `folder` that installs LOCAL_NODE_HOOK; returns the PYTHONPATH
    that makes a child import it."""
    (folder / "sitecustomize.py").write_text(LOCAL_NODE_HOOK)
    return os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)


def api(url, token, method="GET", body=None):
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def idle_memory_process(data_dir: Path, instance: str) -> dict:
    """PSS of the instance's processes (process runtime), by role, in MiB."""
    import json

    import psutil
    from process_runtime import MIB, pss_mib

    state = json.loads((data_dir / "instances" / instance / "state.json").read_text())
    result = {role: pss_mib([info["pid"]]) for role, info in state["processes"].items()}
    result["supervisor"] = psutil.Process(state["supervisor"]).memory_full_info().pss / MIB  # itself alone
    return result


def idle_memory_mib(manager_id: str, instance: str, runtime: str = "docker") -> dict:
    import docker

    client = docker.APIClient(version="auto")
    result = {}
    owner = "org.otree-lab.swarm" if runtime == "swarm" else "org.otree-lab.manager"  # (swarm: the tasks' containers)
    for c in client.containers(filters={"label": [f"{owner}={manager_id}",
                                                  f"org.otree-lab.instance={instance}"]}):
        stats = client.stats(c["Id"], stream=False)
        mem = stats["memory_stats"]
        cache = mem.get("stats", {}).get("total_inactive_file", mem.get("stats", {}).get("cache", 0))
        result[c["Labels"]["org.otree-lab.component"]] = (mem["usage"] - cache) / 2**20
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=20)
    parser.add_argument("--runtime", choices=["docker", "process", "swarm"], default="docker")
    args = parser.parse_args()

    data_dir, port, public_port = new_data_dir(), free_port(), free_port()
    extra = {"LAB_INSTANCE_PORTS": f"{public_port}-{public_port}", "LAB_RUNTIME": args.runtime}
    work = Path(tempfile.mkdtemp(prefix="bench-push-"))
    if args.runtime == "swarm":
        hook = work / "hook"
        hook.mkdir()
        extra["PYTHONPATH"] = local_node_hook(hook)
    env = child_env(data_dir, port, **extra)
    import hashlib

    manager_id = os.environ.get("LAB_MANAGER_ID") or hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]
    migrate(data_dir, port)
    server = LabServer(data_dir, port, **extra)
    rows = []
    try:
        server.wait_ready(timeout=180)
        token = subprocess.run([sys.executable, "manage.py", "create_token", "admin", "--name", "bench"],
                               cwd=BASE_DIR, env=env, capture_output=True, text=True, check=True).stdout.strip()
        api(f"{server.url}/api/v1/instances", token, "POST", {"name": "bench", "owner": "admin"})
        for _ in range(120):
            if api(f"{server.url}/api/v1/instances/bench", token)["status"] == "ready_for_code":
                break
            time.sleep(0.5)
        checkout = Checkout(work)
        remote = f"http://admin:{token}@127.0.0.1:{port}/git/bench.git"
        project = valid_project("v0")
        first, _ = push(checkout, project, "first", remote)
        rows.append(("first push (pip installs oTree)", [first], None))

        code_only = []
        for i in range(args.runs):
            project["hello/MyPage.html"] = (f"{{{{ block content }}}}<p>v{i + 1}</p>"
                                            "{{ next_button }}{{ endblock }}")
            elapsed, _ = push(checkout, project, f"code {i}", remote)
            code_only.append(elapsed)
        rows.append(("code-only push -> serving", code_only, 5.0))

        reqs, pips = [], []
        base_requirements = valid_project()["requirements.txt"]
        for i in range(args.runs):
            package = SMALL_PACKAGES[i % len(SMALL_PACKAGES)]
            project["requirements.txt"] = base_requirements + f"{package}\n"
            elapsed, _ = push(checkout, project, f"req {i}", remote)
            reqs.append(elapsed)
            pips.append(pip_install_seconds(base_requirements + f"{package}\n", runtime=args.runtime))
        rows.append(("requirements.txt push -> serving", reqs, None))
        rows.append(("  pip install -r alone (same reqs)", pips, None))

        time.sleep(args.idle)
        memory = (idle_memory_process(data_dir, "bench") if args.runtime == "process"
                  else idle_memory_mib(manager_id, "bench", args.runtime))
    finally:
        server.terminate()
        server.kill_everything()
        remove_instances(data_dir, port, **extra)
        if args.runtime == "swarm":  # what `remove` left (a run stopped half-way), the firewall chains included
            code = ("import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'manager.settings'); "
                    "django.setup()\nfrom tests import docker_helpers, swarm_helpers\n"
                    f"swarm_helpers.purge({manager_id!r}); docker_helpers.purge({manager_id!r})\n")
            subprocess.run([sys.executable, "-c", code], cwd=BASE_DIR, env=env, timeout=300, capture_output=True)
        remove_data_dir(data_dir)
        subprocess.run(["rm", "-rf", str(work)])

    print(f"\ngit push over HTTPS -> new release serving (s); {args.runs} runs each, real oTree 6 project, "
          f"{args.runtime} runtime\n")
    print(f"| {'push':36} | {'median':>7} | {'min':>6} | {'max':>6} | goal |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 8}|{'-' * 8}|------|")
    for label, values, goal in rows:
        print(f"| {label:36} | {statistics.median(values):7.2f} | {min(values):6.2f} | {max(values):6.2f} | "
              f"{'≤ %g s' % goal if goal else '':4} |")
    if pips:
        overhead = [r - p for r, p in zip(reqs, pips)]
        print(f"\nrequirements push minus pip install alone: median {statistics.median(overhead):.2f} s "
              "(goal: at most 5 s)")
    total = sum(memory.values())
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(memory.items()))
    print(f"\nidle instance with a running oTree 6 app after {args.idle:g} s: {total:.1f} MiB ({parts}); goal ≤ 120 MiB")


if __name__ == "__main__":
    main()
