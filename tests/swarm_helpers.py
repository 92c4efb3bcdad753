"""The single-node swarm the swarm runtime's tests run on: `ensure_swarm()` makes this
machine's engine a swarm manager when it is not one (advertising docker0's address, so a
docker-in-docker node can join, else loopback), and `leave_if_ours()` (at the end of the
test session, tests/conftest.py) leaves it again — only the swarm this run made."""

from __future__ import annotations

import ipaddress
import subprocess

from tests.docker_helpers import api, engine_ok

_made_here = False


def swarm_state() -> dict:
    try:
        return api(timeout=10).info().get("Swarm") or {}
    except Exception:  # noqa: BLE001 - no engine: no swarm
        return {}


def _advertise_address() -> str:
    """docker0's IPv4 address (reachable from containers: a second node can join), else 127.0.0.1."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True,
                             timeout=10).stdout
        for field in out.split():
            if "/" in field:
                return str(ipaddress.ip_interface(field).ip)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    return "127.0.0.1"


def ensure_swarm() -> bool:
    """True when the engine is (now) a manager of an active swarm."""
    global _made_here
    if not engine_ok():
        return False
    state = swarm_state()
    if state.get("LocalNodeState") == "active":
        return bool(state.get("ControlAvailable"))
    try:
        api(timeout=60).init_swarm(advertise_addr=_advertise_address(), listen_addr="0.0.0.0:2377")
    except Exception:  # noqa: BLE001 - the caller says what is missing
        return False
    _made_here = True
    state = swarm_state()
    return state.get("LocalNodeState") == "active" and bool(state.get("ControlAvailable"))


def leave_if_ours() -> None:
    """Leave the swarm this run made (a swarm that was there before stays)."""
    global _made_here
    if _made_here:
        try:
            api(timeout=60).leave_swarm(force=True)
        except Exception:  # noqa: BLE001
            pass
        _made_here = False


def purge(manager_id: str) -> None:
    """Every service, network and volume of a swarm runtime with `manager_id` (a test's
    leftovers; the registry it ran included)."""
    from instances.runtime.swarm import LABEL_SWARM
    from tests.waits import wait_until

    client = api()
    filters = {"label": [f"{LABEL_SWARM}={manager_id}"]}
    for service in client.services(filters=filters):
        try:
            client.remove_service(service["ID"])
        except Exception:  # noqa: BLE001
            pass

    def gone() -> bool:
        for net in client.networks(filters=filters):
            try:
                client.remove_network(net["Id"])
            except Exception:  # noqa: BLE001 - in use until the tasks stopped
                pass
        for vol in client.volumes(filters=filters).get("Volumes") or []:
            try:
                client.remove_volume(vol["Name"], force=True)
            except Exception:  # noqa: BLE001
                pass
        return not (client.services(filters=filters) or client.networks(filters=filters)
                    or (client.volumes(filters=filters).get("Volumes") or []))

    wait_until(gone, timeout=60, interval=0.5, message=f"the swarm resources of {manager_id} removed")
    for config in client.configs(filters=filters):  # the nodes' firewall code (no service names it now)
        try:
            client.remove_config(config["ID"])
        except Exception:  # noqa: BLE001
            pass
    for secret in client.secrets(filters=filters):  # the registry's password file
        try:
            client.remove_secret(secret["ID"])
        except Exception:  # noqa: BLE001
            pass
