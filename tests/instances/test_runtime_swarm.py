"""What only the swarm runtime has (the behaviour all runtimes share is tested over all three,
tests/backends.py): published ports that answer only this machine, its networks and labels,
placement and the refusals of a move on a single node. The moves between nodes, with a
second node, are in test_swarm_nodes.py."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys

import pytest
import requests
from django.conf import settings

from instances import netguard
from instances.runtime.base import AppSpec, InstanceSpec, RuntimeError_
from tests import backends
from tests.netns_helpers import netns_available, outside_host
from tests.conftest import need

pytestmark = [pytest.mark.docker]


@pytest.fixture(scope="module")
def swarm():
    backends.require("swarm")
    runtime = backends.make("swarm")
    yield runtime
    for name in runtime.owned_instances():
        runtime.remove(name)


def spec(name: str, **app) -> InstanceSpec:
    fake = {"image": settings.LAB_IMAGE_PYTHON, "command": ["python", "-m", "http.server", "8000"]}
    return InstanceSpec(name=name, db_name="otree", db_user="otree", db_password=f"pw-{name}-123456", memory_mb=256,
                        cpus=0.5, app=AppSpec(image=fake["image"], command=fake["command"], release_id="t1", **app))


def connects_from(netns: str, address: str, port: int) -> str:
    """'connected' or the error, from inside network namespace `netns`."""
    code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
            " print('connected')\nexcept OSError as e:\n print(type(e).__name__, e)\n")
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, address, str(port)],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def test_the_apps_port_answers_this_machine_only_and_the_registry_the_other_nodes(swarm):
    """Swarm publishes a host-mode port on every address of the node: the firewall lets only
    this machine (the proxy, over loopback) reach an app; the registry stays reachable for
    the other nodes' pulls."""
    need(netns_available(), "root with iproute2 (ip netns) for the test hosts")
    state = swarm.ensure(spec("sw-port"))
    status = swarm._guard()
    assert status.enforced, status.detail
    assert netguard.ensure(swarm.policy).changed is False  # the rules as iptables-save prints them: in place
    port = int(state.app_url.rsplit(":", 1)[1])
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    push, _ = swarm._registry()
    registry_port = int(push.rsplit(":", 1)[1])
    with outside_host("198.51.100.251") as other:
        host_side = other.extra["link"][0]  # this machine's address as the other machine sees it
        assert connects_from(other.netns, host_side, port).startswith("ConnectionRefusedError") or \
            "No route to host" in connects_from(other.netns, host_side, port)
        assert connects_from(other.netns, host_side, registry_port) == "connected"


def test_an_instance_has_its_own_overlays_services_labels_and_limits(swarm):
    swarm.ensure(spec("sw-own"))
    swarm.ensure(spec("sw-other"))
    nets = {n["Name"]: n for n in swarm.api.networks(filters=swarm._swarm_filters("sw-own"))}
    internal = nets[swarm.network_name("sw-own", "internal")]
    edge = nets[swarm.network_name("sw-own", "edge")]
    assert internal["Driver"] == edge["Driver"] == "overlay"
    assert internal["Internal"] and not edge["Internal"] and not internal["Attachable"] and not edge["Attachable"]
    others = {n["Id"] for n in swarm.api.networks(filters=swarm._swarm_filters("sw-other"))}
    assert not others & {internal["Id"], edge["Id"]}
    assert backends.swarm_components(swarm, "sw-own") == ["app", "db", "redis"]
    app = swarm._service("sw-own", "app")["Spec"]
    container = app["TaskTemplate"]["ContainerSpec"]
    assert container["CapabilityDrop"] == ["ALL"] and container.get("User") is None  # its command's own user
    limits = app["TaskTemplate"]["Resources"]
    assert limits["Limits"]["MemoryBytes"] == 256 * 2**20 and limits["Limits"]["Pids"] == 512
    assert limits["Limits"]["NanoCPUs"] == 500_000_000 and limits["Reservations"]["MemoryBytes"] == 64 * 2**20
    node = swarm.node_of("sw-own")
    assert node == swarm.local_node
    for component in ("db", "redis", "app"):
        placement = swarm._service("sw-own", component)["Spec"]["TaskTemplate"]["Placement"]["Constraints"]
        assert placement == [f"node.id=={node}"]  # all of it on the node of its PostgreSQL volume
    [row] = [n for n in swarm.nodes() if n["id"] == node]
    assert row["instances"] >= 2 and row["reserved_mb"] >= 2 * (64 + 64 + 16)
    # The docker backend never takes the swarm's resources for its own (nor the reverse).
    assert "sw-own" not in backends.make("docker").owned_instances()
    assert {"sw-own", "sw-other"} <= swarm.owned_instances()


def test_a_move_on_one_node_is_refused_with_the_reason(swarm, tmp_path):
    swarm.ensure(spec("sw-move"))
    here = swarm.local_node
    with pytest.raises(RuntimeError_, match="is on that node already"):
        swarm.move_instance("sw-move", spec("sw-move"), here, dump=tmp_path / "d.dump")
    with pytest.raises(RuntimeError_, match="no node nosuchnode in the swarm"):
        swarm.move_instance("sw-move", spec("sw-move"), "nosuchnode", dump=tmp_path / "d.dump")
    with pytest.raises(RuntimeError_, match="has no database on any node"):
        swarm.move_instance("sw-nothing", spec("sw-nothing"), here, dump=tmp_path / "d.dump")
    assert not (tmp_path / "d.dump").exists()
    assert swarm.state("sw-move").app.health.value == "running"  # nothing was stopped


def test_a_managers_address_is_the_one_it_advertises_even_when_the_swarm_saw_another():
    """After the manager's engine restarts, the swarm may report it at another of its
    interfaces (here 192.0.2.2 beside the advertised 172.17.0.1): the registry the other nodes
    pull from is named by the advertised address they joined through, and the firewall knows
    both addresses as the lab's own."""
    from instances.runtime.swarm import SwarmRuntime

    manager = {"ID": "m", "Status": {"Addr": "192.0.2.2"}, "ManagerStatus": {"Addr": "172.17.0.1:2377"}}
    fresh = {"ID": "m", "Status": {"Addr": "0.0.0.0"}, "ManagerStatus": {"Addr": "172.17.0.1:2377"}}
    worker = {"ID": "w", "Status": {"Addr": "172.17.0.9"}}
    assert SwarmRuntime._raw_address(manager) == "172.17.0.1"
    assert SwarmRuntime._all_addresses(manager) == {"172.17.0.1", "192.0.2.2"}
    assert SwarmRuntime._all_addresses(fresh) == {"172.17.0.1"}
    assert SwarmRuntime._raw_address(worker) == "172.17.0.9"
    assert SwarmRuntime._raw_address({"ID": "x", "Status": {"Addr": "not an address"}}) == ""
