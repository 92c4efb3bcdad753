"""A second Docker Swarm node on this machine, for tests: a privileged docker-in-docker
container (`otree-lab/swarm-node:test`: Debian's docker.io on otree-lab/debian-base) whose
own dockerd joins the HOST engine's swarm as a worker. Where the machine lacks a capability
(this one: CAP_SYS_RESOURCE), --privileged fails and run_options() gives its equivalent.

    node = start_node()             # build the image if needed, run it, join, wait for Ready
    node.load_image("redis:7")      # the node has no registry: `docker save | docker load`
    node.stop(); node.start()       # the same swarm node comes back (its state is in a volume)
    node.remove()                   # leave, `docker node rm --force`, container and volume go

Everything it creates is named `dind-node-<random>` (container, hostname, volume) and carries
the label LABEL, so remove_stale() finds what a killed run left behind. The host engine must
be a swarm manager already; its swarm's settings are not touched.

What the node's dockerd is given (node-entrypoint.sh): storage driver overlay2 on the volume
at /var/lib/docker (vfs when the kernel refuses an overlay mount there), and
DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1: a task whose image is present is started without the
registry pull swarm otherwise tries first (there is no Docker Hub here). It also means that
the node never pulls a task's image: for images from a registry (the swarm runtime's lab
registry) start it with start_node(prefer_offline=False), and it pulls before each task.
Extra dockerd options (e.g. --insecure-registry 172.17.0.1:5000) go through
start_node(dockerd_args=...).

What works between the nodes (the swarm runtime through it: tests/instances/test_swarm_nodes.py
and bench/swarm_move.py): services constrained to the node, overlay networks on it,
host-mode published ports at node.address, the node stopped and started again.
What does not, on this kernel (no IPVS): a service's virtual IP for a task on another node
and the ingress routing mesh; use --endpoint-mode dnsrr and mode=host ports.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE = "otree-lab/swarm-node:test"
BASE = "otree-lab/debian-base:bookworm"
PREFIX = "dind-node-"
LABEL = "org.otree-lab.swarm-node"  # on the image, the containers and the volumes made here
LABEL_CONTEXT = "org.otree-lab.swarm-node.context"  # sha256 prefix of the build context
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

DOCKERFILE = """\
# A swarm node for tests: Debian's dockerd in a privileged container (tests/swarm_node.py).
ARG BASE
FROM ${BASE}
# The host's CA bundle before apt runs (TLS may be intercepted on the way to the mirror).
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY extra-ca/ /usr/local/share/ca-certificates/
RUN set -eux; \\
    update-ca-certificates; \\
    apt-get update; \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
        docker.io iptables ca-certificates iproute2 procps; \\
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old; \\
    dockerd --version
COPY node-entrypoint.sh /usr/local/bin/
VOLUME /var/lib/docker
ENV DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1
ENTRYPOINT ["node-entrypoint.sh"]
"""

ENTRYPOINT = r"""#!/bin/sh
# dockerd in a privileged container, as docker:dind's `dind` script prepares it.
set -eu
mountpoint -q /sys/kernel/security || mount -t securityfs none /sys/kernel/security || true
mountpoint -q /tmp || mount -t tmpfs none /tmp || true
# Without --privileged (start_node's fallback) /sys and the cgroup hierarchies are mounted
# read-only: with CAP_SYS_ADMIN and no seccomp they can be made writable again (the
# hierarchies are bind mounts of this container's own cgroups: nested, as with --privileged).
grep -q ' /sys sysfs ro' /proc/mounts && mount -o remount,rw /sys
for d in /sys/fs/cgroup/*/; do
    if mountpoint -q "$d" && grep -q " ${d%/} cgroup ro" /proc/mounts; then mount -o remount,bind,rw "$d"; fi
done
rm -f /var/run/docker.pid /var/run/docker/containerd/containerd.pid
# A restarted container may get another address on the bridge, but dockerd keeps the address
# it joined with (resolved at `swarm join`, even for --advertise-addr eth0) and gossips it:
# the overlay networks then no longer reach this node. Advertise the current one.
state=/var/lib/docker/swarm/docker-state.json
addr=$(ip -4 -o addr show dev eth0 | awk '{ split($4, a, "/"); print a[1]; exit }')
if [ -f "$state" ] && [ -n "$addr" ]; then
    sed -i "s/\"AdvertiseAddr\":\"[^\"]*:/\"AdvertiseAddr\":\"$addr:/" "$state"
fi
driver="${NODE_STORAGE_DRIVER:-auto}"
if [ "$driver" = auto ]; then
    # overlay2 needs an overlay mount on /var/lib/docker (a volume: the host's file system);
    # where the kernel refuses one, vfs (a full copy per layer: slow, but works anywhere).
    probe=/var/lib/docker/.overlay-probe
    rm -rf "$probe"; mkdir -p "$probe/l" "$probe/u" "$probe/w" "$probe/m"
    if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/tmp/probe.err; then
        umount "$probe/m"; driver=overlay2
    else
        echo "node-entrypoint: no overlay mount on /var/lib/docker ($(cat /tmp/probe.err)): vfs"; driver=vfs
    fi
    rm -rf "$probe"
fi
echo "node-entrypoint: dockerd --storage-driver=$driver $*"
# --oom-score-adjust=0: a negative one (dockerd's default -500) needs CAP_SYS_RESOURCE.
exec dockerd --host=unix:///var/run/docker.sock --storage-driver="$driver" --oom-score-adjust=0 "$@"
"""


# Linux capability numbers -> names (docker's --cap-add/--cap-drop spelling), for the fallback.
CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT "
        "SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE "
        "AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ "
        "PERFMON BPF CHECKPOINT_RESTORE").split()


def missing_caps() -> list[str]:
    """The capabilities this machine's bounding set lacks (the engine runs here too, with the
    same set). Where it lacks one, `docker run --privileged` fails: "unable to apply caps"."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return []
    bounding = next((int(line.split()[1], 16) for line in text.splitlines() if line.startswith("CapBnd:")), None)
    if bounding is None:
        return []
    return [name for bit, name in enumerate(CAPS) if not bounding >> bit & 1]


def run_options() -> list[str]:
    """How the node's container is run: --privileged, or where this machine lacks a capability
    (here: SYS_RESOURCE, a Firecracker VM's root), its closest equivalent: every capability
    there is, no seccomp profile, /proc unmasked, every device allowed (the entrypoint makes
    /sys and the cgroup hierarchies writable)."""
    missing = missing_caps()
    if not missing:
        return ["--privileged"]
    opts = ["--cap-add", "ALL"]
    for cap in missing:
        opts += ["--cap-drop", cap]
    return opts + ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
                   "--security-opt", "systempaths=unconfined", "--device-cgroup-rule", "a *:* rwm"]


class NodeError(Exception):
    """The node could not be built, started or joined; the message says what and shows the
    end of dockerd's log when there is one."""


class NodeExited(NodeError):
    """The node's container stopped while it was awaited: no use waiting any longer."""


def _docker(*args: str, timeout: float = 60, input: bytes | None = None, check: bool = True) -> str:
    """The docker CLI on the host engine; its output (stdout). NodeError when it fails or
    takes longer than `timeout` seconds."""
    try:
        proc = subprocess.run(["docker", *args], input=input, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NodeError(f"`docker {' '.join(args)}` took longer than {timeout} s") from None
    out = proc.stdout.decode(errors="replace").strip()
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise NodeError(f"`docker {' '.join(args)}` failed (exit {proc.returncode}): {err or out}")
    return out


def _wait(predicate, timeout: float, what: str, interval: float = 0.5, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except NodeExited:
            raise
        except NodeError as exc:
            value, last = None, exc
        if value:
            return value
        if value is not None:
            last = value
        if time.monotonic() >= deadline:
            extra = detail()
            raise NodeError(f"{what}: not within {timeout} s (last: {last})" + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


def tools_ok() -> bool:
    """A docker CLI, a host engine that is an active swarm manager, and the base image."""
    if not shutil.which("docker"):
        return False
    try:
        info = json.loads(_docker("info", "--format", "{{json .Swarm}}", timeout=15))
        _docker("image", "inspect", "--format", "{{.Id}}", BASE, timeout=15)
    except (NodeError, ValueError):
        return False
    return info.get("LocalNodeState") == "active" and bool(info.get("ControlAvailable"))


def manager_address() -> str:
    """host:port of the host engine's swarm manager (its advertise address), e.g. 172.17.0.1:2377."""
    info = json.loads(_docker("info", "--format", "{{json .Swarm}}", timeout=15))
    if info.get("LocalNodeState") != "active" or not info.get("ControlAvailable"):
        raise NodeError("the host engine is not a swarm manager (docker swarm init): no swarm to join")
    for manager in info.get("RemoteManagers") or []:
        if manager.get("NodeID") == info.get("NodeID"):
            return manager["Addr"]
    return f"{info['NodeAddr']}:2377"


# --- the image ---------------------------------------------------------------------------


def _context(ca_bundle: Path | None) -> tuple[bytes, str]:
    """The build context (tar) and a fingerprint of it."""
    from instances.images.builder import read_ca_bundle

    bundle = ca_bundle if ca_bundle is not None else HOST_CA_BUNDLE
    pems = read_ca_bundle(bundle) if bundle.exists() else []
    files = {"Dockerfile": (DOCKERFILE.encode(), 0o644), "node-entrypoint.sh": (ENTRYPOINT.encode(), 0o755),
             "ca-certificates.crt": (("\n".join(pems) + "\n").encode() if pems else b"", 0o644),
             "extra-ca/": (b"", 0o755)}
    for i, pem in enumerate(pems):
        files[f"extra-ca/host-{i:03d}.crt"] = ((pem + "\n").encode(), 0o644)
    buf = io.BytesIO()
    digest = hashlib.sha256()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mode, info.mtime = mode, 0
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            digest.update(name.encode() + b"\0" + data + b"\0")
    return buf.getvalue(), digest.hexdigest()[:16]


def build_image(tag: str = IMAGE, base: str = BASE, ca_bundle: Path | None = None, force: bool = False,
                timeout: float = 900, out=lambda line: None) -> str:
    """Build `tag` (Docker SDK, classic builder) unless an image of the same build context is
    there already; returns "built" or "present"."""
    import docker
    from docker.errors import ImageNotFound

    context, fingerprint = _context(ca_bundle)
    client = docker.APIClient(version="auto", timeout=timeout, **docker.utils.kwargs_from_env())
    if not force:
        try:
            labels = client.inspect_image(tag)["Config"].get("Labels") or {}
            if labels.get(LABEL_CONTEXT) == fingerprint:
                return "present"
        except ImageNotFound:
            pass
    buildargs = {"BASE": base}
    buildargs.update({k: v for k, v in os.environ.items() if k in PROXY_VARS})
    tail: list[str] = []
    stream = client.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, buildargs=buildargs,
                          labels={LABEL: "image", LABEL_CONTEXT: fingerprint}, rm=True, forcerm=True,
                          pull=False, decode=True)
    for chunk in stream:
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            raise NodeError(f"docker build of {tag} failed: {detail.strip()}\n" + "\n".join(tail[-30:]))
        for line in chunk.get("stream", "").splitlines():
            if line.strip():
                tail.append(line.rstrip())
                if line.startswith("Step "):
                    out(line.rstrip())
    return "built"


# --- the node ----------------------------------------------------------------------------


@dataclass
class Node:
    name: str  # container, hostname and volume: dind-node-<random>
    container_id: str
    node_id: str  # the swarm node's id (docker node ls on the host)
    address: str  # the container's IP on the host's bridge: the node's advertise address
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step of start_node

    @property
    def volume(self) -> str:
        return self.name

    def docker(self, *args: str, timeout: float = 60, input: bytes | None = None, check: bool = True) -> str:
        """The docker CLI inside the node, on the node's own engine."""
        return _docker("exec", *(["-i"] if input is not None else []), self.name, "docker", *args,
                       timeout=timeout, input=input, check=check)

    def log_tail(self, lines: int = 40) -> str:
        return node_log_tail(self.name, lines)

    def state(self) -> str:
        """The swarm node's state as the host's manager sees it: ready, down, unknown..."""
        return _docker("node", "inspect", "--format", "{{.Status.State}}", self.node_id, timeout=15)

    def load_image(self, ref: str, timeout: float = 300) -> None:
        """Copy image `ref` from the host engine into the node (docker save | docker load)."""
        save = subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            load = subprocess.run(["docker", "exec", "-i", self.name, "docker", "load"], stdin=save.stdout,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            save.kill()
            raise NodeError(f"loading {ref} into {self.name} took longer than {timeout} s") from None
        finally:
            save.stdout.close()
            try:
                save.wait(timeout=30)
            except subprocess.TimeoutExpired:
                save.kill()
        if save.returncode != 0:
            raise NodeError(f"docker save {ref} failed: {save.stderr.read().decode(errors='replace').strip()}")
        if load.returncode != 0:
            raise NodeError(f"docker load of {ref} in {self.name} failed: "
                            f"{load.stderr.decode(errors='replace').strip()}")

    def stop(self, timeout: float = 60) -> None:
        """Stop the container (its dockerd, the node's tasks); the host then sees the node down."""
        _docker("stop", "--time", "15", self.name, timeout=timeout)

    def start(self, timeout: float = 120) -> None:
        """Start the stopped container again: the same swarm node (same id, from its volume)
        comes back Ready. Its address is read again (the bridge may give another one)."""
        _docker("start", self.name, timeout=60)
        deadline = time.monotonic() + timeout
        _wait_engine(self.name, deadline)
        self.address = _container_ip(self.name)
        _wait(lambda: self.state() == "ready", max(1.0, deadline - time.monotonic()),
              f"swarm node {self.name} ({self.node_id}) Ready again", detail=self.log_tail)

    def remove(self) -> None:
        """Leave the swarm, remove the node's entry on the host (`docker node rm --force`),
        the container and its volume. Each step is tried even when one before failed."""
        errors = []
        if _container_running(self.name):
            try:
                self.docker("swarm", "leave", "--force", timeout=30)
            except NodeError as exc:
                errors.append(str(exc))
        _remove_node_entry(self.node_id, errors)
        _remove_container_and_volume(self.name, errors)
        if errors:
            raise NodeError(f"removing {self.name}: " + "; ".join(errors))


def node_log_tail(name: str, lines: int = 40) -> str:
    try:
        proc = subprocess.run(["docker", "logs", "--tail", str(lines), name], capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "(docker logs timed out)"
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    return f"--- last {lines} lines of {name}'s log (dockerd) ---\n{text}" if text else ""


def _container_running(name: str) -> bool:
    return _docker("inspect", "--format", "{{.State.Running}}", name, timeout=15, check=False) == "true"


def _container_ip(name: str) -> str:
    ip = _docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", name, timeout=15)
    if not ip:
        raise NodeError(f"{name} has no address on the default bridge")
    return ip


def _wait_engine(name: str, deadline: float) -> None:
    def answers() -> bool:
        if not _container_running(name):
            raise_exited = _docker("inspect", "--format", "{{.State.Status}} exit {{.State.ExitCode}}", name,
                                   timeout=15, check=False)
            raise NodeExited(f"{name} stopped ({raise_exited}) before its engine answered\n{node_log_tail(name)}")
        proc = subprocess.run(["docker", "exec", name, "docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, timeout=20)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    _wait(answers, max(1.0, deadline - time.monotonic()), f"the engine inside {name} answering docker info",
          detail=lambda: node_log_tail(name))


def _remove_node_entry(node_id: str, errors: list[str]) -> None:
    if not node_id:
        return
    proc = subprocess.run(["docker", "node", "rm", "--force", node_id], capture_output=True, timeout=30)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0 and "not found" not in err:
        errors.append(f"docker node rm --force {node_id}: {err.strip()}")


def _remove_container_and_volume(name: str, errors: list[str]) -> None:
    for args in (("rm", "--force", "--volumes", name), ("volume", "rm", "--force", name)):
        proc = subprocess.run(["docker", *args], capture_output=True, timeout=60)
        err = proc.stderr.decode(errors="replace")
        if proc.returncode != 0 and "No such" not in err:
            errors.append(f"docker {' '.join(args)}: {err.strip()}")


def start_node(timeout: float = 180, dockerd_args: tuple[str, ...] = (), storage_driver: str = "auto",
               build: bool = True, prefix: str = PREFIX, prefer_offline: bool = True) -> Node:
    """Build the image (when needed), start a privileged `dind-node-<random>` container with its
    own dockerd, join it to the host's swarm as a worker and wait until the host sees it
    Ready; each wait is bounded by `timeout` altogether (the build is not). On failure
    everything made so far is removed and NodeError says what, with dockerd's log tail.
    `prefix` starts the node's name (a test's own prefix; remove_stale finds it by its label).
    prefer_offline=False: the node's swarm agent pulls each task's image (from a registry)
    instead of only using what is present (DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=0)."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    if build:
        build_image()
        timings["build"] = time.monotonic() - t0
    manager = manager_address()
    token = _docker("swarm", "join-token", "-q", "worker", timeout=15)
    name = prefix + secrets.token_hex(4)
    deadline = time.monotonic() + timeout
    node_id = ""
    try:
        t = time.monotonic()
        _docker("volume", "create", "--label", f"{LABEL}={name}", name, timeout=30)
        container_id = _docker(
            "run", "--detach", *run_options(), "--name", name, "--hostname", name, "--label", f"{LABEL}={name}",
            "--volume", f"{name}:/var/lib/docker", "--env", f"NODE_STORAGE_DRIVER={storage_driver}",
            "--env", f"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE={1 if prefer_offline else 0}",
            IMAGE, *dockerd_args, timeout=60)
        _wait_engine(name, deadline)
        timings["engine"] = time.monotonic() - t
        address = _container_ip(name)
        t = time.monotonic()
        _docker("exec", name, "docker", "swarm", "join", "--token", token, "--advertise-addr", "eth0", manager,
                timeout=max(5.0, deadline - time.monotonic()))
        node_id = _docker("exec", name, "docker", "info", "--format", "{{.Swarm.NodeID}}", timeout=15)
        if not node_id:
            raise NodeError(f"{name} joined but reports no node id")
        timings["join"] = time.monotonic() - t
        t = time.monotonic()
        _wait(lambda: _docker("node", "inspect", "--format", "{{.Status.State}}", node_id, timeout=15) == "ready",
              max(1.0, deadline - time.monotonic()), f"swarm node {name} ({node_id}) Ready on the host",
              detail=lambda: node_log_tail(name))
        timings["ready"] = time.monotonic() - t
    except BaseException as exc:
        errors: list[str] = []
        _remove_node_entry(node_id, errors)
        _remove_container_and_volume(name, errors)
        if errors and isinstance(exc, NodeError):
            raise NodeError(f"{exc}\n(clean-up: {'; '.join(errors)})") from None
        raise
    timings["total"] = time.monotonic() - t0
    return Node(name=name, container_id=container_id, node_id=node_id, address=address, timings=timings)


def remove_stale() -> list[str]:
    """Remove every node container and volume labelled LABEL (and their swarm node entries
    that are down), e.g. what a killed test run left; returns the names removed."""
    names = _docker("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.Names}}", timeout=30).split()
    volumes = _docker("volume", "ls", "--quiet", "--filter", f"label={LABEL}", timeout=30).split()
    errors: list[str] = []
    for name in names:
        node_id = _docker("exec", name, "docker", "info", "--format", "{{.Swarm.NodeID}}", timeout=20,
                          check=False) if _container_running(name) else ""
        if node_id:
            _docker("exec", name, "docker", "swarm", "leave", "--force", timeout=30, check=False)
        _remove_node_entry(node_id, errors)
        _remove_container_and_volume(name, errors)
    for volume in set(volumes) - set(names):
        _remove_container_and_volume(volume, errors)
    for line in _docker("node", "ls", "--format", "{{.ID}} {{.Hostname}} {{.Status}}", timeout=30).splitlines():
        node_id, hostname, status = (line.split() + ["", ""])[:3]
        if hostname.startswith(PREFIX) and status.lower() == "down":
            _remove_node_entry(node_id, errors)
    if errors:
        raise NodeError("; ".join(errors))
    return sorted(set(names) | set(volumes))
