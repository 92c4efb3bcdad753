"""A second swarm node on this machine (tests/swarm_node.py: a docker-in-docker container
joined to the host engine's swarm as a worker) does what the swarm runtime needs of a node:

(a) a service constrained to it runs there, with the image copied in (docker save | load);
(b) an overlay network carries traffic between a container on the host node and its task;
(c) a host-mode published port of its task answers from the host at the node's address;
and the same node comes back after its container was stopped and started again.

Services use --endpoint-mode dnsrr: this kernel has no IPVS, so a service's virtual IP
reaches no task on another node (nor does the ingress routing mesh answer). Everything made
here is named dind-t<run>-... or dind-node-... and removed at the end, node entry included.
While the node is in the swarm, a service of someone else without placement constraints
could be given a task on it: the module keeps it there for as short as it can.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time

import pytest
from django.conf import settings

from tests import swarm_node
from tests.conftest import need
from tests.docker_helpers import images_present
from tests.waits import wait_until

pytestmark = pytest.mark.docker

RUN = secrets.token_hex(4)
NET = f"dind-t{RUN}-net"
SERVICE = f"dind-t{RUN}-redis"
REDIS = settings.LAB_IMAGE_REDIS


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def running_tasks(service: str) -> list[dict]:
    """The service's tasks that run now (docker inspect of `docker service ps`)."""
    ids = docker("service", "ps", "--quiet", "--no-trunc", "--filter", "desired-state=running", service).stdout.split()
    if not ids:
        return []
    tasks = json.loads(docker("inspect", *ids).stdout)
    return [task for task in tasks if task["Status"]["State"] == "running"]


@pytest.fixture(scope="module")
def node():
    need(swarm_node.tools_ok(), "the docker CLI, a Docker engine that is a swarm manager (docker swarm init) "
                                f"and {swarm_node.BASE} (manage.py build_images)")
    need(images_present(REDIS), f"the image {REDIS} (manage.py build_images)")
    started = swarm_node.start_node()
    try:
        started.load_image(REDIS)
        yield started
    finally:
        started.remove()


@pytest.fixture(scope="module")
def redis_on_node(node):
    """Redis as a service pinned to the node, on an attachable overlay network, its port
    published in host mode; the published port."""
    docker("network", "create", "--driver", "overlay", "--attachable", NET)
    try:
        docker("service", "create", "--detach", "--no-resolve-image", "--name", SERVICE,
               "--constraint", f"node.id=={node.node_id}", "--network", NET, "--endpoint-mode", "dnsrr",
               "--publish", "mode=host,target=6379", REDIS, "redis-server", "--protected-mode", "no")
        tasks = wait_until(lambda: running_tasks(SERVICE), timeout=90, interval=0.5,
                           message=lambda: f"{SERVICE} running: {docker('service', 'ps', '--no-trunc', SERVICE).stdout}")
        yield tasks[0]["Status"]["PortStatus"]["Ports"][0]["PublishedPort"]
    finally:
        docker("service", "rm", SERVICE, check=False)
        # The network goes once no task is attached to it any more (a moment after the service).
        wait_until(lambda: docker("network", "rm", NET, check=False).returncode == 0
                   or "not found" in docker("network", "inspect", NET, check=False).stderr,
                   timeout=60, interval=1, message=f"removing {NET}")


def ping_over_overlay(host: str) -> str:
    """redis-cli PING from a container on the HOST node, attached to the overlay network."""
    proc = docker("run", "--rm", "--name", f"dind-t{RUN}-cli-{secrets.token_hex(2)}", "--network", NET, REDIS,
                  "redis-cli", "-h", host, "ping", timeout=60, check=False)
    return (proc.stdout + proc.stderr).strip()


def ping_tcp(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(b"PING\r\n")
        return conn.recv(64)


def test_the_node_is_a_ready_worker(node):
    fields = json.loads(docker("node", "inspect", node.node_id).stdout)[0]
    assert fields["Status"]["State"] == "ready"
    assert fields["Spec"]["Role"] == "worker"
    assert fields["Status"]["Addr"] == node.address
    assert fields["Description"]["Hostname"] == node.name


def test_a_constrained_service_runs_on_the_node(node, redis_on_node):
    task = running_tasks(SERVICE)[0]
    assert task["NodeID"] == node.node_id
    names = node.docker("ps", "--format", "{{.Names}}").split()
    assert any(name.startswith(f"{SERVICE}.1.") for name in names), names


def test_an_overlay_network_reaches_the_task_on_the_node(node, redis_on_node):
    # The name is the task's address (dnsrr); the first answer may wait for the gossip.
    wait_until(lambda: ping_over_overlay(SERVICE) == "PONG", timeout=60, interval=1,
               message=lambda: f"PONG from {SERVICE} over {NET} (got {ping_over_overlay(SERVICE)!r})")


def test_a_host_mode_port_answers_at_the_nodes_address(node, redis_on_node):
    assert wait_until(lambda: ping_tcp(node.address, redis_on_node), timeout=30, interval=0.5,
                      ignore=(OSError,)) == b"+PONG\r\n"


def test_the_same_node_comes_back_after_a_restart(node, redis_on_node):
    node.stop()
    started = time.monotonic()
    wait_until(lambda: node.state() == "down", timeout=90, interval=0.5, message="the node down on the host")
    down_after = time.monotonic() - started
    node.start()  # waits until the same node id is Ready again
    assert node.state() == "ready"
    assert docker("node", "inspect", "--format", "{{.Status.Addr}}", node.node_id).stdout.strip() == node.address
    # The pinned task runs on it again and the overlay network reaches it at its (new) address.
    wait_until(lambda: ping_over_overlay(SERVICE) == "PONG", timeout=120, interval=1,
               message=lambda: f"PONG from {SERVICE} after the restart ({docker('service', 'ps', SERVICE).stdout})")
    assert down_after < 60
