"""The instances' firewall on a swarm node that is not the manager's machine.

The swarm runtime runs this as a global service (`lab-<id>-netguard`: one task on every
node but the manager's, with the node's network and only the NET_ADMIN and NET_RAW
capabilities) in the `LAB_IMAGE_NETGUARD` image (Debian's iptables and Python); this file
and `netguard.py` reach it as swarm configs, the policy as the environment variable
`LAB_NODE_GUARD` (JSON: manager_id, overlays, egress, lab_hosts, proxy_from).

It keeps `netguard`'s rules for the node's apps in place (every few seconds; a few ms
when they are): the apps (the node's docker_gwbridge and the instances' overlays) reach
no service of the node, no other node of the swarm, no other instance and no
link-local/metadata address; the apps' published ports answer only the manager's
machine. While the rules are in place the file /run/otree-lab-guard.ok exists — the
service's health check, so the task counts as running only then, and the manager places
no app on a node whose guard is not running.

Stdlib and psutil only (it runs outside the manager's code base). The rules stay when the
task stops (an instance's app is never unguarded by a restart of its guard).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__:  # imported as instances.node_guard (the tests)
    from instances import netguard
else:  # run as a script beside netguard.py, the guard's container (its folder is first in sys.path)
    import netguard

OK_FILE = Path("/run/otree-lab-guard.ok")
PERIOD = 3  # seconds between two checks of the rules


def policy_from_env(text: str) -> netguard.Policy:
    spec = json.loads(text)
    return netguard.Policy(
        manager_id=spec["manager_id"],
        app_pools=netguard.swarm_pools(spec.get("overlays", "")),
        build_pools=(),
        app_uids=(),
        builder_uids=(),
        egress=spec.get("egress", "open"),
        swarm_bridge=True,
        registry_port=0,
        lab_hosts=tuple(spec.get("lab_hosts", ())),
        proxy_from=tuple(spec.get("proxy_from", ())),
        data_dir=netguard.CONTAINER_PREFIX + "node-guard",
    )


def _has_docker_chains(save: str) -> bool:
    try:
        out = subprocess.run([save, "-t", "filter"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ":DOCKER" in out


def choose_backend() -> str:
    """The iptables variant the node's Docker engine uses (nft or legacy): rules in the
    other one would not be where Docker's are."""
    if shutil.which("iptables-legacy-save") and shutil.which("iptables-nft-save"):
        if _has_docker_chains("iptables-legacy-save") and not _has_docker_chains("iptables-nft-save"):
            netguard.TOOLS[4] = ("iptables-legacy-save", "iptables-legacy-restore")
            netguard.TOOLS[6] = ("ip6tables-legacy-save", "ip6tables-legacy-restore")
            return "legacy"
        netguard.TOOLS[4] = ("iptables-nft-save", "iptables-nft-restore")
        netguard.TOOLS[6] = ("ip6tables-nft-save", "ip6tables-nft-restore")
        return "nft"
    return "default"


def main() -> int:
    os.environ["OTREE_LAB_IMAGE"] = "1"  # judge no other manager's chains (see netguard._remove_stale)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    text = os.environ.get("LAB_NODE_GUARD", "")
    try:
        policy_from_env(text)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"LAB_NODE_GUARD is not a valid policy: {exc}", flush=True)
        return 2
    print(f"iptables: {choose_backend()}", flush=True)
    said = ""
    while not stopping:
        policy = policy_from_env(text)  # the node's docker_gwbridge may appear later
        status = netguard.ensure(policy)
        if status.enforced:
            OK_FILE.touch()
        else:
            OK_FILE.unlink(missing_ok=True)
        line = f"{'in place' if status.enforced else 'NOT in place'}: {status.detail} (pools {', '.join(policy.app_pools)})"
        if line != said:
            print(line, flush=True)
            said = line
        for _ in range(PERIOD * 10):
            if stopping:
                break
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
