"""The swarm backend: instances as Docker Swarm services, spread over the swarm's nodes.

The manager runs on a swarm manager node (`docker swarm init`; more machines join with
`docker swarm join`) and drives the swarm through the Docker SDK, as the docker backend
drives one engine; builds and images are the docker backend's (this backend extends it),
made on the manager's own engine.

Per instance `<name>` of manager `<id>` (`settings.LAB_MANAGER_ID`):

| resource | name | what |
|---|---|---|
| overlay network | `lab-<id>-<name>-net` | `internal`, not attachable: app, db (alias `db`), redis (alias `redis`); no route out, none to other instances |
| overlay network | `lab-<id>-<name>-edge` | only the app: what its host-mode published port goes through (Docker's `docker_gwbridge` on its node) |
| volume | `lab-<id>-<name>-pgdata` | PostgreSQL's data, a local volume on the instance's node |
| services | `lab-<id>-<name>-db`, `-redis`, `-app-<token>` | one replica each, all on one node (placement `node.id==...`: the volume's node); limits and reservations; capabilities dropped |

Everything carries `org.otree-lab.swarm=<id>` (not the docker backend's manager label: the
two backends on one engine never take each other's resources for their own),
`org.otree-lab.instance=<name>` and `org.otree-lab.component`; the services also carry a
hash of their whole configuration (`org.otree-lab.config`) and `ensure()` updates a
service whose hash differs.

The node: chosen when the instance is first created (the active, ready node with the most
memory not yet reserved), then read back from the database service's placement — the
PostgreSQL volume is there. `move_instance` moves it (backup, restore on the target).

The app is reached by the manager's proxy on its node's address and a host-mode published
port fixed at the service's creation (so a restart keeps it). Swarm's ingress routing
mesh is not used. Releases: a deploy starts the new release as a second app service (the
candidate, `component=app-next`), waits until it answers HTTP, then relabels it `app` and
the old one `app-old` (removed by `retire_app`, after the proxy switched): each task of a
host-mode service has its own port, so Swarm's own start-first update would stop the old
task before the proxy could point to the new one. A candidate that fails is removed; the
old release keeps serving.

Images reach other nodes through the lab's registry (`LAB_SWARM_REGISTRY`, default: a
registry service this backend runs on the manager node, `LAB_IMAGE_REGISTRY`): an image a
task on another node needs is pushed there and the service names it there. Tasks on the
manager's node use the engine's local images (nothing pushed).

What needs a task's container (readiness probes, pg_dump, the reset's psql) is done with
`docker exec` on the manager's node, and by a one-off job service on the instance's
network and node elsewhere (its output read back from the service's logs).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import time
import uuid
from pathlib import Path

import requests
from django.conf import settings
from docker.errors import APIError, NotFound

from .base import (
    CANDIDATE, PG_RESTORE_SCRIPT, RETIRED, SQL_IDENTIFIER, AppFailed, ComponentState, Health, InstanceSpec,
    InstanceState, Protection, RuntimeError_, TarStream, check_name, free_port, last_lines, restore_failure,
    restore_names, user_errors, wait_http, wait_services,
)
from .docker import (
    LABEL_COMPONENT, LABEL_CONFIG, LABEL_INSTANCE, LABEL_MANAGER, LABEL_NETWORK, LABEL_RELEASE, PGDATA,
    RELEASE_TAG, DockerRuntime, _docker_error, _short, image_tag,
)

log = logging.getLogger(__name__)

LABEL_SWARM = "org.otree-lab.swarm"  # the manager id, on every resource of this backend
LABEL_NODE = "org.otree-lab.node"  # the node an instance lives on (on its services)
LABEL_PORT = "org.otree-lab.host-port"  # the app's published port on its node
SUBNET_PREFIX = 27  # an overlay: VIPs and tasks of 3-4 services and a load-balancer address per node
NETWORKS = {"internal": "net", "edge": "edge"}
TASK_ACTIVE = ("new", "pending", "assigned", "accepted", "preparing", "ready", "starting")
TASK_FAILED = ("failed", "rejected", "orphaned")
# A service's update (new settings, restart): the old task stops first (the same volume,
# the same host port), nothing is monitored afterwards (the manager checks the app itself).
UPDATE = {"Parallelism": 1, "Order": "stop-first", "FailureAction": "continue", "Monitor": 0}
REGISTRY_USER = "lab"  # the built-in registry's one user (pushes and pulls)
REGISTRY_HTPASSWD = "registry-htpasswd"  # its password file, a swarm secret in /run/secrets
# The registry answers (401 without the password: it serves; 503: its storage fails).
REGISTRY_HEALTH = ("exec 3<>/dev/tcp/127.0.0.1/5000; printf 'GET /v2/ HTTP/1.0\\r\\n\\r\\n' >&3; "
                   "read -r -t 3 _ s _ <&3; [ \"$s\" = 401 ] || [ \"$s\" = 200 ]")
JOB_OUTPUT_MB = 512  # a job's base64 output (a pg_dump of another node) is read up to this size

_user_errors = user_errors(_docker_error)


def _tar(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sortable(stamp: str) -> str:
    """An RFC 3339 time of the engine's logs, sortable as text (fraction padded)."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return f"{head}.{frac.ljust(9, '0')}"


def _nanos(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class SwarmRuntime(DockerRuntime):
    """`base.Runtime` on Docker Swarm (Docker SDK, API 1.41+, engine 20.10+)."""

    name = "swarm"
    isolation = (
        "Docker Swarm services on one node of the lab's swarm: the app, its PostgreSQL and its Redis share a "
        "private overlay network that no other instance reaches; each runs with its own memory, CPU and process "
        "limits, without capabilities."
    )
    limits_cpu = True
    # What a service reserves on its node (placement: a node is full when its reservations
    # reach its memory); the app reserves a quarter of its limit (most apps idle for weeks).
    db_reserve_mb = 64
    redis_reserve_mb = 16
    app_reserve_share = 0.25
    ports = (30000, 32767)  # host-mode ports of apps on other nodes (the manager's node: any free port)

    def __init__(self, *, subnets: str | None = None, registry: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.swarm_subnets = subnets or settings.LAB_SWARM_SUBNETS
        self._overlay_pool = self._parse_pool("LAB_SWARM_SUBNETS", self.swarm_subnets)
        self.registry_setting = registry if registry is not None else settings.LAB_SWARM_REGISTRY
        self.jobs_everywhere = False  # tests: use job services even on the manager's node

    # --- the swarm -------------------------------------------------------------------------

    def available(self) -> bool:
        """An engine that answers and is a manager of an active swarm."""
        try:
            info = self.api.info()
        except (RuntimeError_, APIError, requests.RequestException, OSError):
            return False
        swarm = info.get("Swarm") or {}
        return swarm.get("LocalNodeState") == "active" and bool(swarm.get("ControlAvailable"))

    def _swarm_info(self) -> dict:
        info = self._call("reading the engine's info", self.api.info)
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active":
            raise RuntimeError_("the Docker engine is not part of a swarm: run `docker swarm init` on this machine "
                                "(or use LAB_RUNTIME=docker)")
        if not swarm.get("ControlAvailable"):
            raise RuntimeError_("this machine is a swarm worker: the manager must run on a swarm manager node "
                                "(`docker node promote`)")
        return swarm

    @property
    def local_node(self) -> str:
        if not getattr(self, "_local_node", None):
            self._local_node = self._swarm_info()["NodeID"]
        return self._local_node

    def nodes(self) -> list[dict]:
        """Every node of the swarm: {id, hostname, address, state, availability, role,
        memory_mb, cpus, reserved_mb, instances, local, message}."""
        raw = self._call("listing the swarm's nodes", self.api.nodes)
        reserved: dict[str, int] = {}
        placed: dict[str, set] = {}
        for service in self._services():
            node = self._service_node(service)
            res = (service["Spec"]["TaskTemplate"].get("Resources") or {}).get("Reservations") or {}
            reserved[node] = reserved.get(node, 0) + int(res.get("MemoryBytes") or 0)
            placed.setdefault(node, set()).add((service["Spec"].get("Labels") or {}).get(LABEL_INSTANCE, ""))
        found = [self._node_row(node, reserved.get(node["ID"], 0) // 2**20, len(placed.get(node["ID"], set()) - {""}))
                 for node in raw]
        return sorted(found, key=lambda n: (not n["local"], n["hostname"], n["id"]))

    def _node_row(self, node: dict, reserved_mb: int | None, instances: int | None) -> dict:
        status, spec, desc = node.get("Status") or {}, node.get("Spec") or {}, node.get("Description") or {}
        resources = desc.get("Resources") or {}
        return {
            "id": node["ID"],
            "hostname": desc.get("Hostname", ""),
            "address": status.get("Addr", ""),
            "state": status.get("State", "unknown"),
            "message": status.get("Message", ""),
            "availability": spec.get("Availability", "active"),
            "role": spec.get("Role", "worker"),
            "memory_mb": int(resources.get("MemoryBytes") or 0) // 2**20,
            "cpus": (resources.get("NanoCPUs") or 0) / 1e9,
            "reserved_mb": reserved_mb,
            "instances": instances,
            "local": node["ID"] == self.local_node,
        }

    def _node_info(self, node_id: str, *, load: bool = False) -> dict | None:
        """One node as `nodes()` lists it; without `load` from one inspection of the node
        (reserved_mb and instances None: no listing of every service — the state of each
        component asks this)."""
        if load:
            return next((n for n in self.nodes() if n["id"] == node_id), None)
        if not node_id:
            return None
        try:
            node = self.api.inspect_node(node_id)
        except NotFound:
            return None
        except (APIError, requests.RequestException) as exc:
            raise RuntimeError_(f"inspecting node {node_id[:12]}: {_short(exc)}") from None
        return self._node_row(node, None, None)

    def _choose_node(self, memory_mb: int) -> str:
        """The active, ready node with the most memory not yet reserved (then the fewest
        instances); RuntimeError_ when none has room for `memory_mb` more."""
        usable = [n for n in self.nodes() if n["state"] == "ready" and n["availability"] == "active"]
        if not usable:
            raise RuntimeError_("no node of the swarm is ready and active (docker node ls)")
        best = max(usable, key=lambda n: (n["memory_mb"] - n["reserved_mb"], -n["instances"], n["local"]))
        if best["memory_mb"] - best["reserved_mb"] < memory_mb:
            raise RuntimeError_(f"no node of the swarm has {memory_mb} MB of memory left to reserve "
                                f"(the emptiest, {best['hostname']}, has {best['memory_mb'] - best['reserved_mb']} MB): "
                                "add a machine (docker swarm join) or lower instances' memory")
        return best["id"]

    def node_of(self, name: str) -> str:
        """The id of the node instance `name` lives on ('' when it has no database service)."""
        check_name(name)
        service = self._service(name, "db")
        return self._service_node(service) if service else ""

    @staticmethod
    def _service_node(service: dict) -> str:
        labels = service["Spec"].get("Labels") or {}
        if labels.get(LABEL_NODE):
            return labels[LABEL_NODE]
        for constraint in ((service["Spec"]["TaskTemplate"].get("Placement") or {}).get("Constraints") or []):
            m = re.fullmatch(r"node\.id\s*==\s*(\S+)", constraint)
            if m:
                return m.group(1)
        return ""

    def _node_address(self, node_id: str) -> str:
        """Where the manager reaches a port published on node `node_id`."""
        if node_id == self.local_node:
            return "127.0.0.1"
        return self._raw_address(self._call(f"inspecting node {node_id}", self.api.inspect_node, node_id))

    # --- names and labels --------------------------------------------------------------------

    def service_name(self, name: str, component: str) -> str:
        return f"{self._prefix(name)}-{component}"

    def network_name(self, name: str, role: str) -> str:
        if role not in NETWORKS:  # a build's network: the docker backend's (builds run on this engine)
            return super().network_name(name, role)
        return f"{self._prefix(name)}-{NETWORKS[role]}"

    # The docker backend's labels, with this backend's own owner label (builds keep docker's).

    def _swarm_labels(self, name: str, component: str, **extra: str) -> dict[str, str]:
        return self._labels(name, component, owner=LABEL_SWARM, **extra)

    def _swarm_filters(self, name: str | None = None, **extra: str) -> dict:
        return self._filters(name, owner=LABEL_SWARM, **extra)

    def _swarm_ours(self, labels: dict | None, name: str) -> bool:
        return self._ours(labels, name, owner=LABEL_SWARM)

    # --- services -------------------------------------------------------------------------------

    def _services(self, name: str | None = None, **extra: str) -> list[dict]:
        return self._call("listing services", self.api.services, filters=self._swarm_filters(name, **extra))

    def _service(self, name: str, component: str) -> dict | None:
        """The instance's service of `component` (db, redis; app: the current app)."""
        found = [s for s in self._services(name, **{LABEL_COMPONENT: component})
                 if self._swarm_ours(s["Spec"].get("Labels"), name)]
        found.sort(key=lambda s: (s.get("CreatedAt", ""), s["ID"]))
        return found[-1] if found else None

    def _tasks(self, service_id: str) -> list[dict]:
        """The service's tasks, newest first."""
        tasks = self._call("listing tasks", self.api.tasks, filters={"service": service_id})
        return sorted(tasks, key=lambda t: (t.get("CreatedAt", ""), t["ID"]), reverse=True)

    def _current_task(self, service_id: str) -> tuple[dict | None, int]:
        """(the task that should run now, or the newest; how many earlier tasks ended: restarts)."""
        tasks = self._tasks(service_id)
        if not tasks:
            return None, 0
        wanted = [t for t in tasks if t.get("DesiredState") == "running"]
        # Ended by itself (a crash, an exit): not a task an update or a restart shut down.
        ended = [t for t in tasks if (t.get("Status") or {}).get("State") in (*TASK_FAILED, "complete")]
        return (wanted or tasks)[0], len(ended)

    @staticmethod
    def _task_port(task: dict | None) -> str:
        for port in ((task or {}).get("Status") or {}).get("PortStatus", {}).get("Ports") or []:
            if port.get("PublishedPort"):
                return str(port["PublishedPort"])
        return ""

    @staticmethod
    def _task_container(task: dict | None) -> str:
        return (((task or {}).get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID") or ""

    # --- desired configuration --------------------------------------------------------------

    def _image_on(self, image: str, node: str) -> str:
        """The reference a task on `node` runs `image` by: the local image on the manager's
        node, else the image pushed to the lab's registry."""
        if node == self.local_node:
            return image
        return self._pushed(image)

    def _task_template(self, spec: InstanceSpec, component: str, node: str, networks: dict[str, str],
                       port: int | None = None) -> tuple[dict, dict]:
        """(TaskTemplate, EndpointSpec) of a service, from the docker backend's desired
        container configuration."""
        desired = self._desired(spec, component)
        name = spec.name
        container = {
            "Image": self._image_on(desired["image"], node),
            "Args": list(desired["command"]),
            "Env": [f"{k}={v}" for k, v in sorted(desired["env"].items())],
            "Labels": self._swarm_labels(name, component),
            "StopSignal": desired["stop_signal"],
            "StopGracePeriod": _nanos(self.stop_timeout),
            "CapabilityDrop": ["ALL"],
            "Init": bool(desired["init"]),
            "Hostname": component,
        }
        if desired["user"]:
            container["User"] = desired["user"]
        if self._no_new_privileges():
            container["Privileges"] = {"NoNewPrivileges": True}
        if "volume" in desired:
            container["Mounts"] = [{
                "Type": "volume", "Source": desired["volume"], "Target": PGDATA,
                "VolumeOptions": {"Labels": self._swarm_labels(name, "volume"), "DriverConfig": {"Name": "local"}},
            }]
        mb = int(desired["memory_mb"])
        reserve = {"db": self.db_reserve_mb, "redis": self.redis_reserve_mb}.get(component) or \
            max(64, int(mb * self.app_reserve_share))
        cpus = float(desired["cpus"] or 0)
        resources = {
            "Limits": {"MemoryBytes": mb * 2**20, "Pids": int(desired["pids"]),
                       **({"NanoCPUs": int(cpus * 1e9)} if cpus > 0 else {})},
            "Reservations": {"MemoryBytes": min(reserve, mb) * 2**20},
        }
        roles = list(desired["networks"])
        template = {
            "ContainerSpec": container,
            "Resources": resources,
            "RestartPolicy": {"Condition": "any", "Delay": _nanos(1), "MaxAttempts": 0},
            "Placement": {"Constraints": [f"node.id=={node}"]},
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "5m", "max-file": "2"}},
            # The app: its edge network first (the published port), then the instance's own.
            "Networks": [{"Target": networks[role], "Aliases": desired["networks"][role]} for role in roles],
        }
        endpoint = {"Mode": "dnsrr"}  # no virtual IP: IPVS is not in every kernel (this machine has none)
        if component == "app":
            endpoint["Ports"] = [{"Protocol": "tcp", "TargetPort": int(desired["port"]),
                                  "PublishedPort": int(port), "PublishMode": "host"}]
        return template, endpoint

    def _spec_hash(self, template: dict, endpoint: dict) -> str:
        return self._hash({"template": template, "endpoint": endpoint})

    # --- ensure -------------------------------------------------------------------------------

    @_user_errors
    def ensure(self, spec: InstanceSpec) -> InstanceState:
        name = spec.name
        check_name(name)
        self._check_spec(spec)
        networks, node = self._ensure_services(spec)
        # A deploy killed half-way leaves its candidate or the retired app behind (deploys and
        # ensure hold the same instance lock, so none of them is in use now).
        for slot in (CANDIDATE, RETIRED):
            for service in self._services(name, **{LABEL_COMPONENT: slot}):
                self._remove_service(service)
        apps = self._services(name, **{LABEL_COMPONENT: "app"})
        if spec.app is None:
            for service in apps:
                self._remove_service(service)
        else:
            apps.sort(key=lambda s: (s.get("CreatedAt", ""), s["ID"]))
            for service in apps[:-1]:  # two "app"s: a deploy killed between its relabels
                self._remove_service(service)
            self._ensure_app(spec, node, networks, apps[-1] if apps else None)
        return self.state(name)

    def _check_spec(self, spec: InstanceSpec) -> None:
        for label, value in (("database name", spec.db_name), ("database user", spec.db_user)):
            if not SQL_IDENTIFIER.fullmatch(value or ""):
                raise RuntimeError_(f"{label} {value!r} must be a lowercase SQL identifier")
        self._check_image(self.images["db"], service=True)
        self._check_image(self.images["redis"], service=True)
        if spec.app is not None:
            self._check_image(spec.app.image, service=False)

    def _ensure_services(self, spec: InstanceSpec, node: str = "") -> tuple[dict[str, str], str]:
        """Firewall, networks, PostgreSQL and Redis created or repaired, and answering;
        returns (network ids by role, the instance's node: `node`, else where its database
        is, else the emptiest)."""
        name = spec.name
        self._guard()
        node = node or self.node_of(name) or self._choose_node(spec.memory_mb + spec.db_memory_mb
                                                                + spec.redis_memory_mb)
        self._wait_guarded(node)
        networks = {role: self._ensure_overlay(name, role) for role in NETWORKS}
        for component in ("db", "redis"):
            template, endpoint = self._task_template(spec, component, node, networks)
            self._ensure_service(name, component, self.service_name(name, component), template, endpoint, node)
        self._wait_services(name, self.ready_timeout)
        return networks, node

    def _ensure_service(self, name: str, component: str, sname: str, template: dict, endpoint: dict, node: str,
                        **labels: str) -> dict:
        """Create the service `sname`, or update it when its configuration (hash) differs
        or it was scaled down (stop); returns it."""
        config = self._spec_hash(template, endpoint)
        wanted_labels = self._swarm_labels(name, component, **{LABEL_CONFIG: config, LABEL_NODE: node}, **labels)
        current = self._inspect_service(sname)
        if current is not None and not self._swarm_ours(current["Spec"].get("Labels"), name):
            raise RuntimeError_(f"a swarm service named {sname} exists that this manager did not create; "
                                "remove or rename it")
        mode = {"Replicated": {"Replicas": 1}}
        if current is None:
            try:
                self.api.create_service(template, name=sname, labels=wanted_labels, mode=mode,
                                        endpoint_spec=endpoint, update_config=UPDATE)
            except APIError as exc:
                if exc.status_code != 409:  # another ensure made it first: fine
                    raise RuntimeError_(f"creating service {sname}: {_short(exc)}") from None
            return self._inspect_service(sname) or {}
        replicas = ((current["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas")
        if (current["Spec"].get("Labels") or {}).get(LABEL_CONFIG) == config and replicas == 1:
            return current
        self._update_service(current, template=template, labels=wanted_labels, mode=mode, endpoint=endpoint)
        return self._inspect_service(sname) or current

    def _update_service(self, service: dict, *, template: dict | None = None, labels: dict | None = None,
                        mode: dict | None = None, endpoint: dict | None = None) -> None:
        """One update of a service's spec (what is not given stays); retried once when the
        service changed meanwhile (its version)."""
        for attempt in range(3):
            spec = service["Spec"]
            body = {
                "task_template": template if template is not None else spec["TaskTemplate"],
                "name": spec["Name"],
                "labels": labels if labels is not None else spec.get("Labels"),
                "mode": mode if mode is not None else spec.get("Mode"),
                "endpoint_spec": endpoint if endpoint is not None else spec.get("EndpointSpec"),
                "update_config": UPDATE,
            }
            try:
                self.api.update_service(service["ID"], service["Version"]["Index"], **body)
                return
            except NotFound:
                raise RuntimeError_(f"the service {spec['Name']} went away while being updated") from None
            except APIError as exc:
                if "out of sequence" not in _short(exc) or attempt == 2:
                    raise RuntimeError_(f"updating service {spec['Name']}: {_short(exc)}") from None
            service = self._inspect_service(service["ID"]) or service

    def _inspect_service(self, ref: str) -> dict | None:
        try:
            return self._call(f"inspecting service {ref}", self.api.inspect_service, ref)
        except NotFound:
            return None

    def _remove_service(self, service: dict) -> None:
        try:
            self.api.remove_service(service["ID"])
        except NotFound:
            pass
        except APIError as exc:
            raise RuntimeError_(f"removing service {service['Spec']['Name']}: {_short(exc)}") from None

    def _ensure_app(self, spec: InstanceSpec, node: str, networks: dict, current: dict | None) -> dict:
        """The current app service matches the spec (created with a new port, or updated
        keeping its port)."""
        name = spec.name
        if current is not None:
            port = (current["Spec"].get("Labels") or {}).get(LABEL_PORT) or ""
            if self._service_node(current) != node:
                self._remove_service(current)
                current, port = None, ""
        else:
            port = ""
        port = int(port) if port.isdigit() else self._pick_port(node)
        template, endpoint = self._task_template(spec, "app", node, networks, port)
        sname = current["Spec"]["Name"] if current else self._app_service_name(name)
        service = self._ensure_service(name, "app", sname, template, endpoint, node,
                                       **{LABEL_PORT: str(port), LABEL_RELEASE: spec.app.release_id})
        if service:
            self._wait_started(service["ID"], self.ready_timeout)
        return service

    def _wait_started(self, service_id: str, timeout: float) -> None:
        """Until the service's task runs or has ended (as a container's start returns once it
        runs); at most `timeout` seconds (the state then says where it is)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task, _ = self._current_task(service_id)
            if (task or {}).get("Status", {}).get("State") in ("running", "complete", *TASK_FAILED):
                return
            time.sleep(0.1)

    def _app_service_name(self, name: str) -> str:
        return self.service_name(name, f"app-{secrets.token_hex(3)}")

    def _pick_port(self, node: str) -> int:
        if node == self.local_node:
            return free_port()
        taken = {int(p) for s in self._services() for p in [(s["Spec"].get("Labels") or {}).get(LABEL_PORT, "")]
                 if p.isdigit()}
        low, high = self.ports
        for _ in range(100):
            port = secrets.randbelow(high - low) + low
            if port not in taken:
                return port
        raise RuntimeError_("no free port for the app on its node")

    # networks

    def _ensure_overlay(self, name: str, role: str) -> str:
        netname = self.network_name(name, role)
        internal = role == "internal"
        found = [n for n in self._call("listing networks", self.api.networks, names=[netname]) if n["Name"] == netname]
        for net in found:
            if not self._swarm_ours(net.get("Labels"), name):
                raise RuntimeError_(f"a Docker network named {netname} exists that this manager did not create; "
                                    "remove or rename it")
        good = [n for n in found if n.get("Driver") == "overlay" and bool(n.get("Internal")) == internal
                and not n.get("Attachable")]
        good.sort(key=lambda n: (n.get("Created", ""), n["Id"]))
        for net in found:
            if not good or net["Id"] != good[0]["Id"]:
                self._remove_network_quietly(net["Id"])
        if good:
            return good[0]["Id"]
        used = self._used_subnets()
        pool = self._overlay_pool
        count = 2 ** (SUBNET_PREFIX - pool.prefixlen)
        start = int(hashlib.sha256(netname.encode()).hexdigest(), 16) % count
        for i in range(count):
            subnet = ipaddress.ip_network(
                (int(pool.network_address) + ((start + i) % count) * 2 ** (32 - SUBNET_PREFIX), SUBNET_PREFIX))
            if any(subnet.overlaps(u) for u in used if u.version == 4):
                continue
            ipam = {"Driver": "default", "Config": [{"Subnet": str(subnet)}]}
            try:
                net = self.api.create_network(netname, driver="overlay", internal=internal, attachable=False,
                                              ipam=ipam, labels=self._swarm_labels(name, "network",
                                                                                   **{LABEL_NETWORK: role}),
                                              check_duplicate=True)
                return net["Id"]
            except APIError as exc:
                text = _short(exc).lower()
                if "overlap" in text or "pool" in text:
                    used.append(subnet)
                    continue
                if "already exists" in text or exc.status_code == 409:
                    return self._ensure_overlay(name, role)
                raise RuntimeError_(f"creating network {netname}: {_short(exc)}") from None
        raise RuntimeError_(f"no free /{SUBNET_PREFIX} subnet left in LAB_SWARM_SUBNETS={self.swarm_subnets}")

    def _remove_network_quietly(self, net_id: str) -> bool:
        try:
            self.api.remove_network(net_id)
            return True
        except NotFound:
            return True
        except APIError:
            return False  # still in use by a task being removed: the next round

    # readiness

    def _wait_services(self, name: str, timeout: float) -> None:
        """Until PostgreSQL and Redis run and answer; fails at the deadline, or at once when
        one of them could not be started (rejected, failed without a restart)."""

        def answers(component):
            service = self._service(name, component)
            if service is None:
                return False
            task, _ = self._current_task(service["ID"])
            if (task or {}).get("Status", {}).get("State") != "running":
                return False
            return self._probe_task(name, component, task)

        def crashed(component):
            service = self._service(name, component)
            if service is None:
                return True
            task, _ = self._current_task(service["ID"])
            state = (task or {}).get("Status", {}).get("State")
            return state == "rejected"

        wait_services(name, ["db", "redis"], answers=answers, crashed=crashed,
                      last_words=lambda c: last_lines(self._task_error(name, c) or self.logs(name, c, tail=20)),
                      timeout=timeout, interval=0.25)

    def _task_error(self, name: str, component: str) -> str:
        service = self._service(name, component)
        if service is None:
            return ""
        task, _ = self._current_task(service["ID"])
        status = (task or {}).get("Status") or {}
        return status.get("Err") or (status.get("Message") if status.get("State") in TASK_FAILED else "") or ""

    def _probe_task(self, name: str, component: str, task: dict) -> bool:
        """Whether the component of a running task answers (PostgreSQL over TCP, Redis PING)."""
        on_manager = task.get("NodeID") == self.local_node and not self.jobs_everywhere
        if component == "db":
            argv = ["pg_isready", "-q", "-h", "127.0.0.1" if on_manager else "db", "-p", "5432", "-t", "2"]
        else:
            argv = ["redis-cli", *([] if on_manager else ["-h", "redis"]), "ping"]
        if on_manager:
            cid = self._task_container(task)
            if not cid:
                return False
            return self._probe_container(cid, component)
        spec = self._service(name, "redis")
        env = {}
        if component == "redis" and spec:
            env = {k: v for k, v in (e.split("=", 1) for e in spec["Spec"]["TaskTemplate"]["ContainerSpec"]
                                     .get("Env") or []) if k == "REDISCLI_AUTH"}
        code, out = self._job(name, task.get("NodeID", ""), self.images[component], argv, env=env, timeout=20)
        return code == 0 and (component == "db" or "PONG" in out)

    def _probe_container(self, cid: str, component: str) -> bool:
        try:
            if component == "db":
                code, _ = self._exec(cid, ["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432", "-t", "2"])
                return code == 0
            code, out = self._exec(cid, ["redis-cli", "ping"])
            return code == 0 and "PONG" in out
        except (APIError, requests.RequestException):
            return False

    # --- jobs: a command on the instance's network and node -------------------------------------

    def _job(self, name: str, node: str, image: str, argv: list[str], *, env: dict | None = None,
             timeout: float = 60, sink=None, user: str = "", mounts: list | None = None,
             network: bool = True) -> tuple[int | None, str]:
        """Run `argv` in a one-off task on node `node` (on the instance's internal network,
        unless `network` is False); (exit code, output). With `sink`, the output is base64
        lines (see `backup_database`) decoded into `sink(bytes)` instead of returned.

        A replicated service of one task that is never restarted, removed when it ended
        (Docker 20.10 leaves the tasks and containers of a removed `ReplicatedJob`,
        moby/moby#44312); the image's declared volumes are tmpfs (no anonymous volume is
        left on the node)."""
        sname = self.service_name(name, f"job-{secrets.token_hex(3)}")
        try:
            declared = (self.api.inspect_image(image).get("Config") or {}).get("Volumes") or {}
        except (NotFound, APIError):
            declared = {}
        template = {
            "ContainerSpec": {"Image": self._image_on(image, node), "Command": argv,
                              "Env": [f"{k}={v}" for k, v in (env or {}).items()],
                              "Labels": self._swarm_labels(name, "job"), "CapabilityDrop": ["ALL"],
                              "Mounts": [*(mounts or []), *({"Type": "tmpfs", "Target": path} for path in declared)]},
            "Resources": {"Limits": {"MemoryBytes": 256 * 2**20, "Pids": 64}},
            "RestartPolicy": {"Condition": "none"},
            "Placement": {"Constraints": [f"node.id=={node}"]},
            "LogDriver": {"Name": "json-file", "Options": {"max-size": f"{JOB_OUTPUT_MB}m", "max-file": "1"}},
        }
        if user or not mounts:
            template["ContainerSpec"]["User"] = user or ("postgres" if image == self.images["db"] else "redis")
        if network:
            template["Networks"] = [{"Target": self._ensure_overlay(name, "internal")}]
        created = self._call(f"starting a job on {name}'s node", self.api.create_service, template, name=sname,
                             labels=self._swarm_labels(name, "job"), mode={"Replicated": {"Replicas": 1}})
        try:
            deadline = time.monotonic() + timeout
            task = None
            while time.monotonic() < deadline:
                task, _ = self._current_task(created["ID"])
                state = (task or {}).get("Status", {}).get("State")
                if state in ("complete", "failed", "rejected", "shutdown", "orphaned"):
                    break
                time.sleep(0.2)
            else:
                return None, f"the job did not finish within {timeout:g} s"
            status = task.get("Status") or {}
            code = (status.get("ContainerStatus") or {}).get("ExitCode")
            if status.get("State") == "rejected":
                return None, status.get("Err") or "the job was rejected"
            out = self._service_output(created["ID"], sink=sink)
            return code, out
        finally:
            try:
                self.api.remove_service(created["ID"])
            except (NotFound, APIError):
                pass

    def _service_output(self, service_id: str, *, sink=None, tail: str | int = "all") -> str:
        """A service's output (stdout and stderr, each line once); with `sink`, stdout's
        base64 lines decoded into it and only stderr returned."""
        chunks = self.api.service_logs(service_id, stdout=True, stderr=sink is None, tail=tail, follow=False,
                                       is_tty=False, timestamps=sink is None)
        if isinstance(chunks, (bytes, str)):
            chunks = [chunks]
        if sink is None:
            # The tasks' lines in the order they were written (the swarm gives them per task).
            text = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks).decode(errors="replace")
            lines = [line.partition(" ") for line in text.splitlines()]
            lines = sorted(((stamp, rest) for stamp, _, rest in lines), key=lambda item: _sortable(item[0]))
            if isinstance(tail, int):
                lines = lines[-tail:]
            return "".join(f"{rest}\n" for _, rest in lines)
        buffer = b""
        for chunk in chunks:
            buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    sink(base64.b64decode(line.strip()))
        if buffer.strip():
            sink(base64.b64decode(buffer.strip()))
        return ""

    # --- deploys -----------------------------------------------------------------------------------

    @_user_errors
    def deploy_app(self, spec: InstanceSpec, *, timeout: float, out=None, before_switch=None) -> str:
        """Start `spec.app` as a second app service (the candidate) on the instance's node,
        wait until it answers HTTP on its own port, call `before_switch()` (its exception
        aborts the deploy), then make it the instance's app; the old one keeps running
        (`app-old`) until `retire_app`. On failure the candidate is removed and the old app
        is untouched."""
        name = spec.name
        check_name(name)
        if spec.app is None:
            raise RuntimeError_("no app to deploy")
        self._check_spec(spec)
        networks, node = self._ensure_services(spec)
        for slot in (CANDIDATE, RETIRED):
            for service in self._services(name, **{LABEL_COMPONENT: slot}):
                self._remove_service(service)
        port = self._pick_port(node)
        template, endpoint = self._task_template(spec, "app", node, networks, port)
        config = self._spec_hash(template, endpoint)
        sname = self._app_service_name(name)
        labels = self._swarm_labels(name, CANDIDATE, **{LABEL_CONFIG: config, LABEL_NODE: node,
                                                        LABEL_PORT: str(port), LABEL_RELEASE: spec.app.release_id})
        created = self._call(f"creating service {sname}", self.api.create_service, template, name=sname,
                             labels=labels, mode={"Replicated": {"Replicas": 1}}, endpoint_spec=endpoint,
                             update_config=UPDATE)
        try:
            url = self._wait_app(created["ID"], node, timeout, out)
            if before_switch is not None:
                before_switch()
        except BaseException:
            self._remove_service({"ID": created["ID"], "Spec": {"Name": sname}})
            raise
        old = self._services(name, **{LABEL_COMPONENT: "app"})
        self._update_service(self._inspect_service(created["ID"]), labels={**labels, LABEL_COMPONENT: "app"})
        for service in old:
            fresh = self._inspect_service(service["ID"])
            if fresh is not None:
                self._update_service(fresh, labels={**fresh["Spec"]["Labels"], LABEL_COMPONENT: RETIRED})
        return url

    def _wait_app(self, service_id: str, node: str, timeout: float, out=None) -> str:
        address = self._node_address(node)

        def step():
            task, ended = self._current_task(service_id)
            if ended:  # the task that ended tells why (the current one is its replacement)
                task = next((t for t in self._tasks(service_id)
                             if (t.get("Status") or {}).get("State") in (*TASK_FAILED, "complete")), task)
            status = (task or {}).get("Status") or {}
            if ended or status.get("State") in TASK_FAILED:
                tail = last_lines(self._service_output(service_id, tail=40), 4) or status.get("Err", "")
                code = (status.get("ContainerStatus") or {}).get("ExitCode")
                why = f"exited with code {code}" if code is not None else (status.get("Err") or "could not start")
                raise AppFailed(f"the app {why} while starting" + (f": {tail}" if tail else ""))
            if status.get("State") != "running":
                return ""
            port = self._task_port(task)
            return f"http://{address}:{port}" if port and address else ""

        return wait_http(step, timeout, out=out,
                         last_words=lambda: last_lines(self._service_output(service_id, tail=40), 4))

    @_user_errors
    def retire_app(self, name: str) -> None:
        check_name(name)
        for service in self._services(name, **{LABEL_COMPONENT: RETIRED}):
            self._remove_service(service)

    # --- state -------------------------------------------------------------------------------------

    @_user_errors
    def state(self, name: str) -> InstanceState:
        check_name(name)
        components = {}
        app_url = ""
        node_id = ""
        for component in ("db", "redis", "app"):
            service = self._service(name, component)
            if service is None:
                components[component] = ComponentState(Health.MISSING)
                continue
            node_id = node_id or self._service_node(service)
            task, restarts = self._current_task(service["ID"])
            components[component] = self._task_state(name, component, service, task, restarts)
            if component == "app" and components[component].health in (Health.RUNNING, Health.STARTING):
                port = self._task_port(task) or (service["Spec"].get("Labels") or {}).get(LABEL_PORT, "")
                address = self._node_address(self._service_node(service))
                app_url = f"http://{address}:{port}" if port and address else ""
        return InstanceState(db=components["db"], redis=components["redis"], app=components["app"], app_url=app_url)

    def _task_state(self, name: str, component: str, service: dict, task: dict | None, restarts: int) -> ComponentState:
        replicas = ((service["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas")
        if replicas == 0:
            return ComponentState(Health.EXITED, "stopped", restarts)
        notes = [f"restarted {restarts}x"] if restarts else []
        if task is None:
            return ComponentState(Health.STARTING, "no task yet", restarts)
        status = task.get("Status") or {}
        state = status.get("State", "")
        node = self._node_info(task.get("NodeID") or self._service_node(service))
        if node is not None and node["state"] != "ready":
            why = f"its node {node['hostname'] or node['id'][:12]} is {node['state']}"
            return ComponentState(Health.EXITED, ", ".join([why, *notes]), restarts)
        if state == "running":
            if component == "app" or self._probe_task(name, component, task):
                return ComponentState(Health.RUNNING, ", ".join(notes), restarts)
            return ComponentState(Health.STARTING, ", ".join(notes or ["not answering yet"]), restarts)
        if state in TASK_ACTIVE:
            detail = status.get("Err") or status.get("Message") or state
            return ComponentState(Health.STARTING, ", ".join([*notes, detail]), restarts)
        code = (status.get("ContainerStatus") or {}).get("ExitCode")
        detail = [*notes, status.get("Err") or f"exit code {code}"]
        return ComponentState(Health.EXITED, ", ".join(d for d in detail if d), restarts)

    # --- operations ----------------------------------------------------------------------------------

    @_user_errors
    def restart_app(self, name: str) -> None:
        check_name(name)
        service = self._service(name, "app")
        if service is None:
            return
        template = dict(service["Spec"]["TaskTemplate"])
        template["ForceUpdate"] = int(template.get("ForceUpdate") or 0) + 1
        before = {t["ID"] for t in self._tasks(service["ID"])}
        self._update_service(service, template=template)
        # Until a new task runs (the old one stops first: the port is the same), at most the
        # stop timeout and the start's.
        deadline = time.monotonic() + self.stop_timeout + self.ready_timeout
        while time.monotonic() < deadline:
            fresh = [t for t in self._tasks(service["ID"]) if t["ID"] not in before]
            if fresh and (fresh[0].get("Status") or {}).get("State") in ("running", *TASK_FAILED, "complete"):
                return
            time.sleep(0.1)

    @_user_errors
    def stop(self, name: str) -> None:
        self._stop(name, ("app", "redis", "db"))

    @_user_errors
    def stop_app(self, name: str) -> None:
        """Only the app's service (scaled to 0: a sleeping instance whose database and Redis
        stay up); `ensure` scales it up again."""
        self._stop(name, ("app",))

    def _stop(self, name: str, components: tuple[str, ...]) -> None:
        check_name(name)
        stopped = []
        for component in components:
            for service in self._services(name, **{LABEL_COMPONENT: component}):
                stopped.append(service["ID"])
                if ((service["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas") != 0:
                    self._update_service(service, mode={"Replicated": {"Replicas": 0}})
        # Stopped when its tasks are (as the other backends' stop): at most the stop timeout and a bit.
        deadline = time.monotonic() + self.stop_timeout + 10
        while time.monotonic() < deadline:
            running = [t for sid in stopped for t in self._tasks(sid)
                       if (t.get("Status") or {}).get("State") in ("running", *TASK_ACTIVE)]
            if not running:
                return
            time.sleep(0.2)

    def _running_db(self, name: str) -> dict:
        service = self._service(name, "db")
        if service is None:
            raise RuntimeError_(f"the database of {name} does not exist")
        task, _ = self._current_task(service["ID"])
        if (task or {}).get("Status", {}).get("State") != "running":
            raise RuntimeError_(f"the database of {name} is not running")
        return task

    @_user_errors
    def backup_database(self, name: str, spec: InstanceSpec, dest: Path) -> int:
        check_name(name)
        task = self._running_db(name)
        if task.get("NodeID") == self.local_node and not self.jobs_everywhere:
            return self._dump_from(self._task_container(task), name, spec, dest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(tmp, "wb") as fh:
                script = ('set -o pipefail; pg_dump -Fc -h db -U "$PGUSER" -d "$PGDATABASE" | base64 -w 76')
                code, errors = self._job(name, task["NodeID"], self.images["db"], ["bash", "-c", script],
                                         env={"PGPASSWORD": spec.db_password, "PGUSER": spec.db_user,
                                              "PGDATABASE": spec.db_name},
                                         timeout=settings.LAB_BUILD_TIMEOUT, sink=fh.write)
                fh.flush()
                os.fsync(fh.fileno())
            if code != 0:
                raise RuntimeError_(f"pg_dump of {name} failed (exit code {code}): {last_lines(errors)}")
            with open(tmp, "rb") as fh:
                if fh.read(5) != b"PGDMP":
                    raise RuntimeError_(f"pg_dump of {name} wrote no custom-format archive")
            size = tmp.stat().st_size
            os.replace(tmp, dest)
            return size
        finally:
            tmp.unlink(missing_ok=True)

    @_user_errors
    def reset_database(self, name: str, spec: InstanceSpec) -> None:
        check_name(name)
        task = self._running_db(name)
        db, user = spec.db_name, spec.db_user
        for value in (db, user):
            if not SQL_IDENTIFIER.fullmatch(value or ""):
                raise RuntimeError_(f"{value!r} is not a lowercase SQL identifier")
        local = task.get("NodeID") == self.local_node and not self.jobs_everywhere
        cmd = [
            "psql", "-v", "ON_ERROR_STOP=1", "-q", "-U", user, "-d", "template1",
            *([] if local else ["-h", "db"]),
            "-c", f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)',
            "-c", f'CREATE DATABASE "{db}" OWNER "{user}"',
        ]
        env = {"PGPASSWORD": spec.db_password}
        try:
            if local:
                code, out = self._exec(self._task_container(task), cmd, user="postgres", env=env)
            else:
                code, out = self._job(name, task["NodeID"], self.images["db"], cmd, env=env, timeout=120)
        except (APIError, requests.RequestException) as exc:
            raise RuntimeError_(f"resetting the database of {name} failed: {_short(exc)}") from None
        if code != 0:
            raise RuntimeError_(f"resetting the database of {name} failed: {last_lines(out)}")

    @_user_errors
    def remove(self, name: str) -> None:
        """Every service, network and volume of the instance, in rounds until nothing is
        left (a service's tasks stop a moment after it is removed; its network and volume
        are in use until then)."""
        check_name(name)
        deadline = time.monotonic() + 90
        node = self.node_of(name)
        while True:
            for service in self._services(name):
                self._remove_service(service)
            left = [s["Spec"]["Name"] for s in self._services(name)]
            for net in self._call("listing networks", self.api.networks, filters=self._swarm_filters(name)):
                if not self._remove_network_quietly(net["Id"]):
                    left.append(f"network {net['Name']}")
            for vol in self._call("listing volumes", self.api.volumes,
                                  filters=self._swarm_filters(name)).get("Volumes") or []:
                try:
                    self.api.remove_volume(vol["Name"], force=True)
                except NotFound:
                    pass
                except APIError as exc:
                    left.append(f"volume {vol['Name']}: {_short(exc)}")
            if not left:
                break
            if time.monotonic() >= deadline:
                raise RuntimeError_(f"could not remove everything of {name}: {left[0]}")
            time.sleep(0.3)
        if node and node != self.local_node:
            info = self._node_info(node)
            if info is not None and info["state"] == "ready":
                self._remove_remote_volume(name, node)
            else:  # a node that is gone keeps the volume; nothing else of the instance is left
                log.warning("the database volume of %s stays on node %s (%s): remove it there",
                            name, (info or {}).get("hostname", node), (info or {}).get("state", "not in the swarm"))
        self.prune_releases(name, set())

    def _remove_remote_volume(self, name: str, node: str) -> None:
        """The PostgreSQL volume on another node: removed there by a job that asks that
        node's engine (its socket, given to this job of the manager's only), again while
        the node still stops the old database (409: in use), for at most a minute."""
        volume = self.volume_name(name)
        script = ("import http.client,socket,sys,time\n"
                  "class C(http.client.HTTPConnection):\n"
                  "    def connect(self):\n"
                  "        self.sock=socket.socket(socket.AF_UNIX); self.sock.connect('/var/run/docker.sock')\n"
                  "for attempt in range(120):\n"
                  "    c=C('localhost'); c.request('DELETE','/volumes/'+sys.argv[1]); r=c.getresponse()\n"
                  "    body=r.read()[:300]\n"
                  "    if r.status in (204,404): sys.exit(0)\n"
                  "    if r.status!=409: break\n"
                  "    time.sleep(0.5)\n"
                  "print(r.status, body.decode(errors='replace')); sys.exit(1)\n")
        code, output = self._job(name, node, settings.LAB_IMAGE_PYTHON, ["python", "-c", script, volume],
                                 timeout=90, user="0:0", network=False,
                                 mounts=[{"Type": "bind", "Source": "/var/run/docker.sock",
                                          "Target": "/var/run/docker.sock"}])
        if code != 0:
            raise RuntimeError_(f"removing the database volume of {name} on its node failed: "
                                f"{last_lines(output) or 'no answer'}")

    @_user_errors
    def logs(self, name: str, component: str = "app", tail: int = 200) -> str:
        check_name(name)
        if component not in ("app", "db", "redis"):
            raise RuntimeError_(f"unknown component {component!r} (app, db or redis)")
        service = self._service(name, component)
        if service is None:
            return ""
        try:
            return self._service_output(service["ID"], tail=max(1, int(tail)))
        except NotFound:
            return ""
        except APIError as exc:
            raise RuntimeError_(f"reading logs of {service['Spec']['Name']}: {_short(exc)}") from None

    @_user_errors
    def owned_instances(self) -> set[str]:
        found = set()
        for kind in (self._services(), self._call("listing networks", self.api.networks, filters=self._swarm_filters()),
                     self._call("listing volumes", self.api.volumes, filters=self._swarm_filters()).get("Volumes")
                     or []):
            for item in kind:
                labels = (item.get("Spec") or {}).get("Labels") if "Spec" in item else item.get("Labels")
                if labels and labels.get(LABEL_INSTANCE):
                    found.add(labels[LABEL_INSTANCE])
        return found

    @_user_errors
    def prune_releases(self, name: str, keep_releases: set[str]) -> list[str]:
        """The docker backend's pruning, after the containers of the instance's removed
        services are gone (a node keeps a task's container a while; its image would count
        as in use) and with the images' registry names (pushed for other nodes) too."""
        check_name(name)
        services = {s["ID"] for s in self._services(name)}
        for container in self._call("listing containers", self.api.containers, all=True,
                                    filters=self._swarm_filters(name)):
            if (container.get("Labels") or {}).get("com.docker.swarm.service.id") not in services:
                try:
                    self.api.remove_container(container["Id"], force=True, v=True)
                except (NotFound, APIError):
                    pass  # being removed by the engine itself
        local = image_tag(self.manager_id, name, 0).rsplit(":", 1)[0]
        removed = []
        for image in self._call("listing images", self.api.images, filters=self._filters(name)):
            for ref in image.get("RepoTags") or []:
                repository, _, tag = ref.rpartition(":")
                m = RELEASE_TAG.search(ref)
                if repository.endswith(f"/lab-{self.manager_id}/{local}") and m and m.group(1) not in keep_releases:
                    try:
                        self.api.remove_image(ref, force=False, noprune=False)
                        removed.append(ref)
                    except (NotFound, APIError):
                        pass
        return removed + super().prune_releases(name, keep_releases)

    # --- moving an instance to another node -------------------------------------------------------

    @_user_errors
    def move_instance(self, name: str, spec: InstanceSpec, target: str, *, dump: Path, out=None) -> dict:
        """Move the instance to node `target`: its app stops, its database is dumped into
        `dump` (nothing is written after: the app is down), PostgreSQL and Redis start on
        the target with a new volume, the dump is restored there, the app starts there, and
        the old volume goes. The instance is down from the app's stop to its start there.
        A failure before the app runs on the target puts everything back on the old node
        (its volume was kept until then) and raises RuntimeError_ with the reason. Redis'
        contents (oTree's live pages) are not moved. Returns {source, target, seconds}."""
        check_name(name)
        say = out or (lambda text: None)
        started = time.monotonic()
        self._check_spec(spec)
        source = self.node_of(name)
        if not source:
            raise RuntimeError_(f"{name} has no database on any node: nothing to move")
        if target == source:
            raise RuntimeError_(f"{name} is on that node already")
        info = self._node_info(target, load=True)
        if info is None:
            raise RuntimeError_(f"no node {target} in the swarm")
        if info["state"] != "ready" or info["availability"] != "active":
            raise RuntimeError_(f"node {info['hostname']} is {info['state']} and {info['availability']}: "
                                "an instance can only move to a ready, active node")
        needed = spec.memory_mb + spec.db_memory_mb + spec.redis_memory_mb
        free = info["memory_mb"] - info["reserved_mb"]
        if free < min(needed, self.db_reserve_mb + self.redis_reserve_mb + max(64, int(spec.memory_mb
                                                                                        * self.app_reserve_share))):
            raise RuntimeError_(f"node {info['hostname']} has only {free} MB of memory left to reserve")
        say(f"Stopping the app of {name} on its node\n")
        for service in self._services(name):
            if (service["Spec"].get("Labels") or {}).get(LABEL_COMPONENT) in ("app", CANDIDATE, RETIRED):
                self._remove_service(service)
        self._wait_no_tasks(name, ("app", CANDIDATE, RETIRED))
        say("Backing up its database\n")
        size = self.backup_database(name, spec, dump)
        say(f"Backup done ({size} bytes); starting PostgreSQL and Redis on {info['hostname']}\n")
        try:
            self._remove_volume_on(name, target)  # a leftover of an earlier stay there holds old data
            for component in ("db", "redis"):
                service = self._service(name, component)
                if service is not None:
                    self._remove_service(service)
            self._wait_no_tasks(name, ("db", "redis"))
            self._ensure_services(spec, node=target)
            say("Restoring the database there\n")
            self._restore(name, spec, target, dump)
            say("Starting the app there\n")
            self.ensure(spec)
        except BaseException as exc:
            say(f"Moving failed ({exc}); going back to the old node\n")
            self._move_back(name, spec, source)
            if isinstance(exc, RuntimeError_):
                raise RuntimeError_(f"moving {name} failed: {exc}; it runs on its old node again") from None
            raise
        self._remove_volume_on(name, source)
        return {"source": source, "target": target, "seconds": round(time.monotonic() - started, 1)}

    def _move_back(self, name: str, spec: InstanceSpec, source: str) -> None:
        for service in self._services(name):
            self._remove_service(service)
        self._wait_no_tasks(name, ("db", "redis", "app", CANDIDATE, RETIRED))
        node = self.node_of(name)
        if node and node != source:
            self._remove_volume_on(name, node)
        self._ensure_services(spec, node=source)
        self.ensure(spec)

    def _wait_no_tasks(self, name: str, components: tuple[str, ...], timeout: float = 60) -> None:
        """Until no task of the instance's services of `components` (removed or being
        removed) runs any more: a volume is free, a port is free."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [c for c in self._call("listing containers", self.api.containers,
                                          filters=self._swarm_filters(name))
                    if (c.get("Labels") or {}).get(LABEL_COMPONENT) in components]
            if not busy and not any((s["Spec"].get("Labels") or {}).get(LABEL_COMPONENT) in components
                                    for s in self._services(name)):
                return
            time.sleep(0.2)
        raise RuntimeError_(f"the old services of {name} did not stop within {timeout:g} s")

    def _remove_volume_on(self, name: str, node: str) -> None:
        if node == self.local_node:
            try:
                vol = self.api.inspect_volume(self.volume_name(name))
            except NotFound:
                return
            if not self._swarm_ours(vol.get("Labels"), name):
                raise RuntimeError_(f"a volume named {self.volume_name(name)} exists that this manager did not create")
            self._call(f"removing the volume of {name}", self.api.remove_volume, vol["Name"], force=True)
        else:
            self._remove_remote_volume(name, node)

    def _restore(self, name: str, spec: InstanceSpec, node: str, dump: Path) -> None:
        """pg_restore of `dump` into the instance's new, empty database on `node`: in its
        container on this machine, or by a job whose image carries the dump (through the
        lab's registry) elsewhere."""
        argv = ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
                "-U", spec.db_user, "-d", spec.db_name]
        env = {"PGPASSWORD": spec.db_password}
        if node == self.local_node:
            task = self._running_db(name)
            cid = self._task_container(task)
            stream = TarStream([("restore.dump", Path(dump), 0o640, 0, self._postgres_gid(cid))])
            try:
                self._call("copying the dump into the database's container", self.api.put_archive, cid, "/tmp",
                           stream)
            finally:
                stream.close()
            code, output = self._long_exec(cid, [*argv, "/tmp/restore.dump"], user="postgres", env=env,
                                           timeout=settings.LAB_BUILD_TIMEOUT)
            self._exec(cid, ["rm", "-f", "/tmp/restore.dump"], user="postgres")
        else:
            code, output = self._job_with_file(name, node, dump, [*argv, "-h", "db", "/restore.dump"], env=env)
        if code != 0:
            raise RuntimeError_(f"restoring the database failed (exit code {code}): {last_lines(output)}")

    def _job_with_file(self, name: str, node: str, src: Path, argv: list[str], *, env: dict) -> tuple[int | None, str]:
        """`_job` on `node` in the database's image with file `src` at /restore.dump."""
        image = self._dump_image(name, src)
        try:
            return self._job(name, node, image, argv, env=env, timeout=settings.LAB_BUILD_TIMEOUT, user="postgres")
        finally:
            try:
                self.api.remove_image(image, force=True)
            except (NotFound, APIError):
                pass

    def _dump_image(self, name: str, dump: Path) -> str:
        """A local image of the database's image plus the dump (for a job on another node);
        the build context is streamed from the file."""
        tag = f"lab-{self.manager_id}-{name}-restore:{secrets.token_hex(4)}"
        dockerfile = f"FROM {self.images['db']}\nCOPY --chown=postgres:postgres restore.dump /restore.dump\n"
        context = TarStream([("Dockerfile", dockerfile.encode(), 0o600, 0, 0), ("restore.dump", Path(dump), 0o600, 0, 0)])
        try:
            errors = [c.get("error") for c in self.api.build(fileobj=context, custom_context=True, tag=tag, rm=True,
                                                              forcerm=True, decode=True, pull=False) if c.get("error")]
        finally:
            context.close()
        if errors:
            raise RuntimeError_(f"preparing the restore on the other node failed: {errors[-1][:300]}")
        return tag

    @_user_errors
    def check_restore(self, name: str, spec: InstanceSpec, src: Path) -> None:
        check_name(name)
        self._restore_on_node(name, spec, Path(src), check=True)

    @_user_errors
    def restore_database(self, name: str, spec: InstanceSpec, src: Path) -> None:
        check_name(name)
        self._restore_on_node(name, spec, Path(src), check=False)

    def _restore_on_node(self, name: str, spec: InstanceSpec, src: Path, *, check: bool) -> None:
        """PG_RESTORE_SCRIPT where the database runs: in its task's container on this
        machine, else by a job on its node whose image carries the backup."""
        task = self._running_db(name)
        if task.get("NodeID") == self.local_node and not self.jobs_everywhere:
            self._restore_in(self._task_container(task), name, spec, src, check=check)
            return
        env = {**restore_names(spec.db_name, spec.db_user), "PGPASSWORD": spec.db_password, "PGHOST": "db"}
        try:
            code, out = self._job_with_file(name, task["NodeID"], src,
                                            ["bash", "-c", PG_RESTORE_SCRIPT, "restore", "/restore.dump",
                                             "check" if check else "restore"], env=env)
        except (APIError, requests.RequestException) as exc:
            raise RuntimeError_(f"restoring the database of {name} failed: {_short(exc)}") from None
        if code != 0:
            raise restore_failure(name, code, out)

    @_user_errors
    def set_node_availability(self, node_id: str, availability: str) -> None:
        """`active`, `pause` or `drain` (no new instances; a drain also has the swarm stop
        the node's tasks, so the manager moves its instances first)."""
        if availability not in ("active", "pause", "drain"):
            raise RuntimeError_(f"availability must be active, pause or drain, not {availability!r}")
        node = self._call(f"inspecting node {node_id}", self.api.inspect_node, node_id)
        spec = dict(node["Spec"], Availability=availability)
        self._call(f"updating node {node_id}", self.api.update_node, node_id, node["Version"]["Index"], spec)

    def instances_on(self, node_id: str) -> list[str]:
        """The instances whose database lives on node `node_id`."""
        return sorted({(s["Spec"].get("Labels") or {}).get(LABEL_INSTANCE, "") for s in self._services()
                       if (s["Spec"].get("Labels") or {}).get(LABEL_COMPONENT) == "db"
                       and self._service_node(s) == node_id} - {""})

    # --- the firewall on the other nodes -------------------------------------------------------------

    GUARD_TIMEOUT = 90  # seconds a node's firewall may take to be in place before an instance starts there
    GUARD_OK = "/run/otree-lab-guard.ok"  # see instances/node_guard.py

    def guard_service_name(self) -> str:
        return f"lab-{self.manager_id}-netguard"

    @staticmethod
    def _raw_address(node: dict) -> str:
        """A node's swarm address: a manager's advertise address (what the other nodes joined
        through, so they reach it there), else the address the swarm saw the node at. (A
        manager's observed address may read 0.0.0.0, or — after its engine restarted — the
        address of another of its interfaces, one the other nodes may not reach.)"""
        for addr in (((node.get("ManagerStatus") or {}).get("Addr") or "").rpartition(":")[0],
                     (node.get("Status") or {}).get("Addr") or ""):
            try:
                found = ipaddress.ip_address(addr.strip("[]"))
            except ValueError:
                continue
            if not found.is_unspecified:
                return str(found)
        return ""

    @classmethod
    def _all_addresses(cls, node: dict) -> set[str]:
        """Every address the swarm knows a node by (advertised and observed)."""
        found = {cls._raw_address(node)}
        try:
            observed = ipaddress.ip_address(((node.get("Status") or {}).get("Addr") or "").strip("[]"))
            if not observed.is_unspecified:
                found.add(str(observed))
        except ValueError:
            pass
        return found - {""}

    def _guard(self):
        """The manager machine's rules (with the swarm's node addresses, which its apps may not
        reach), and the other nodes' firewall service."""
        from instances import netguard

        raw = self._call("listing the swarm's nodes", self.api.nodes)
        hosts = sorted(set().union(*map(self._all_addresses, raw))) if raw else []
        netguard.write_lab_hosts(Path(settings.DATA_DIR), hosts)
        status = super()._guard()
        if any(n["ID"] != self.local_node for n in raw):
            try:
                self._ensure_node_guard(raw, hosts)
                self._node_guard_error = ""
            except RuntimeError_ as exc:  # the instances there wait (`_wait_guarded` says why)
                if str(exc) != self._node_guard_error:
                    log.warning("the other nodes' firewall: %s", exc)
                self._node_guard_error = str(exc)
        return status

    _node_guard_error = ""

    def ensure_protections(self) -> None:
        """The sweep's pass: a node that joined gets the firewall (and the others its address)."""
        self._guard()

    def _ensure_node_guard(self, raw: list[dict], hosts: list[str]) -> None:
        """The global service that keeps netguard's rules on every node but this one
        (instances/node_guard.py); updated when its image, code or policy changed."""
        from instances import netguard

        sname = self.guard_service_name()
        me = sorted(next((self._all_addresses(n) for n in raw if n["ID"] == self.local_node), set()))
        policy = json.dumps({"manager_id": self.manager_id, "overlays": self.swarm_subnets,
                             "egress": settings.LAB_EGRESS, "lab_hosts": hosts, "proxy_from": me},
                            sort_keys=True)
        sources = {"netguard.py": Path(netguard.__file__).read_bytes(),
                   "node_guard.py": Path(netguard.__file__).with_name("node_guard.py").read_bytes()}
        image = settings.LAB_IMAGE_NETGUARD
        if not self._image_exists(image):
            raise RuntimeError_(f"image {image} (the other nodes' firewall) not found: build it with "
                                "`python manage.py build_images --only netguard`")
        image_id = self._call(f"inspecting {image}", self.api.inspect_image, image)["Id"]
        wanted = hashlib.sha256(json.dumps([image_id, policy, {k: hashlib.sha256(v).hexdigest()
                                                               for k, v in sources.items()}]).encode()).hexdigest()[:16]
        service = self._inspect_service(sname)
        if service is not None and (service["Spec"].get("Labels") or {}).get(LABEL_SWARM) != self.manager_id:
            raise RuntimeError_(f"a swarm service named {sname} exists that this manager did not create")
        if service is not None and (service["Spec"].get("Labels") or {}).get(LABEL_CONFIG) == wanted:
            return
        labels = {LABEL_SWARM: self.manager_id, LABEL_COMPONENT: "netguard"}
        configs = []
        for filename, data in sources.items():
            cname = f"lab-{self.manager_id}-netguard-{filename.removesuffix('.py').replace('_', '-')}-" \
                    f"{hashlib.sha256(data).hexdigest()[:12]}"
            found = [c for c in self._call("listing configs", self.api.configs, filters={"name": cname})
                     if c["Spec"]["Name"] == cname]
            if found and (found[0]["Spec"].get("Labels") or {}).get(LABEL_SWARM) != self.manager_id:
                raise RuntimeError_(f"a swarm config named {cname} exists that this manager did not create")
            config_id = found[0]["ID"] if found else self._call(
                "creating a swarm config", self.api.create_config, cname, data, labels=labels)["ID"]
            configs.append({"File": {"Name": f"/guard/{filename}", "UID": "0", "GID": "0", "Mode": 0o444},
                            "ConfigID": config_id, "ConfigName": cname})
        host = self._call("inspecting the host network", self.api.inspect_network, "host")["Id"]
        template = {
            "ContainerSpec": {"Image": self._pushed(image), "Command": ["python3", "/guard/node_guard.py"],
                              "Env": [f"LAB_NODE_GUARD={policy}"], "Labels": labels, "Configs": configs,
                              "CapabilityDrop": ["ALL"], "CapabilityAdd": ["CAP_NET_ADMIN", "CAP_NET_RAW"],
                              "Healthcheck": {"Test": ["CMD", "test", "-e", self.GUARD_OK], "Interval": _nanos(2),
                                              "Timeout": _nanos(5), "Retries": 2, "StartPeriod": _nanos(60)}},
            "Networks": [{"Target": host}],
            "Resources": {"Limits": {"MemoryBytes": 64 * 2**20, "Pids": 32},
                          "Reservations": {"MemoryBytes": 16 * 2**20}},
            "RestartPolicy": {"Condition": "any", "Delay": _nanos(2)},
            "Placement": {"Constraints": [f"node.id!={self.local_node}"]},
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "1m", "max-file": "2"}},
        }
        if service is None:
            try:
                self.api.create_service(template, name=sname, labels={**labels, LABEL_CONFIG: wanted},
                                        mode={"Global": {}})
            except APIError as exc:
                if exc.status_code != 409:
                    raise RuntimeError_(f"starting the nodes' firewall: {_short(exc)}") from None
        else:
            self._update_service(service, template=template, labels={**labels, LABEL_CONFIG: wanted})
        in_use = {c["ConfigID"] for c in configs}
        for config in self._call("listing configs", self.api.configs,
                                 filters={"label": [f"{LABEL_SWARM}={self.manager_id}", f"{LABEL_COMPONENT}=netguard"]}):
            if config["ID"] not in in_use:
                try:
                    self.api.remove_config(config["ID"])
                except (NotFound, APIError):
                    pass  # still named by a task being replaced: the next pass

    def node_guarded(self, node: str) -> tuple[bool, str]:
        """Whether the firewall is in place on `node` (another node than the manager's): its
        guard task runs (it counts as running only once its rules are in place); else why not."""
        service = self._inspect_service(self.guard_service_name())
        if service is None:
            return False, self._node_guard_error or "the nodes' firewall service is not running"
        tasks = self._call("listing the firewall's tasks", self.api.tasks,
                           filters={"service": service["ID"], "node": node})
        tasks.sort(key=lambda t: t.get("UpdatedAt", ""), reverse=True)
        if any((t.get("Status") or {}).get("State") == "running" and t.get("DesiredState") == "running" for t in tasks):
            return True, ""
        if not tasks:
            return False, "no firewall task on the node yet"
        status = tasks[0].get("Status") or {}
        return False, f"its firewall task is {status.get('State', 'unknown')}" + \
            (f": {status['Err']}" if status.get("Err") else "")

    def _wait_guarded(self, node: str) -> None:
        """Wait until the firewall is in place on `node` before an instance starts there."""
        if node == self.local_node:
            return
        info = self._node_info(node) or {}
        if info.get("state") != "ready":
            return  # nothing starts there now; the instance's state names the node as down
        deadline = time.monotonic() + self.GUARD_TIMEOUT
        while True:
            ok, why = self.node_guarded(node)
            if ok:
                return
            if time.monotonic() >= deadline:
                where = info.get("hostname", node[:12])
                raise RuntimeError_(f"the firewall of node {where} is not in place ({why}); no instance starts "
                                    f"there until it is (docker service ps {self.guard_service_name()})")
            time.sleep(0.5)

    # --- the registry -------------------------------------------------------------------------------

    def registry_service_name(self) -> str:
        return f"lab-{self.manager_id}-registry"

    def _registry(self) -> tuple[str, str]:
        """(where the manager pushes, where nodes pull from): LAB_SWARM_REGISTRY for both, or
        the registry service this backend runs on the manager's node — pushed to over
        loopback, pulled from at the node's swarm address."""
        if self.registry_setting:
            return self.registry_setting, self.registry_setting
        sname = self.registry_service_name()
        service = self._inspect_service(sname)
        if service is not None and (service["Spec"].get("Labels") or {}).get(LABEL_SWARM) != self.manager_id:
            raise RuntimeError_(f"a swarm service named {sname} exists that this manager did not create")
        node = self.local_node
        port = int((service or {}).get("Spec", {}).get("Labels", {}).get(LABEL_PORT, "0") or 0) or free_port()
        image = settings.LAB_IMAGE_REGISTRY
        self._check_image(image, service=True)
        password = self.registry_password()
        secret = self._ensure_registry_secret(password)
        template = {
            "ContainerSpec": {"Image": image, "Labels": {LABEL_SWARM: self.manager_id, LABEL_COMPONENT: "registry"},
                              "Mounts": [{"Type": "volume", "Source": f"lab-{self.manager_id}-registry",
                                          "Target": "/var/lib/docker-registry",
                                          "VolumeOptions": {"Labels": {LABEL_SWARM: self.manager_id,
                                                                       LABEL_COMPONENT: "registry"}}}],
                              # Only with the password (pushes: the manager; pulls: the nodes'
                              # engines, given it with each service that names an image there).
                              "Env": ["REGISTRY_AUTH=htpasswd", "REGISTRY_AUTH_HTPASSWD_REALM=otree-lab",
                                      f"REGISTRY_AUTH_HTPASSWD_PATH=/run/secrets/{REGISTRY_HTPASSWD}"],
                              "Secrets": [{"File": {"Name": REGISTRY_HTPASSWD, "UID": "999", "GID": "999",
                                                    "Mode": 0o400},
                                           "SecretID": secret["ID"], "SecretName": secret["Spec"]["Name"]}],
                              # The image's check wants 200 from /v2/; with a password it answers 401.
                              "Healthcheck": {"Test": ["CMD", "bash", "-c", REGISTRY_HEALTH], "Interval": _nanos(5),
                                              "Timeout": _nanos(3), "Retries": 3},
                              "CapabilityDrop": ["ALL"]},
            "Resources": {"Limits": {"MemoryBytes": 256 * 2**20, "Pids": 128},
                          "Reservations": {"MemoryBytes": 32 * 2**20}},
            "RestartPolicy": {"Condition": "any", "Delay": _nanos(1)},
            "Placement": {"Constraints": [f"node.id=={node}"]},
            "LogDriver": {"Name": "json-file", "Options": {"max-size": "5m", "max-file": "2"}},
        }
        endpoint = {"Mode": "dnsrr", "Ports": [{"Protocol": "tcp", "TargetPort": 5000, "PublishedPort": port,
                                              "PublishMode": "host"}]}
        labels = {LABEL_SWARM: self.manager_id, LABEL_COMPONENT: "registry", LABEL_PORT: str(port),
                  LABEL_CONFIG: self._spec_hash(template, endpoint)}
        if service is None:
            try:
                self.api.create_service(template, name=sname, labels=labels, mode={"Replicated": {"Replicas": 1}},
                                        endpoint_spec=endpoint)
            except APIError as exc:
                if exc.status_code != 409:
                    raise RuntimeError_(f"starting the lab's registry: {_short(exc)}") from None
        elif (service["Spec"].get("Labels") or {}).get(LABEL_CONFIG) != labels[LABEL_CONFIG]:
            self._update_service(service, template=template, labels=labels, endpoint=endpoint)
        push = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://{push}/v2/", auth=(REGISTRY_USER, password), timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError_(f"the lab's registry ({sname}) does not answer on {push}: "
                                    f"{last_lines(self._service_output(sname, tail=10))}")
            time.sleep(0.2)
        address = self._raw_address(self._call("inspecting this node", self.api.inspect_node, node))
        pull = f"{address}:{port}"
        self._remove_unused_secrets(keep=secret["ID"])
        # The SDK sends these with pushes and with every service it creates or updates whose
        # image is there (X-Registry-Auth: the swarm hands it to the node that pulls).
        from docker import auth as docker_auth

        if not isinstance(self.api._auth_configs, docker_auth.AuthConfig) or self.api._auth_configs.is_empty:
            self.api._auth_configs = docker_auth.load_config(credstore_env=self.api.credstore_env)
        for registry in (push, pull):
            self.api._auth_configs.add_auth(registry, {"username": REGISTRY_USER, "password": password,
                                                       "serveraddress": registry})
        return push, pull

    def registry_password(self) -> str:
        """The built-in registry's password: derived from the manager's secret key (nothing
        to store; a new key gives a new password, and the registry follows)."""
        return hmac.new(settings.SECRET_KEY.encode(), f"otree-lab registry {self.manager_id}".encode(),
                        hashlib.sha256).hexdigest()[:40]

    def _ensure_registry_secret(self, password: str) -> dict:
        """The registry's htpasswd file (bcrypt) as a swarm secret, named by the password's
        fingerprint (a secret cannot change; a new password makes a new one)."""
        import bcrypt

        name = f"lab-{self.manager_id}-registry-htpasswd-{hashlib.sha256(password.encode()).hexdigest()[:12]}"
        found = [x for x in self._call("listing secrets", self.api.secrets, filters={"name": name})
                 if x["Spec"]["Name"] == name]
        if found:
            if (found[0]["Spec"].get("Labels") or {}).get(LABEL_SWARM) != self.manager_id:
                raise RuntimeError_(f"a swarm secret named {name} exists that this manager did not create")
            return found[0]
        line = f"{REGISTRY_USER}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()}\n"
        created = self._call("creating the registry's password file", self.api.create_secret, name, line.encode(),
                             labels={LABEL_SWARM: self.manager_id, LABEL_COMPONENT: "registry-auth"})
        return {"ID": created["ID"], "Spec": {"Name": name}}

    def _remove_unused_secrets(self, keep: str) -> None:
        for secret in self._call("listing secrets", self.api.secrets,
                                 filters={"label": [f"{LABEL_SWARM}={self.manager_id}",
                                                    f"{LABEL_COMPONENT}=registry-auth"]}):
            if secret["ID"] != keep:
                try:
                    self.api.remove_secret(secret["ID"])
                except (NotFound, APIError):
                    pass  # still named by the registry's old task: the next pass

    def _pushed(self, image: str) -> str:
        """`image` (on this engine) pushed to the lab's registry; the reference nodes pull:
        `<registry>/<path>@sha256:...`, the digest of what was pushed."""
        push, pull = self._registry()
        repository, _, tag = image.rpartition(":")
        if not repository or "/" in tag:
            repository, tag = image, "latest"
        path = f"lab-{self.manager_id}/{repository.replace(':', '-')}"
        local = f"{push}/{path}"
        self._call(f"tagging {image} for the registry", self.api.tag, image, local, tag)
        errors, digest = [], ""
        try:
            for chunk in self.api.push(local, tag=tag, stream=True, decode=True):
                if chunk.get("error"):
                    errors.append(chunk["error"])
                digest = (chunk.get("aux") or {}).get("Digest") or digest
        except (APIError, requests.RequestException) as exc:
            errors.append(_short(exc))
        if errors:
            raise RuntimeError_(f"pushing {image} to the lab's registry ({push}) failed: {errors[-1][:300]}")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise RuntimeError_(f"pushing {image} to the lab's registry ({push}): the registry named no digest")
        # By digest: a node runs exactly what was pushed, whatever a tag in the registry
        # names later (the engine checks the content against the digest).
        return f"{pull}/{path}@{digest}"

    # --- the page -----------------------------------------------------------------------------------

    def database_label(self, name: str) -> str:
        return "PostgreSQL (its own Swarm service, on the instance's node)"

    def _no_new_privileges(self) -> bool:
        """Swarm services take no-new-privileges from Docker 27 on (API 1.46)."""
        try:
            major, minor = (int(x) for x in str(self.api.api_version).split(".")[:2])
        except (ValueError, RuntimeError_):
            return False
        return (major, minor) >= (1, 46)

    def protections(self, name: str) -> list:
        """What holds for a swarm instance: the task's own settings; the firewall's part as
        netguard finds it on the manager's node, or as the node's firewall task says."""
        from instances import netguard

        from .docker import PAGE_STATUS_AGE

        guard = netguard.status(self.policy, max_age=PAGE_STATUS_AGE)
        try:
            node = self.node_of(name)
            remote = bool(node) and node != self.local_node
            where = (self._node_info(node) or {}).get("hostname", node[:12]) if remote else "this machine"
            fenced, why = self.node_guarded(node) if remote else (guard.enforced, guard.detail)
        except RuntimeError_ as exc:
            remote, where, fenced, why = True, "its node", False, f"the swarm does not answer: {exc}"
        why = f" — on {where}: {why}" if not fenced else ""
        egress = settings.LAB_EGRESS
        nnp = self._no_new_privileges()
        return [
            Protection("Files", True, "its own Swarm task's file system: no folder of its node, no Docker socket; the "
                                      "app runs as uid 10001 with every capability dropped"
                       + ("" if nnp else "; Swarm gives services no-new-privileges only from Docker 27 on, so a "
                                         "setuid program of the image could become root inside its own container "
                                         "(still without capabilities)")),
            Protection("Host and other instances", fenced,
                       "its own PostgreSQL and Redis (password) on a private overlay network; the firewall of its "
                       f"node ({where}) keeps it from every service of that node, from the swarm's other nodes "
                       "(the lab's registry included), from other instances and from link-local/metadata "
                       "addresses" if fenced else
                       "other instances' services are on overlay networks it cannot reach, but the firewall is not "
                       f"in place: services of its node and metadata addresses may answer{why}"),
            Protection("Outside network", True if egress == "open" else fenced,
                       "open by the lab's choice (LAB_EGRESS=open): the app may call services outside the lab's "
                       "machines" if egress == "open" else
                       "closed (LAB_EGRESS=deny): the app opens no connection out of its node"
                       if fenced else f"LAB_EGRESS=deny is not enforced{why}"),
            Protection("Its port", fenced,
                       "Swarm publishes the app's port on every address of its node; the firewall lets only the "
                       "manager's machine reach it (participants come through the proxy)" if fenced else
                       f"Swarm publishes the app's port on every address of its node: without the firewall the app "
                       f"answers there without the proxy{why}"),
            Protection("Memory", True, "the instance's memory limit (PostgreSQL and Redis have their own); Swarm sets "
                                       "no swap limit: where its node has swap, the app may use swap too"),
            Protection("CPU", True, "the instance's CPU limit (a share of its node's CPUs, enforced by the kernel)"),
            Protection("Processes", True, f"at most {self.pids_limits['app']} processes in the app's container"),
            Protection("Builds", guard.enforced,
                       f"on the manager's machine, as for Docker: pip runs in a container of its own as uid 10001 "
                       f"without capabilities, with the instance's memory and CPU limits and at most "
                       f"{self.build_pids} processes, on a network that reaches only the outside"
                       + ("" if guard.enforced else f"; the firewall is not in place — {guard.detail}")),
        ]


BACKEND = SwarmRuntime  # instances.runtime finds a backend by this name (the module is the backend)
