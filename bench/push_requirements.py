#!/usr/bin/env python
"""Requirements pushes with uv and the shared wheel cache (instances/wheelcache.py).

Starts a real `manage.py labserver` in a temporary LAB_DATA_DIR (as bench/deploy.py does),
creates instances through the JSON API and pushes a small oTree 6 project over HTTPS with
the git client; times from `git push` to the push output's `Deployed:` line:

0. the first push of instance A (cold cache: not a goal, shown for reference);
1. `--runs` pushes to A that each add one small package (warm cache; goal ≤ 5 s);
2. `--runs` first pushes of new instances whose oTree version is cached (each with a
   requirements.txt of its own, so nothing is reused whole; goal ≤ 8 s);
3. `--runs` code-only pushes to A (no regression: README's 1–2 s).

Instances are created (and ready) before their push is timed. Medians of the runs.

    .venv/bin/python bench/push_requirements.py [--runs 5] [--runtime docker|process] [--installer uv|pip]
"""

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deploy import SMALL_PACKAGES, api, push  # noqa: E402
from tests.labserver_helpers import (  # noqa: E402
    BASE_DIR, LabServer, child_env, free_port, migrate, new_data_dir, remove_data_dir, remove_instances,
)
from tests.otree_projects import Checkout, valid_project  # noqa: E402


def create(server, token, name):
    api(f"{server.url}/api/v1/instances", token, "POST", {"name": name, "owner": "admin"})
    for _ in range(240):
        if api(f"{server.url}/api/v1/instances/{name}", token)["status"] == "ready_for_code":
            return
        time.sleep(0.5)
    raise SystemExit(f"instance {name} never became ready")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", choices=["docker", "process"], default="docker")
    parser.add_argument("--installer", choices=["uv", "pip"], default="uv")
    args = parser.parse_args()

    data_dir, port = new_data_dir(), free_port()
    first_port = free_port()
    extra = {"LAB_INSTANCE_PORTS": f"{first_port}-{first_port + args.runs + 1}", "LAB_RUNTIME": args.runtime,
             "LAB_INSTALLER": args.installer}
    work = Path(tempfile.mkdtemp(prefix="bench-req-"))
    env = child_env(data_dir, port, **extra)
    manager_id = os.environ.get("LAB_MANAGER_ID") or hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]
    migrate(data_dir, port)
    server = LabServer(data_dir, port, **extra)
    rows = []
    try:
        server.wait_ready(timeout=180)
        token = subprocess.run([sys.executable, "manage.py", "create_token", "admin", "--name", "bench"],
                               cwd=BASE_DIR, env=env, capture_output=True, text=True, check=True).stdout.strip()
        create(server, token, "reqa")
        checkout = Checkout(work / "a")
        remote = f"http://admin:{token}@127.0.0.1:{port}/git/reqa.git"
        project = valid_project("v0")
        base = project["requirements.txt"]
        first, _ = push(checkout, project, "first", remote)
        rows.append(("first push, cold cache (reference)", [first], None))

        adds = []
        for i in range(args.runs):
            project["requirements.txt"] = base + "".join(f"{p}\n" for p in SMALL_PACKAGES[:i + 1])
            elapsed, _ = push(checkout, project, f"adds {SMALL_PACKAGES[i]}", remote)
            adds.append(elapsed)
        rows.append(("push adding one small package", adds, 5.0))

        firsts = []
        for i in range(args.runs):
            name = f"reqb{i}"
            create(server, token, name)
            other = Checkout(work / name)
            files = valid_project("v0")
            files["requirements.txt"] = base.replace("psycopg2-binary", f"psycopg2-binary>=2.{i}")
            elapsed, _ = push(other, files, "first", f"http://admin:{token}@127.0.0.1:{port}/git/{name}.git")
            firsts.append(elapsed)
        rows.append(("first push, oTree's version cached", firsts, 8.0))

        code = []
        for i in range(args.runs):
            project["hello/MyPage.html"] = f"{{{{ block content }}}}<p>v{i + 1}</p>{{{{ next_button }}}}{{{{ endblock }}}}"
            elapsed, _ = push(checkout, project, f"code {i}", remote)
            code.append(elapsed)
        rows.append(("code-only push", code, 5.0))
    finally:
        server.terminate()
        server.kill_everything()
        remove_instances(data_dir, port, **extra)
        if args.runtime == "docker":  # the manager's wheel cache volume
            subprocess.run(["docker", "volume", "rm", "-f", f"otree-lab-{manager_id}-uvcache"], capture_output=True)
        remove_data_dir(data_dir)
        subprocess.run(["rm", "-rf", str(work)])

    print(f"\ngit push over HTTPS -> new release serving (s); {args.runs} runs each, real oTree 6 project, "
          f"{args.runtime} runtime, LAB_INSTALLER={args.installer}\n")
    print(f"| {'push':38} | {'median':>7} | {'min':>6} | {'max':>6} | goal |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 8}|{'-' * 8}|------|")
    for label, values, goal in rows:
        print(f"| {label:38} | {statistics.median(values):7.2f} | {min(values):6.2f} | {max(values):6.2f} | "
              f"{'≤ %g s' % goal if goal else '':4} |")


if __name__ == "__main__":
    main()
