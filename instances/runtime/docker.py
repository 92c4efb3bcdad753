"""The Docker backend: one instance = an app container, its own PostgreSQL and its own
Redis, on networks of their own.

Per instance `<name>` of manager `<id>` (`settings.LAB_MANAGER_ID`):

| resource | name | what |
|---|---|---|
| network | `lab-<id>-<name>-net` | `internal=True` bridge: app, db (alias `db`), redis (alias `redis`); no route out, none to other instances |
| network | `lab-<id>-<name>-edge` | ordinary bridge with inter-container traffic off: only the app, only for its published port |
| network | `lab-<id>-<name>-build` | only while its requirements are installed: ordinary bridge, inter-container traffic off, a /28 of `LAB_DOCKER_BUILD_SUBNETS` |
| volume | `lab-<id>-<name>-pgdata` | PostgreSQL's data |
| containers | `lab-<id>-<name>-db`, `-redis`, `-app` | limits, `no-new-privileges`, all capabilities dropped, never privileged, no host mounts |
| container | `lab-<id>-<name>-build` | only while its requirements are installed: pip as uid 10001, the instance's limits (see "Builds") |

Every one of them carries the labels `org.otree-lab.manager=<id>`,
`org.otree-lab.instance=<name>` and `org.otree-lab.component=db|redis|app|network|volume`;
the backend finds its resources by these labels and refuses to touch (or reuse) anything
that carries a name of ours without them. Containers carry a hash of their whole
configuration (`org.otree-lab.config`): a container whose hash differs from the desired
one is replaced, so `ensure()` repairs drift and applies new releases, env and limits.

Every step of `ensure()` is idempotent and each Docker call is atomic, so a worker killed
at any point leaves a state the next `ensure()` finishes: a missing piece is created, a
stopped one started, a container attached to a stale network recreated, a duplicate
network (two racing creates) removed.

The subnets of the instance networks come from `settings.LAB_DOCKER_SUBNETS` (/28 each):
Docker's default address pools hold only ~30 bridge networks, i.e. 15 instances.

Redis asks for a password (derived from the instance's database password; REDIS_URL
carries it). What a container may reach beyond its own networks (nothing of this
machine, no link-local/metadata address, the outside as LAB_EGRESS says) is the
firewall's job (instances.netguard): `ensure()`, `deploy_app()` and builds apply it
first (a cheap check when in place), and `protections()` reports its real status.

Builds: nothing of the tenant's runs inside `docker build`. The requirements (whose
source packages run their setup.py) are installed by pip in a container this backend
creates with full control: uid 10001, no capabilities, no-new-privileges, the instance's
memory and CPU limits and a pids limit, /tmp on tmpfs, on the instance's build network,
with a time limit; pip installs into /opt/venv (made for uid 10001 before the start). The
container is committed into a dependencies image, cached by base image and requirements
(identical requirements share one, across instances: images are immutable, and each
build of them runs the same packages' code anyway). The release image is then a
`docker build` whose Dockerfile only copies the project onto it (no RUN step), so a
code-only push costs one COPY.

With LAB_INSTALLER=uv (the default) the same container runs uv instead of pip, with the
manager's wheel cache volume mounted read-only (instances/wheelcache.py has the design:
only the manager writes the cache, with wheels whose sha256 PyPI published), and a
requirements push builds on the instance's current dependencies image (`uv pip install
--exact`: only what changed is installed), up to MAX_DEPS_LAYERS layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import tarfile
import time
import uuid
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

import docker
import requests
from docker.errors import APIError, DockerException, NotFound
from django.conf import settings
from docker.types import LogConfig, Mount

from instances import wheelcache
from instances.otree_project import (
    APP_PORT, IGNORED, INTROSPECT, PIP_KILLED, BuildFailed, explain_pip, parse_introspection, start_argv,
)

from .uvcache import DOCKER_MOUNT, DockerWheelCache
from .base import (
    CANDIDATE, COMPONENTS, PG_RESTORE_SCRIPT, POSTGRES_TUNING, RETIRED, SQL_IDENTIFIER, AppFailed, AppSpec,
    ComponentState, Health, InstanceSpec, InstanceState, RuntimeError_, TarStream, check_name, free_port, last_lines,
    restore_failure, restore_names, user_errors, wait_http, wait_services,
)

LABEL_MANAGER = "org.otree-lab.manager"
LABEL_INSTANCE = "org.otree-lab.instance"
LABEL_COMPONENT = "org.otree-lab.component"
LABEL_NETWORK = "org.otree-lab.network"  # internal | edge
LABEL_CONFIG = "org.otree-lab.config"
LABEL_RELEASE = "org.otree-lab.release"
RELEASE_TAG = re.compile(r":r(\d+)$")  # release images are tagged <repository>:r<number>
LABEL_APP_PORT = "org.otree-lab.app-port"
LABEL_DEPS = "org.otree-lab.deps"  # the dependencies image (its key) a release image was built on

NETWORK_ROLES = ("internal", "edge")  # every instance's; "build" only while a build installs its requirements
NETWORK_SUFFIX = {"internal": "net", "edge": "edge", "build": "build"}
SUBNET_PREFIX = 28  # 16 addresses: gateway + app + db + redis with room to spare

PGDATA = "/var/lib/postgresql/data"  # the volume's mount point
POSTGRES_ARGS = {"listen_addresses": "*", **POSTGRES_TUNING}

MANAGER_ID = re.compile(r"[a-z0-9]{1,16}")
PAGE_STATUS_AGE = 15  # seconds the firewall's status shown on instance pages may be old

log = logging.getLogger(__name__)


def _short(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        text = exc.explanation or str(exc)
    else:
        text = str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = " ".join(str(text).split())
    return text[:300]


def _timestamp(text: str) -> str:
    """Docker's RFC 3339 time with its fraction padded to 9 digits: sortable as text."""
    head, _, frac = text.rstrip("Z").partition(".")
    frac, sep, zone = frac.partition("+") if "+" in frac else (frac, "", "")
    return f"{head}.{frac.ljust(9, '0')}{sep}{zone}"


def _docker_error(runtime, method: str, exc: Exception) -> RuntimeError_ | None:
    if isinstance(exc, APIError):
        return RuntimeError_(f"Docker: {_short(exc)}")
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return runtime._unreachable(exc)
    return None


_user_errors = user_errors(_docker_error)  # whatever Docker raises leaves a public method as a RuntimeError_


# --- builds: the dependencies image (pip in a locked-down container) and the release image ---

APP_USER = "10001:10001"  # the app and its build run unprivileged (set on every app and build container)

# Ours, not the tenant's: run in the build container as APP_USER, in /app (requirements.txt
# is the only file there, as it was in the former pip step of the Dockerfile). The venv
# sees the base image's packages (pip, setuptools: what the former system-wide install
# offered; the venv's own come first) through a .pth file instead of getting copies:
# ensurepip would cost seconds at every install.
DEPS_SCRIPT = """set -e
export HOME=/tmp PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_NO_INPUT=1
python -m venv --without-pip /opt/venv
purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
python -c "$purelib" > "$(/opt/venv/bin/python -c "$purelib")/_base_image_packages.pth"
exec /opt/venv/bin/python -m pip install -r /app/requirements.txt
"""
DEPS_ENV: dict[str, str] = {}  # nothing of the instance's, nothing secret
DEPS_RECIPE = "2"  # changes when deps_changes() does: older dependencies images are not reused


# The uv build (LAB_INSTALLER=uv; instances/wheelcache.py): the same container, the wheel
# cache's volume mounted read-only at DOCKER_MOUNT, uv's own cache private in /tmp.
UV_DEPS_SCRIPT = (
    f"export OTL_UV={DOCKER_MOUNT}/uv OTL_WHEELS={DOCKER_MOUNT}/wheels OTL_PYTHON=python OTL_VENV=/opt/venv "
    "OTL_REQUIREMENTS=/app/requirements.txt OTL_TMP=/tmp OTL_BASE_PTH=1\n" + wheelcache.UV_SCRIPT)
LABEL_REQUIREMENTS = "org.otree-lab.requirements"  # sha256 of the requirements.txt a dependencies image holds
MAX_DEPS_LAYERS = 20  # uv builds on the instance's previous dependencies image up to this many layers


def deps_key(base_image_id: str, requirements: bytes, script: str = DEPS_SCRIPT) -> str:
    """The cache key of a dependencies image: the image it is built on (the base image,
    or with uv the instance's previous dependencies image), our recipe and the exact
    requirements.txt (identical inputs share one image, across instances)."""
    digest = hashlib.sha256()
    for part in (DEPS_RECIPE.encode(), script.encode(), base_image_id.encode(), requirements):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def deps_tag(manager_id: str, key: str) -> str:
    # "--": no instance's release repository can be named so (names never start with "-").
    return f"otree-lab-{manager_id}--deps:{key[:24]}"


def deps_archive(requirements: bytes) -> bytes:
    """What the build container gets before it starts: /opt/venv and /app for APP_USER,
    /app/requirements.txt (read-only for it)."""
    uid = int(APP_USER.split(":")[0])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, owner, data in (("opt/venv", uid, None), ("app", uid, None), ("app/requirements.txt", 0, requirements)):
            info = tarfile.TarInfo(path)
            info.uid = info.gid = owner
            info.mtime = int(time.time())
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deps_changes(runtime, key: str, base_env: list[str], requirements: bytes = b"") -> list[str]:
    """What the committed dependencies image says besides its files: labels (no instance:
    it may serve several), and the app's environment, directory, port and command (set
    here once, not as uncached steps of every release build on it)."""
    labels = {LABEL_MANAGER: runtime.manager_id, LABEL_INSTANCE: "", LABEL_COMPONENT: "deps", LABEL_DEPS: key,
              LABEL_REQUIREMENTS: hashlib.sha256(requirements).hexdigest()}
    path = next((e.split("=", 1)[1] for e in base_env if e.startswith("PATH=")), "/usr/local/bin:/usr/bin:/bin")
    env = {"PATH": f"/opt/venv/bin:{path}", "VIRTUAL_ENV": "/opt/venv", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return [
        f"LABEL {' '.join(f'{k}={json.dumps(v)}' for k, v in labels.items())}",
        f"ENV {' '.join(f'{k}={json.dumps(v)}' for k, v in env.items())}",
        "WORKDIR /app",
        f"EXPOSE {APP_PORT}",
        f"CMD {json.dumps(start_argv(str(APP_PORT)))}",
    ]


def dockerfile(labels: dict[str, str], base: str) -> str:
    """The release image: the dependencies image (environment, directory, port and
    command included) plus the project's files. No RUN step: nothing of the tenant's
    runs in the builder. The LABEL step is the same for each build of an instance on the
    same dependencies (cached), so a code-only push costs one COPY. No USER: the runtime
    runs its containers as APP_USER."""
    label_line = " ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return "\n".join([
        f"FROM {base}",
        f"LABEL {label_line}",
        # oTree opens db.sqlite3 in its working directory at import (even on PostgreSQL),
        # so the project directory belongs to the app's user (/app itself already does).
        f"COPY --chown={APP_USER} . /app",
        "",
    ])


DOCKERIGNORE = "".join(f"**/{pattern}\n" for pattern in IGNORED)


def image_tag(manager_id: str, instance_name: str, number: int) -> str:
    return f"otree-lab-{manager_id}-{instance_name}:r{number}"


def build_image(runtime, ctx: Path, *, tag: str, base: str, labels: dict, out, timeout: float) -> str:
    """`docker build` of `ctx` (legacy builder) with our Dockerfile on `base` (the
    dependencies image); every line of output goes to `out(text)`. Returns the image id;
    raises BuildFailed with the reason."""
    (ctx / "Dockerfile.otree-lab").write_text(dockerfile(labels, base))
    (ctx / ".dockerignore").write_text(DOCKERIGNORE)
    api = runtime.api
    seen = []
    image_id = None
    deadline = time.monotonic() + timeout
    try:
        stream = api.build(path=str(ctx), dockerfile="Dockerfile.otree-lab", tag=tag, rm=True,
                           forcerm=True, pull=False, decode=True, timeout=timeout)
        for chunk in stream:
            if "stream" in chunk:
                text = chunk["stream"]
                seen.append(text)
                out(text)
                m = re.match(r"Successfully built ([0-9a-f]+)", text.strip())
                if m:
                    image_id = m.group(1)
            elif "error" in chunk:
                text = chunk.get("error") or ""
                seen.append(text + "\n")
                out(text + "\n")
                full = "".join(seen)
                raise BuildFailed(explain_pip(full) or f"the image build failed: {last_lines(full, 4)}")
            elif "status" in chunk:  # a base image layer download
                out(f"{chunk['status']} {chunk.get('progress', '')}\n".replace(" \n", "\n"))
            if time.monotonic() > deadline:
                raise BuildFailed(f"the build took longer than {timeout:g} s")
    except BuildFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - engine errors become the reason
        text = getattr(exc, "explanation", None) or str(exc)
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if "Read timed out" in str(text):
            raise BuildFailed(f"the build took longer than {timeout:g} s") from None
        raise BuildFailed(f"the image build failed: {' '.join(str(text).split())[:300]}") from None
    if not image_id:
        raise BuildFailed(f"the image build did not finish: {last_lines(''.join(seen), 4)}")
    return image_id


def introspect_image(runtime, image: str, *, instance_name: str, timeout: float = 60) -> dict:
    """Import the project's settings.py inside the image (no network, no secrets) and
    return {session_configs, rooms, language_code}; BuildFailed when settings.py cannot be
    imported. (`DockerRuntime.introspect()` calls it.)"""
    api = runtime.api
    # Labelled with the instance: one left by a killed worker goes with the instance's resources.
    labels = {LABEL_MANAGER: runtime.manager_id, LABEL_INSTANCE: instance_name, LABEL_COMPONENT: "introspect"}
    host_config = api.create_host_config(mem_limit="256m", memswap_limit="256m", pids_limit=64,
                                         cap_drop=["ALL"], security_opt=["no-new-privileges"], network_mode="none",
                                         read_only=True, tmpfs={"/tmp": "size=16m,mode=1777"},
                                         # What settings.py prints stays small on the engine's disk (two files
                                         # kept: a flood still shows as one, which parse_introspection refuses).
                                         log_config={"Type": "json-file",
                                                     "Config": {"max-size": "8m", "max-file": "2"}})
    container = api.create_container(image, command=["python", "-c", INTROSPECT], labels=labels, user=APP_USER,
                                     host_config=host_config, network_disabled=True,
                                     environment={"OTREE_PRODUCTION": "1"})
    try:
        api.start(container["Id"])
        try:
            api.wait(container["Id"], timeout=timeout)
        except Exception:  # noqa: BLE001 - requests' read timeout
            raise BuildFailed(f"reading settings.py inside the image took longer than {timeout:g} s") from None
        # Streamed: parse_introspection reads a bounded amount, never the whole log.
        return parse_introspection(api.logs(container["Id"], stdout=True, stderr=True, stream=True, follow=False))
    finally:
        try:
            api.remove_container(container["Id"], force=True, v=True)
        except Exception:  # noqa: BLE001
            pass


def release_labels(runtime, instance_name: str) -> dict:
    """The labels of every release image of an instance (the tag `:r<number>` names the
    release; a label per release would cost an uncached build step)."""
    return {LABEL_MANAGER: runtime.manager_id, LABEL_INSTANCE: instance_name, LABEL_COMPONENT: "release"}


class DockerRuntime:
    """`base.Runtime` on a Docker engine (Docker SDK, API 1.41+)."""

    name = "docker"
    isolation = (
        "Docker containers: the app, its PostgreSQL and its Redis share a private network that "
        "no other instance reaches; each runs with its own memory, CPU and process limits, "
        "without privileges or extra capabilities."
    )

    # Fixed small limits of the supporting services (memory comes from the spec).
    db_cpus = 1.0
    redis_cpus = 0.5
    pids_limits = {"db": 100, "redis": 32, "app": 512}
    stop_timeout = 20  # seconds a container gets to stop before it is killed

    def __init__(
        self,
        *,
        manager_id: str | None = None,
        images: dict[str, str] | None = None,
        subnets: str | None = None,
        build_subnets: str | None = None,
        ready_timeout: float | None = None,
        base_url: str | None = None,
        timeout: float = 60,
    ):
        self.manager_id = manager_id if manager_id is not None else settings.LAB_MANAGER_ID
        if not MANAGER_ID.fullmatch(self.manager_id):
            raise RuntimeError_(f"manager id {self.manager_id!r} must be 1-16 lowercase letters or digits")
        images = images or {}
        self.images = {
            "db": images.get("db") or settings.LAB_IMAGE_POSTGRES,
            "redis": images.get("redis") or settings.LAB_IMAGE_REDIS,
        }
        self.subnets = subnets or settings.LAB_DOCKER_SUBNETS
        self.build_subnets = build_subnets or settings.LAB_DOCKER_BUILD_SUBNETS
        self._pools = {
            "instances": self._parse_pool("LAB_DOCKER_SUBNETS", self.subnets),
            "builds": self._parse_pool("LAB_DOCKER_BUILD_SUBNETS", self.build_subnets),
        }
        if self._pools["instances"].overlaps(self._pools["builds"]):
            raise RuntimeError_(f"LAB_DOCKER_BUILD_SUBNETS={self.build_subnets} overlaps LAB_DOCKER_SUBNETS={self.subnets}")
        self._pool = self._pools["instances"]
        self.ready_timeout = ready_timeout if ready_timeout is not None else settings.LAB_READY_TIMEOUT
        kwargs = docker.utils.kwargs_from_env()
        if base_url:
            kwargs["base_url"] = base_url
        self._client_kwargs = kwargs
        self._timeout = timeout

    @staticmethod
    def _parse_pool(setting_name: str, value: str):
        try:
            pool = ipaddress.ip_network(value)
        except ValueError as exc:
            raise RuntimeError_(f"{setting_name} is not a network: {exc}") from None
        if pool.version != 4:
            raise RuntimeError_(f"{setting_name}={value} must be an IPv4 network")
        if pool.prefixlen > SUBNET_PREFIX:
            raise RuntimeError_(f"{setting_name}={value} is smaller than one /{SUBNET_PREFIX}")
        return pool

    # --- the firewall (instances.netguard) -----------------------------------------------

    @property
    def policy(self):
        """The firewall rules this backend's containers need: its manager id and pools,
        the rest from the settings."""
        from instances import netguard

        base = netguard.Policy.from_settings()
        return dataclasses.replace(base, manager_id=self.manager_id, app_pools=(self.subnets, *netguard.swarm_pools(settings.LAB_SWARM_SUBNETS)),
                                   build_pools=(self.build_subnets,))

    def _guard(self):
        """Apply the firewall before a container of ours starts (a few ms when in place).
        It never stops a start: when it cannot be applied, the instance page says so."""
        from instances import netguard

        status = netguard.ensure(self.policy)
        if not status.enforced and status.detail != self._guard_warned:
            log.warning("instances' firewall: %s", status.detail)
            self._guard_warned = status.detail
        return status

    _guard_warned = ""

    # --- the engine -------------------------------------------------------------------

    @property
    def engine_url(self) -> str:
        return self._client_kwargs.get("base_url") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    @cached_property
    def api(self) -> docker.APIClient:
        try:
            return docker.APIClient(version="auto", timeout=self._timeout, **self._client_kwargs)
        except (DockerException, requests.RequestException, OSError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException, what: str = "") -> RuntimeError_:
        where = f" ({what})" if what else ""
        return RuntimeError_(f"Docker engine not reachable at {self.engine_url}{where}: {_short(exc)}")

    def available(self) -> bool:
        try:
            return bool(self.api.ping())
        except (RuntimeError_, DockerException, requests.RequestException, OSError):
            return False

    def _call(self, what: str, fn, *args, **kwargs):
        """One Docker call, its failure turned into a short message for the user."""
        try:
            return fn(*args, **kwargs)
        except NotFound:
            raise
        except APIError as exc:
            raise RuntimeError_(f"{what}: {_short(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self._unreachable(exc, what) from None

    # --- names and labels -------------------------------------------------------------

    def _prefix(self, name: str) -> str:
        return f"lab-{self.manager_id}-{name}"

    def container_name(self, name: str, component: str) -> str:
        return f"{self._prefix(name)}-{component}"

    def network_name(self, name: str, role: str) -> str:
        return f"{self._prefix(name)}-{NETWORK_SUFFIX[role]}"

    def volume_name(self, name: str) -> str:
        return f"{self._prefix(name)}-pgdata"

    # `owner`: the label that carries the manager id (the swarm backend marks its own resources
    # with another one, so the two backends never take each other's for their own).

    def _labels(self, name: str, component: str, *, owner: str = LABEL_MANAGER, **extra: str) -> dict[str, str]:
        return {owner: self.manager_id, LABEL_INSTANCE: name, LABEL_COMPONENT: component, **extra}

    def _filters(self, name: str | None = None, *, owner: str = LABEL_MANAGER, **extra: str) -> dict:
        labels = [f"{owner}={self.manager_id}"]
        if name is not None:
            labels.append(f"{LABEL_INSTANCE}={name}")
        labels += [f"{k}={v}" for k, v in extra.items()]
        return {"label": labels}

    def _ours(self, labels: dict | None, name: str, *, owner: str = LABEL_MANAGER) -> bool:
        labels = labels or {}
        return labels.get(owner) == self.manager_id and labels.get(LABEL_INSTANCE) == name

    # --- desired configuration ----------------------------------------------------------

    @staticmethod
    def redis_password(spec: InstanceSpec) -> str:
        """The instance's Redis password: derived from its database password (both are its
        own secrets, given only to its app), so it needs no column of its own."""
        return hashlib.sha256(f"otree-lab redis {spec.db_password}".encode()).hexdigest()[:32]

    def service_urls(self, spec: InstanceSpec) -> dict[str, str]:
        """DATABASE_URL and REDIS_URL as the app container sees its services."""
        user, password = quote(spec.db_user, safe=""), quote(spec.db_password, safe="")
        return {
            "DATABASE_URL": f"postgres://{user}:{password}@db:5432/{spec.db_name}",
            "REDIS_URL": f"redis://:{self.redis_password(spec)}@redis:6379/0",
        }

    def _desired(self, spec: InstanceSpec, component: str) -> dict:
        """Everything a container is created from; its hash is the config label."""
        name = spec.name
        if component == "db":
            args: list[str] = ["postgres"]
            for key, value in POSTGRES_ARGS.items():
                args += ["-c", f"{key}={value}"]
            return {
                "image": self.images["db"],
                "command": args,
                "env": {
                    "POSTGRES_USER": spec.db_user,
                    "POSTGRES_PASSWORD": spec.db_password,
                    "POSTGRES_DB": spec.db_name,
                    "PGDATA": PGDATA,
                },
                "user": "postgres",
                "memory_mb": spec.db_memory_mb,
                "cpus": self.db_cpus,
                "pids": self.pids_limits["db"],
                "volume": self.volume_name(name),
                "networks": {"internal": ["db"]},
                "stop_signal": "SIGINT",  # PostgreSQL's fast shutdown
                "init": False,
            }
        if component == "redis":
            maxmemory = max(8, spec.redis_memory_mb * 3 // 4)
            password = self.redis_password(spec)
            return {
                "image": self.images["redis"],
                "command": [
                    "redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no",
                    "--maxmemory", f"{maxmemory}mb", "--maxmemory-policy", "noeviction",
                    "--requirepass", password,
                ],
                "env": {"REDISCLI_AUTH": password},  # redis-cli in the container (the readiness probe) uses it
                "user": "redis",
                "memory_mb": spec.redis_memory_mb,
                "cpus": self.redis_cpus,
                "pids": self.pids_limits["redis"],
                "networks": {"internal": ["redis"]},
                "stop_signal": "SIGTERM",
                "init": False,
            }
        app: AppSpec = spec.app
        env = {**app.env, **self.service_urls(spec)}  # the runtime knows where its services are
        return {
            "image": app.image,
            # No command: the project's oTree server of a release built here, as the app's user.
            "command": list(app.command) if app.command is not None else start_argv(str(app.port)),
            "env": env,
            "user": app.user if app.user is not None or app.command is not None else APP_USER,  # None: the image's own
            "memory_mb": spec.memory_mb,
            "cpus": spec.cpus,
            "pids": self.pids_limits["app"],
            "port": app.port,
            "release": app.release_id,
            # The first network is the one the published port goes through.
            "networks": {"edge": [], "internal": ["app"]},
            "stop_signal": "SIGTERM",
            "init": True,  # tini as PID 1: signals reach the app, zombies are reaped
        }

    @staticmethod
    def _hash(desired: dict) -> str:
        blob = json.dumps(desired, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    # --- ensure -------------------------------------------------------------------------

    @_user_errors
    def ensure(self, spec: InstanceSpec) -> InstanceState:
        name = spec.name
        check_name(name)
        for label, value in (("database name", spec.db_name), ("database user", spec.db_user)):
            if not SQL_IDENTIFIER.fullmatch(value or ""):
                raise RuntimeError_(f"{label} {value!r} must be a lowercase SQL identifier")
        self._check_image(self.images["db"], service=True)
        self._check_image(self.images["redis"], service=True)
        if spec.app is not None:
            self._check_image(spec.app.image, service=False)

        networks = self._ensure_services(spec)
        # A deploy killed half-way leaves its candidate or the retired app behind (deploys
        # and ensure hold the same instance lock, so none of them is in use now).
        for slot in (CANDIDATE, RETIRED):
            self._remove_container(self.container_name(name, slot), name, graceful=False)
        if spec.app is not None:
            self._ensure_container(spec, "app", networks)
        else:
            self._remove_container(self.container_name(name, "app"), name, graceful=True)
        return self.state(name)

    def _ensure_services(self, spec: InstanceSpec) -> dict[str, str]:
        """Firewall, networks, volume, PostgreSQL and Redis created or repaired, and
        answering; returns the network ids by role."""
        self._guard()
        networks = {role: self._ensure_network(spec.name, role) for role in NETWORK_ROLES}
        self._ensure_volume(spec.name)
        self._ensure_container(spec, "db", networks)
        self._ensure_container(spec, "redis", networks)
        self._wait_services(spec.name, self.ready_timeout)
        return networks

    # --- deploys: a candidate app, health-checked, then promoted -------------------------

    @_user_errors
    def deploy_app(self, spec: InstanceSpec, *, timeout: float, out=None, before_switch=None) -> str:
        """Start `spec.app` beside the running app (container `-app-next`, on the same
        networks, published on another 127.0.0.1 port), wait until it answers HTTP (any
        status below 500), call `before_switch()` (its exception aborts the deploy) and
        promote it: the old app becomes `-app-old` (still running, until `retire_app`), the
        candidate becomes `-app`. On failure the candidate is removed, the old app is
        untouched, and RuntimeError_ says why (with the app's last lines of output).
        Returns the new app's URL on the host."""
        name = spec.name
        check_name(name)
        if spec.app is None:
            raise RuntimeError_("no app to deploy")
        self._check_image(spec.app.image, service=False)
        networks = self._ensure_services(spec)
        candidate = self.container_name(name, CANDIDATE)
        self._remove_container(candidate, name, graceful=False)
        self._remove_container(self.container_name(name, RETIRED), name, graceful=False)
        desired = self._desired(spec, "app")
        info = self._create_container(spec, "app", desired, self._hash(desired), networks, free_port(),
                                      cname=candidate)
        try:
            self._call(f"starting {candidate}", self.api.start, info["Id"])
            url = self._wait_http(candidate, name, timeout, out)
            if before_switch is not None:
                before_switch()
        except BaseException:
            self._remove_container(candidate, name, graceful=False)
            raise
        current = self.container_name(name, "app")
        old = self._inspect_ours(current, name)
        if old is not None:
            self._call(f"renaming {current}", self.api.rename, old["Id"], self.container_name(name, RETIRED))
        self._call(f"renaming {candidate}", self.api.rename, info["Id"], current)
        return url

    def _wait_http(self, cname: str, name: str, timeout: float, out=None) -> str:
        seen = {}

        def step():
            info = self._inspect(cname)
            if info is None:
                raise RuntimeError_("the new app's container disappeared while starting")
            seen["id"] = info["Id"]
            st = info["State"]
            if st["Status"] in ("exited", "dead", "restarting") or (info.get("RestartCount") or 0) > 0:
                tail = last_lines(self._container_logs(info["Id"]), 4)
                why = "was killed: out of memory" if st.get("OOMKilled") else f"exited with code {st.get('ExitCode')}"
                raise AppFailed(f"the app {why} while starting" + (f": {tail}" if tail else ""))
            return self._app_url(info)

        return wait_http(step, timeout, out=out,
                         last_words=lambda: last_lines(self._container_logs(seen["id"]), 4) if seen else "")

    def _container_logs(self, cid: str, tail: int = 40) -> str:
        try:
            return self.api.logs(cid, stdout=True, stderr=True, tail=tail).decode("utf-8", errors="replace")
        except (APIError, requests.RequestException):
            return ""

    # --- builds (see the module's text) ----------------------------------------------------

    build_pids = 256  # pip, a compiler and its children
    build_tmp_mb = 1024  # /tmp of a build (tmpfs: counts against its memory limit)

    def build_release(self, name: str, number: int, ctx: Path, *, out, timeout: float, memory_mb: int = 1024,
                      cpus: float = 1.0) -> str:
        """Build the release's image from the project in `ctx` (build output to `out`);
        returns its tag. BuildFailed with the reason when it cannot be built. The
        requirements are installed in a locked-down container (or taken from the cache);
        the release image only adds the project's files."""
        check_name(name)
        deadline = time.monotonic() + timeout
        tag = image_tag(self.manager_id, name, number)
        for attempt in range(2):
            deps, key = self._dependencies(name, ctx, out=out, deadline=deadline, memory_mb=memory_mb, cpus=cpus)
            try:
                build_image(self, ctx, tag=tag, base=deps, labels=release_labels(self, name), out=out,
                            timeout=max(1.0, deadline - time.monotonic()))
                return tag
            except BuildFailed:
                # A cached dependencies image pruned between its check and its use: install again, once.
                if attempt or self._image_exists(deps):
                    raise
                out("The cached requirements went away meanwhile: installing them again\n")
        return tag

    def _dependencies(self, name: str, ctx: Path, *, out, deadline: float, memory_mb: int, cpus: float):
        """(reference, key) of the dependencies image for the project's requirements.txt,
        from the cache or installed now."""
        base = self._base_image()
        requirements = (ctx / "requirements.txt").read_bytes()
        if settings.LAB_INSTALLER == "uv":
            return self._uv_dependencies(name, base, requirements, out=out, deadline=deadline, memory_mb=memory_mb,
                                         cpus=cpus)
        key = deps_key(base, requirements)
        ref = deps_tag(self.manager_id, key)
        if self._image_exists(ref):
            out(f"requirements.txt unchanged: reusing its installed packages ({key[:12]})\n")
            return ref, key
        self._install_requirements(name, base, requirements, ref=ref, key=key, out=out, deadline=deadline,
                                   memory_mb=memory_mb, cpus=cpus)
        return ref, key

    @cached_property
    def wheel_cache(self) -> DockerWheelCache:
        return DockerWheelCache(self)

    def _uv_dependencies(self, name: str, base: str, requirements: bytes, *, out, deadline: float, memory_mb: int,
                         cpus: float):
        """uv: the instance's current dependencies when requirements.txt is the same; an
        image of the same requirements on the base image (any instance's); else uv on the
        instance's current dependencies image (only what changed is installed), or on the
        base image."""
        wanted = hashlib.sha256(requirements).hexdigest()
        own = self._own_dependencies(name)
        if own and own["labels"].get(LABEL_REQUIREMENTS) == wanted:
            out(f"requirements.txt unchanged: reusing its installed packages ({own['key'][:12]})\n")
            return own["ref"], own["key"]
        key = deps_key(base, requirements, UV_DEPS_SCRIPT)
        ref = deps_tag(self.manager_id, key)
        if self._image_exists(ref):
            out(f"requirements.txt unchanged: reusing its installed packages ({key[:12]})\n")
            return ref, key
        parent = base
        if own and own["layers"] - self._layers(base) < MAX_DEPS_LAYERS:
            parent = own["id"]
            key = deps_key(parent, requirements, UV_DEPS_SCRIPT)
            ref = deps_tag(self.manager_id, key)
            if self._image_exists(ref):
                out(f"requirements.txt unchanged: reusing its installed packages ({key[:12]})\n")
                return ref, key
            out("requirements.txt changed: uv installs what changed into a copy of the current packages\n")
        self._install_requirements(name, base, requirements, ref=ref, key=key, out=out, deadline=deadline,
                                   memory_mb=memory_mb, cpus=cpus, image=parent)
        return ref, key

    def _layers(self, image: str) -> int:
        return len(self._call("inspecting an image", self.api.inspect_image, image).get("RootFS", {}).get("Layers") or [])

    def _own_dependencies(self, name: str) -> dict | None:
        """The dependencies image of the instance's newest release image (uv builds), or None."""
        api = self.api
        releases = self._call("listing images", api.images, filters={"label": [
            f"{LABEL_MANAGER}={self.manager_id}", f"{LABEL_INSTANCE}={name}", f"{LABEL_COMPONENT}=release"]})
        for image in sorted(releases, key=lambda i: i.get("Created", 0), reverse=True):
            key = (image.get("Labels") or {}).get(LABEL_DEPS)
            if not key or not re.fullmatch(r"[0-9a-f]{64}", key):
                continue
            ref = deps_tag(self.manager_id, key)
            try:
                info = api.inspect_image(ref)
            except NotFound:
                return None
            except APIError:
                return None
            labels = info.get("Config", {}).get("Labels") or {}
            if labels.get(LABEL_MANAGER) != self.manager_id or labels.get(LABEL_DEPS) != key:
                return None
            return {"ref": ref, "key": key, "id": info["Id"], "labels": labels,
                    "layers": len(info.get("RootFS", {}).get("Layers") or [])}
        return None

    def _base_image(self) -> str:
        image = settings.LAB_IMAGE_PYTHON
        try:
            return self._call(f"inspecting image {image}", self.api.inspect_image, image)["Id"]
        except NotFound:
            raise BuildFailed(f"the build image {image} is missing on the Docker engine "
                              "(python manage.py build_images)") from None

    def _install_requirements(self, name: str, base: str, requirements: bytes, *, ref: str, key: str, out,
                              deadline: float, memory_mb: int, cpus: float, image: str | None = None) -> None:
        """pip (or uv, with the wheel cache mounted read-only) in the instance's build
        container on `image` (default: the base image), committed into the image `ref`."""
        api = self.api
        uv = settings.LAB_INSTALLER == "uv"
        self.remove_build_leftovers(name)  # a killed build's container and network
        self._guard()
        known = self.wheel_cache.prepare(base) if uv else None
        out(f"Installing requirements.txt: {'uv' if uv else 'pip'} runs as uid 10001 without privileges, with "
            f"{memory_mb} MB of memory, {cpus:g} CPU and at most {self.build_pids} processes, on a network of its "
            "own\n")
        try:
            cid = self._create_build_container(name, image or base, ["sh", "-c", UV_DEPS_SCRIPT if uv else DEPS_SCRIPT],
                                               memory_mb=memory_mb, cpus=cpus,
                                               binds=self.wheel_cache.binds() if uv else None)
            self._call("preparing the build container", api.put_archive, cid, "/", deps_archive(requirements))
            result = self._run_build(cid, out=out, deadline=deadline)
            self._build_outcome(result, memory_mb=memory_mb)
            self._call("saving the installed requirements", api.commit, cid, repository=ref.rsplit(":", 1)[0],
                       tag=ref.rsplit(":", 1)[1], changes=deps_changes(self, key, result["env"], requirements))
        except NotFound as exc:
            raise RuntimeError_(f"the build container went away: {_short(exc)}") from None
        finally:
            self.remove_build_leftovers(name)
        if uv:  # the trusted side: PyPI's verified wheels of what was installed join the cache
            self.wheel_cache.promote(base, result["log"], out, known)

    def _create_build_container(self, name: str, image: str, command: list[str], *, memory_mb: int,
                                cpus: float, binds: dict | None = None) -> str:
        """The instance's build container (created, not started) on its build network."""
        api = self.api
        network = self._ensure_network(name, "build")
        host_config = api.create_host_config(
            mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m", nano_cpus=int(cpus * 1e9) if cpus > 0 else None,
            pids_limit=self.build_pids, cap_drop=["ALL"], security_opt=["no-new-privileges"], privileged=False,
            network_mode=network, init=True, binds=binds or None,  # (the wheel cache, read-only: not committed)
            # Nothing but /opt/venv (and /app, empty) persists: /tmp is not committed.
            tmpfs={"/tmp": f"size={self.build_tmp_mb}m,mode=1777"},
            log_config=LogConfig(type="json-file", config={"max-size": "20m", "max-file": "1"}),
        )
        cname = self.container_name(name, "build")
        created = self._call(
            f"creating container {cname}", api.create_container, image, command=command, name=cname,
            user=APP_USER, working_dir="/app", labels=self._labels(name, "build"), environment=DEPS_ENV,
            host_config=host_config, detach=True,
        )
        return created["Id"]

    def _run_build(self, cid: str, *, out, deadline: float) -> dict:
        """Start the build container, stream its output to `out` until it exits (killed at
        the deadline); returns {state, log tail, timed_out}."""
        import codecs
        import threading

        remaining = deadline - time.monotonic()
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                self.api.kill(cid)
            except (APIError, requests.RequestException):
                pass

        timer = threading.Timer(max(0.0, remaining), kill)
        # Its own client: pip may print nothing for longer than the usual request timeout.
        streamer = docker.APIClient(version=self.api.api_version, timeout=max(60, remaining + 30),
                                    **self._client_kwargs)
        tail = bytearray()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            self._call("starting the build container", self.api.start, cid)
            timer.start()
            for chunk in streamer.logs(cid, stream=True, follow=True, stdout=True, stderr=True):
                text = decoder.decode(chunk)
                if text:
                    out(text)
                tail += chunk
                del tail[:-200_000]  # enough for pip's reasons at the end
            self._call("waiting for the build container", streamer.wait, cid)
        except requests.RequestException as exc:
            if not timed_out.is_set():
                raise self._unreachable(exc, "following the build") from None
        finally:
            timer.cancel()
            streamer.close()
        info = self._call("inspecting the build container", self.api.inspect_container, cid)
        return {"state": info["State"], "log": tail.decode(errors="replace"), "timed_out": timed_out.is_set(),
                "timeout": remaining, "env": info["Config"].get("Env") or []}

    @staticmethod
    def _build_outcome(result: dict, *, memory_mb: int) -> None:
        """BuildFailed with the clearest reason, unless pip succeeded."""
        state, text = result["state"], result["log"]
        if result["timed_out"]:
            raise BuildFailed(f"installing the requirements took longer than the build's time limit "
                              f"({result['timeout']:.0f} s left of LAB_BUILD_TIMEOUT)")
        if state.get("OOMKilled") or PIP_KILLED.search(text):
            raise BuildFailed(
                f"installing the requirements ran out of memory: the build has the instance's memory limit "
                f"({memory_mb} MB); raise the instance's memory, or use packages that ship binary wheels")
        if state.get("ExitCode") != 0:
            raise BuildFailed(explain_pip(text)
                              or f"installing the requirements failed (exit code {state.get('ExitCode')}): "
                                 f"{last_lines(text, 4)}")

    def introspect(self, name: str, release: str, *, timeout: float = 60) -> dict:
        """The project's session configs, rooms and language, read inside its image."""
        return introspect_image(self, release, instance_name=name, timeout=timeout)

    def backup_suffix(self, name: str) -> str:
        return ".dump"  # pg_dump's custom format

    @_user_errors
    def remove_build_leftovers(self, name: str) -> None:
        """What a build killed with its worker left: its build and introspection
        containers, its build network."""
        check_name(name)
        for component in ("build", "introspect"):
            for c in self._call("listing containers", self.api.containers, all=True,
                                filters=self._filters(name, **{LABEL_COMPONENT: component})):
                try:
                    self.api.remove_container(c["Id"], force=True, v=True)
                except NotFound:
                    pass
        for net in self._call("listing networks", self.api.networks,
                              filters=self._filters(name, **{LABEL_NETWORK: "build"})):
            self._remove_network(net["Id"])

    limits_cpu = True

    def database_label(self, name: str) -> str:
        return "PostgreSQL (its own container)"

    def protections(self, name: str) -> list:
        """What holds for a Docker instance here: the containers' own settings always; what
        depends on the firewall, as netguard finds it now (a few ms, no engine call)."""
        from instances import netguard

        from .base import Protection

        guard = netguard.status(self.policy, max_age=PAGE_STATUS_AGE)
        fenced = guard.enforced
        missing = f" — {guard.detail}" if not fenced else ""
        egress = settings.LAB_EGRESS
        return [
            Protection("Files", True, "its own container file system: no folder of this machine, no Docker socket; "
                                      "the app runs as uid 10001 without capabilities and cannot gain privileges"),
            Protection("Host and other instances", fenced,
                       "its own PostgreSQL and Redis (password) on a private network; the firewall keeps it from "
                       "every service of this machine, from other instances and from link-local/metadata addresses"
                       if fenced else
                       "other instances' containers are on networks it cannot reach, but the firewall is not in "
                       f"place: services of this machine and metadata addresses may answer{missing}"),
            Protection("Outside network", True if egress == "open" else fenced,
                       "open by the lab's choice (LAB_EGRESS=open): the app may call services outside this machine"
                       if egress == "open" else
                       "closed (LAB_EGRESS=deny): the app opens no connection out of this machine"
                       if fenced else f"LAB_EGRESS=deny is not enforced{missing}"),
            Protection("Memory", True, "the instance's memory limit, without swap (PostgreSQL and Redis have their "
                                       "own); what exceeds it is killed inside the instance"),
            Protection("CPU", True, "the instance's CPU limit (a share of the CPUs, enforced by the kernel)"),
            Protection("Processes", True, f"at most {self.pids_limits['app']} processes in the app's container"),
            Protection("Builds", fenced,
                       f"{settings.LAB_INSTALLER} runs in a container of its own as uid 10001 without capabilities, "
                       f"with the instance's memory and CPU limits and at most {self.build_pids} processes, on a "
                       f"network of its own that reaches only the outside (for {settings.LAB_INSTALLER}); the lab's "
                       "wheel cache is read-only to it and never reaches the app; nothing of the project runs in "
                       "the image builder"
                       + ("" if fenced else f"; the firewall is not in place, so a build may reach this machine"
                                            f"{missing}")),
        ]

    @_user_errors
    def retire_app(self, name: str) -> None:
        """Stop and remove the app a deploy replaced (after the proxy points to the new one)."""
        check_name(name)
        self._remove_container(self.container_name(name, RETIRED), name, graceful=True)

    @_user_errors
    def release_exists(self, release: str) -> bool:
        """Whether the release image `release` is still kept."""
        return self._image_exists(release)

    @_user_errors
    def _image_exists(self, image: str) -> bool:
        try:
            self._call(f"inspecting image {image}", self.api.inspect_image, image)
            return True
        except NotFound:
            return False

    @_user_errors
    def prune_releases(self, name: str, keep_releases: set[str]) -> list[str]:
        """Remove the instance's release images (labelled with the instance, tagged
        `:r<number>`) except those of `keep_releases` and those a container still uses.
        An image that carries several release tags (an unchanged tree pushed again) loses
        only the tags not kept. Returns the removed tags/ids."""
        check_name(name)
        removed = []
        repository = image_tag(self.manager_id, name, 0).rsplit(":", 1)[0]
        for image in self._call("listing images", self.api.images, filters=self._filters(name)):
            if (image.get("Labels") or {}).get(LABEL_COMPONENT) != "release":
                continue
            tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
            doomed = [t for t in tags if (m := RELEASE_TAG.search(t)) and m.group(1) not in keep_releases
                      and t.rsplit(":", 1)[0] == repository]
            if not tags:
                doomed = [image["Id"]]  # left untagged by a rebuild of the same tag
            for ref in doomed:
                try:
                    self.api.remove_image(ref, force=False, noprune=False)
                    removed.append(ref)
                except NotFound:
                    pass
                except APIError:
                    pass  # in use
        return removed + self._prune_dependencies()

    def _prune_dependencies(self) -> list[str]:
        """Dependencies images no release image of this manager is built on, once they are
        older than a build may take (a build may be about to use a fresh one); all of them
        when no release image and no build is left (the last instance went). A build
        whose dependencies image went meanwhile installs them again (build_release)."""
        api = self.api
        manager = f"{LABEL_MANAGER}={self.manager_id}"
        releases = self._call("listing images", api.images, filters={"label": [manager, f"{LABEL_COMPONENT}=release"]})
        used = {(image.get("Labels") or {}).get(LABEL_DEPS) for image in releases}
        grace = settings.LAB_BUILD_TIMEOUT + 60
        if not releases and not self._call("listing containers", api.containers, all=True,
                                           filters={"label": [manager, f"{LABEL_COMPONENT}=build"]}):
            grace = 0
        removed = []
        for image in self._call("listing images", api.images, filters={"label": [manager, f"{LABEL_COMPONENT}=deps"]}):
            if (image.get("Labels") or {}).get(LABEL_DEPS) in used or time.time() - image.get("Created", 0) < grace:
                continue
            for ref in [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"] or [image["Id"]]:
                try:
                    api.remove_image(ref, force=False, noprune=False)
                    removed.append(ref)
                except (NotFound, APIError):
                    pass  # gone, or in use by a build right now
        return removed

    def _check_image(self, image: str, *, service: bool) -> None:
        if self._image_exists(image):
            return
        if service:
            raise RuntimeError_(f"image {image} not found: build it with `python manage.py build_images`")
        raise RuntimeError_(f"app image {image} not found on the Docker engine")

    # networks

    def _ensure_network(self, name: str, role: str) -> str:
        """The id of the instance's network `role`, created or repaired."""
        netname = self.network_name(name, role)
        internal = role == "internal"
        found = self._call("listing networks", self.api.networks, names=[netname])
        found = [n for n in found if n["Name"] == netname]
        for net in found:
            if not self._ours(net.get("Labels"), name):
                raise RuntimeError_(
                    f"a Docker network named {netname} exists that this manager did not create; remove or rename it"
                )
        pool = self._pools["builds" if role == "build" else "instances"]
        good = [n for n in found if self._network_ok(n, internal, pool)]
        good.sort(key=lambda n: (_timestamp(n.get("Created", "")), n["Id"]))
        keep = good[0] if good else None
        for net in found:  # duplicates of a race, or a network changed by hand
            if keep is None or net["Id"] != keep["Id"]:
                self._remove_network(net["Id"])
        if keep is not None:
            return keep["Id"]
        return self._create_network(name, role, netname, internal)

    @staticmethod
    def _network_ok(net: dict, internal: bool, pool) -> bool:
        if bool(net.get("Internal")) != internal or net.get("Driver") != "bridge":
            return False
        # In the pool the firewall covers (a network left from another LAB_DOCKER_SUBNETS is replaced).
        subnets = [conf.get("Subnet", "") for conf in (net.get("IPAM") or {}).get("Config") or []]
        try:
            if not subnets or not all(ipaddress.ip_network(s).subnet_of(pool) for s in subnets):
                return False
        except (ValueError, TypeError):
            return False
        icc = (net.get("Options") or {}).get("com.docker.network.bridge.enable_icc", "true")
        return internal or icc == "false"

    def _used_subnets(self) -> list:
        used = []
        for net in self._call("listing networks", self.api.networks):
            for conf in (net.get("IPAM") or {}).get("Config") or []:
                try:
                    used.append(ipaddress.ip_network(conf.get("Subnet", ""), strict=False))
                except ValueError:
                    pass
        return used

    def _create_network(self, name: str, role: str, netname: str, internal: bool) -> str:
        pool = self._pools["builds" if role == "build" else "instances"]
        used = [n for n in self._used_subnets() if n.version == pool.version]
        count = 2 ** (SUBNET_PREFIX - pool.prefixlen)
        # Start at a place derived from the name, so parallel creates rarely collide.
        start = int(hashlib.sha256(netname.encode()).hexdigest(), 16) % count
        options = {} if internal else {"com.docker.network.bridge.enable_icc": "false"}
        labels = self._labels(name, "network", **{LABEL_NETWORK: role})
        attempts = 0
        for i in range(count):
            index = (start + i) % count
            subnet = ipaddress.ip_network(
                (int(pool.network_address) + index * 2 ** (32 - SUBNET_PREFIX), SUBNET_PREFIX)
            )
            if any(subnet.overlaps(u) for u in used):
                continue
            ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(subnet))])
            try:
                net = self.api.create_network(
                    netname, driver="bridge", internal=internal, options=options, ipam=ipam,
                    labels=labels, check_duplicate=True,
                )
                return net["Id"]
            except APIError as exc:
                text = _short(exc).lower()
                if "overlap" in text and attempts < 30:
                    attempts += 1
                    used.append(subnet)
                    continue
                if "already exists" in text or exc.status_code == 409:  # a racing ensure made it
                    return self._ensure_network(name, role)
                raise RuntimeError_(f"creating network {netname}: {_short(exc)}") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise self._unreachable(exc) from None
        which = f"LAB_DOCKER_BUILD_SUBNETS={self.build_subnets}" if role == "build" else f"LAB_DOCKER_SUBNETS={self.subnets}"
        raise RuntimeError_(f"no free /{SUBNET_PREFIX} subnet left in {which}")

    def _remove_network(self, net_id: str) -> None:
        try:
            info = self.api.inspect_network(net_id)
            for cid in (info.get("Containers") or {}):
                try:
                    self.api.disconnect_container_from_network(cid, net_id, force=True)
                except NotFound:
                    pass
            self.api.remove_network(net_id)
        except NotFound:
            pass
        except APIError as exc:
            raise RuntimeError_(f"removing network {net_id[:12]}: {_short(exc)}") from None

    # volume

    def _ensure_volume(self, name: str) -> None:
        vname = self.volume_name(name)
        try:
            vol = self.api.inspect_volume(vname)
        except NotFound:
            vol = self._call(
                f"creating volume {vname}", self.api.create_volume, vname, driver="local",
                labels=self._labels(name, "volume"),
            )
        except APIError as exc:
            raise RuntimeError_(f"inspecting volume {vname}: {_short(exc)}") from None
        if not self._ours(vol.get("Labels"), name):
            raise RuntimeError_(f"a Docker volume named {vname} exists that this manager did not create; remove or rename it")

    # containers

    def _inspect(self, cname: str) -> dict | None:
        try:
            return self._call(f"inspecting container {cname}", self.api.inspect_container, cname)
        except NotFound:
            return None

    def _inspect_ours(self, cname: str, name: str) -> dict | None:
        """The container `cname` when it exists and carries instance `name`'s labels."""
        info = self._inspect(cname)
        if info is None or not self._ours(info["Config"].get("Labels"), name):
            return None
        return info

    def _ensure_container(self, spec: InstanceSpec, component: str, networks: dict[str, str]) -> dict:
        name = spec.name
        cname = self.container_name(name, component)
        desired = self._desired(spec, component)
        config_hash = self._hash(desired)
        host_port = None
        info = self._inspect(cname)
        if info is not None:
            labels = info["Config"].get("Labels") or {}
            if not self._ours(labels, name):
                raise RuntimeError_(
                    f"a container named {cname} exists that this manager did not create; remove or rename it"
                )
            host_port = self._host_port(info)  # a replaced app keeps its address
            attached = {n["NetworkID"] for n in (info["NetworkSettings"].get("Networks") or {}).values()}
            wanted = {networks[role] for role in desired["networks"]}
            status = info["State"]["Status"]
            if labels.get(LABEL_CONFIG) != config_hash or attached != wanted or status in ("dead", "removing"):
                self._remove_container(cname, name, graceful=True)
                info = None
        for attempt in range(3):
            if info is None:
                if component == "app" and not host_port:
                    host_port = free_port()
                info = self._create_container(spec, component, desired, config_hash, networks, host_port)
            status = info["State"]["Status"]
            try:
                if status == "paused":
                    self._call(f"unpausing {cname}", self.api.unpause, cname)
                elif status in ("created", "exited"):
                    self._call(f"starting {cname}", self.api.start, cname)
                # "running" and "restarting" (the restart policy at work) are left alone.
                return info
            except RuntimeError_ as exc:
                text = str(exc)
                if component != "app" or attempt == 2 or not (
                    "already allocated" in text or "address already in use" in text
                ):
                    raise
                # Someone took the app's port while it was down: a new port, a new container.
                self._remove_container(cname, name, graceful=False)
                info, host_port = None, None
        return info

    @staticmethod
    def _host_port(info: dict) -> str:
        """The app's port on the host: the configured one (fixed at creation, so it stays
        the same across restarts), else the one the engine picked."""
        port = (info["Config"].get("Labels") or {}).get(LABEL_APP_PORT, "")
        if not port:
            return ""
        for binding in ((info.get("HostConfig") or {}).get("PortBindings") or {}).get(f"{port}/tcp") or []:
            if binding.get("HostPort"):
                return binding["HostPort"]
        for binding in ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{port}/tcp") or []:
            if binding.get("HostPort"):
                return binding["HostPort"]
        return ""

    def _create_container(self, spec, component, desired, config_hash, networks, host_port=None,
                          cname: str | None = None) -> dict:
        api = self.api
        name = spec.name
        cname = cname or self.container_name(name, component)
        mb = int(desired["memory_mb"])
        extra = {}
        ports = None
        if component == "app":
            extra = {LABEL_RELEASE: desired["release"], LABEL_APP_PORT: str(desired["port"])}
            ports = [desired["port"]]
        labels = self._labels(name, component, **{LABEL_CONFIG: config_hash}, **extra)
        roles = list(desired["networks"])
        primary = roles[0]
        host_config = api.create_host_config(
            mem_limit=f"{mb}m",
            memswap_limit=f"{mb}m",  # no swap
            nano_cpus=int(float(desired["cpus"]) * 1e9) if desired["cpus"] and desired["cpus"] > 0 else None,
            pids_limit=desired["pids"],
            restart_policy={"Name": "unless-stopped"},
            security_opt=["no-new-privileges"],
            cap_drop=["ALL"],
            privileged=False,
            network_mode=networks[primary],
            # A fixed host port: the engine would pick a new one at every restart.
            port_bindings={desired["port"]: ("127.0.0.1", int(host_port) if host_port else None)} if ports else None,
            mounts=[Mount(PGDATA, desired["volume"], type="volume")] if "volume" in desired else None,
            log_config=LogConfig(type="json-file", config={"max-size": "5m", "max-file": "2"}),
            init=desired["init"] or None,
        )
        networking = api.create_networking_config(
            {networks[primary]: api.create_endpoint_config(aliases=desired["networks"][primary] or None)}
        )
        try:
            created = api.create_container(
                desired["image"],
                command=desired["command"],
                name=cname,
                user=desired["user"] or None,
                environment=desired["env"],
                labels=labels,
                ports=ports,
                host_config=host_config,
                networking_config=networking,
                stop_signal=desired["stop_signal"],
                stop_timeout=self.stop_timeout,
                detach=True,
            )
        except APIError as exc:
            if exc.status_code == 409:
                # Another ensure created it first, or a killed one's create is still under
                # way in the engine (the name is taken a moment before it can be inspected).
                info = self._wait_created(cname, 30)
                if info is not None and self._ours(info["Config"].get("Labels"), name):
                    return info
            raise RuntimeError_(f"creating container {cname}: {_short(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self._unreachable(exc) from None
        for role in roles[1:]:
            self._call(
                f"connecting {cname} to its network", api.connect_container_to_network,
                created["Id"], networks[role], aliases=desired["networks"][role] or None,
            )
        return self._inspect(cname) or {"State": {"Status": "created"}}

    def _wait_created(self, cname: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            info = self._inspect(cname)
            if info is not None or time.monotonic() >= deadline:
                return info
            time.sleep(0.1)

    def _remove_container(self, cname: str, name: str, *, graceful: bool) -> None:
        info = self._inspect_ours(cname, name)  # what is not ours is never touched
        if info is None:
            return
        try:
            if graceful and info["State"].get("Running"):
                self.api.stop(info["Id"], timeout=self.stop_timeout)
            self.api.remove_container(info["Id"], force=True, v=True)
        except NotFound:
            pass
        except APIError as exc:
            if "already in progress" not in _short(exc):
                raise RuntimeError_(f"removing container {cname}: {_short(exc)}") from None
            self._wait_gone(info["Id"], 30)

    def _wait_gone(self, cid: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.api.inspect_container(cid)
            except NotFound:
                return
            time.sleep(0.2)

    # readiness

    def _exec(self, cname: str, cmd: list[str], *, user: str | None = None,
              env: dict | None = None) -> tuple[int | None, str]:
        """Run `cmd` in the container; (exit code, stdout+stderr)."""
        api = self.api
        eid = api.exec_create(cname, cmd, user=user or "", environment=env)["Id"]
        out = api.exec_start(eid)
        return self._exit_code(eid, tries=50, pause=0.02), (out or b"").decode(errors="replace")

    def _exit_code(self, eid: str, *, tries: int, pause: float) -> int | None:
        """The exit code of a finished exec (the engine sets it a moment after the output ends)."""
        code = None
        for _ in range(tries):
            code = self.api.exec_inspect(eid).get("ExitCode")
            if code is not None:
                break
            time.sleep(pause)
        return code

    def _probe(self, cname: str, component: str) -> bool:
        try:
            if component == "db":
                # Over TCP: the entrypoint's temporary init server listens on no TCP port,
                # so this answers only once the real server runs.
                code, _ = self._exec(cname, ["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432", "-t", "2"])
                return code == 0
            code, out = self._exec(cname, ["redis-cli", "ping"])
            return code == 0 and "PONG" in out
        except (APIError, requests.RequestException):
            return False

    def _wait_services(self, name: str, timeout: float) -> None:
        """Until PostgreSQL and Redis answer; fails at the deadline, or at once when one of
        them crashes (exits, or is restarted by its policy) while we wait."""
        restarts: dict[str, int] = {}
        looks: dict[str, int] = {}

        def crashed(component):
            looks[component] = looks.get(component, 0) + 1
            if looks[component] % 5 != 1:  # inspected about twice a second
                return False
            info = self._inspect(self.container_name(name, component)) or {"State": {"Status": "removed"},
                                                                           "RestartCount": 0}
            count = info.get("RestartCount") or 0
            restarts.setdefault(component, count)
            return info["State"]["Status"] in ("exited", "dead", "removed") or count > restarts[component]

        wait_services(name, ["db", "redis"], answers=lambda c: self._probe(self.container_name(name, c), c),
                      crashed=crashed, last_words=lambda c: last_lines(self.logs(name, c, tail=20)), timeout=timeout)

    # --- state ---------------------------------------------------------------------------

    @_user_errors
    def state(self, name: str) -> InstanceState:
        check_name(name)
        components = {}
        app_url = ""
        for component in COMPONENTS:
            cname = self.container_name(name, component)
            info = self._inspect_ours(cname, name)
            if info is None:
                components[component] = ComponentState(Health.MISSING)
                continue
            components[component] = self._component_state(cname, component, info)
            if component == "app":
                app_url = self._app_url(info)
        return InstanceState(db=components["db"], redis=components["redis"], app=components["app"], app_url=app_url)

    def _component_state(self, cname: str, component: str, info: dict) -> ComponentState:
        st = info["State"]
        status = st["Status"]
        notes = []
        if st.get("OOMKilled"):
            notes.append("OOMKilled")
        restarts = info.get("RestartCount") or 0
        if restarts:
            notes.append(f"restarted {restarts}x")
        if status == "running":
            if component == "app" or self._probe(cname, component):
                return ComponentState(Health.RUNNING, ", ".join(notes), restarts)
            return ComponentState(Health.STARTING, ", ".join(notes or ["not answering yet"]), restarts)
        if status == "restarting":  # it exited; the restart policy starts it again
            return ComponentState(Health.STARTING, ", ".join(notes + [f"exit code {st.get('ExitCode')}"]), restarts)
        if status == "created":
            return ComponentState(Health.EXITED, "created, not started")
        if status == "paused":
            return ComponentState(Health.EXITED, "paused")
        detail = notes + [f"exit code {st.get('ExitCode')}"]
        if st.get("Error"):
            detail.append(st["Error"][:200])
        return ComponentState(Health.EXITED, ", ".join(detail), restarts)

    def _app_url(self, info: dict) -> str:
        port = self._host_port(info)
        return f"http://127.0.0.1:{port}" if port else ""

    # --- operations ------------------------------------------------------------------------

    @_user_errors
    def restart_app(self, name: str) -> None:
        check_name(name)
        cname = self.container_name(name, "app")
        info = self._inspect_ours(cname, name)
        if info is None:
            return
        try:
            self._call(f"restarting {cname}", self.api.restart, info["Id"], timeout=self.stop_timeout)
        except NotFound:
            pass

    @_user_errors
    def stop(self, name: str) -> None:
        self._stop(name, ("app", "redis", "db"))

    @_user_errors
    def stop_app(self, name: str) -> None:
        """Only the app (a sleeping instance whose database and Redis stay up); `ensure`
        starts the same container again."""
        self._stop(name, ("app",))

    def _stop(self, name: str, components: tuple[str, ...]) -> None:
        check_name(name)
        for component in components:
            cname = self.container_name(name, component)
            info = self._inspect_ours(cname, name)
            if info is None:
                continue
            try:
                self._call(f"stopping {cname}", self.api.stop, info["Id"], timeout=self.stop_timeout)
            except NotFound:
                pass

    def _running_db(self, name: str) -> str:
        cname = self.container_name(name, "db")
        info = self._inspect_ours(cname, name)
        if info is None:
            raise RuntimeError_(f"the database of {name} does not exist")
        if not info["State"].get("Running"):
            raise RuntimeError_(f"the database of {name} is not running")
        return cname

    @_user_errors
    def backup_database(self, name: str, spec: InstanceSpec, dest: Path) -> int:
        check_name(name)
        return self._dump_from(self._running_db(name), name, spec, dest)

    def _dump_from(self, cname: str, name: str, spec: InstanceSpec, dest: Path) -> int:
        """`pg_dump -Fc` by `docker exec` in the database container `cname` (a name or an id) into `dest`."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        api = self.api
        try:
            eid = self._call(
                f"starting pg_dump in {cname}", api.exec_create, cname,
                ["pg_dump", "-Fc", "-U", spec.db_user, "-d", spec.db_name],
                user="postgres", environment={"PGPASSWORD": spec.db_password},
            )["Id"]
            errors = bytearray()
            with open(tmp, "wb") as fh:
                for stdout, stderr in api.exec_start(eid, stream=True, demux=True):
                    if stdout:
                        fh.write(stdout)
                    if stderr and len(errors) < 4096:
                        errors += stderr
                fh.flush()
                os.fsync(fh.fileno())
            code = self._exit_code(eid, tries=100, pause=0.05)
            if code != 0:
                raise RuntimeError_(
                    f"pg_dump of {name} failed (exit code {code}): {last_lines(errors.decode(errors='replace'))}"
                )
            size = tmp.stat().st_size
            with open(tmp, "rb") as fh:
                if fh.read(5) != b"PGDMP":
                    raise RuntimeError_(f"pg_dump of {name} wrote no custom-format archive")
            os.replace(tmp, dest)
            return size
        except (requests.RequestException, APIError) as exc:
            raise RuntimeError_(f"backup of {name} failed: {_short(exc)}") from None
        finally:
            tmp.unlink(missing_ok=True)

    @_user_errors
    def reset_database(self, name: str, spec: InstanceSpec) -> None:
        check_name(name)
        cname = self._running_db(name)
        db, user = spec.db_name, spec.db_user
        for value in (db, user):
            if not SQL_IDENTIFIER.fullmatch(value or ""):
                raise RuntimeError_(f"{value!r} is not a lowercase SQL identifier")
        cmd = [
            "psql", "-v", "ON_ERROR_STOP=1", "-q", "-U", user, "-d", "template1",
            # WITH (FORCE) terminates the app's connections first (PostgreSQL 13+).
            "-c", f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)',
            "-c", f'CREATE DATABASE "{db}" OWNER "{user}"',
        ]
        try:
            code, out = self._exec(cname, cmd, user="postgres", env={"PGPASSWORD": spec.db_password})
        except (APIError, requests.RequestException) as exc:
            raise RuntimeError_(f"resetting the database of {name} failed: {_short(exc)}") from None
        if code != 0:
            raise RuntimeError_(f"resetting the database of {name} failed: {last_lines(out)}")
        # The app is not restarted here: the caller does that (the reconciler's restart).

    @_user_errors
    def check_restore(self, name: str, spec: InstanceSpec, src: Path) -> None:
        check_name(name)
        self._restore_in(self._running_db(name), name, spec, Path(src), check=True)

    @_user_errors
    def restore_database(self, name: str, spec: InstanceSpec, src: Path) -> None:
        check_name(name)
        self._restore_in(self._running_db(name), name, spec, Path(src))
        # The app is not restarted here: the caller does that (the reconciler's restart).

    def _restore_in(self, cname: str, name: str, spec: InstanceSpec, src: Path, *, check: bool = False) -> None:
        """PG_RESTORE_SCRIPT in the database container `cname` (a name or an id), the
        backup streamed into its /tmp first (never read whole into memory here)."""
        env = {**restore_names(spec.db_name, spec.db_user), "PGPASSWORD": spec.db_password}
        member = f"lab-restore-{uuid.uuid4().hex[:12]}.dump"
        stream = TarStream([(member, src, 0o640, 0, self._postgres_gid(cname))])
        try:
            self._call("copying the backup into the database's container", self.api.put_archive, cname, "/tmp",
                       stream)
        finally:
            stream.close()
        try:
            code, out = self._long_exec(cname, ["bash", "-c", PG_RESTORE_SCRIPT, "restore", f"/tmp/{member}",
                                                "check" if check else "restore"], user="postgres", env=env,
                                        timeout=settings.LAB_BUILD_TIMEOUT)
        except (APIError, requests.RequestException) as exc:
            raise RuntimeError_(f"restoring the database of {name} failed: {_short(exc)}") from None
        finally:
            try:
                self._exec(cname, ["rm", "-f", "--", f"/tmp/{member}"], user="postgres")
            except (APIError, requests.RequestException):
                pass
        if code != 0:
            raise restore_failure(name, code, out)

    def _postgres_gid(self, cname: str) -> int:
        """The group id of the user `postgres` in the database container (the backup is
        readable by it, not by others there)."""
        code, out = self._exec(cname, ["id", "-g", "postgres"])
        if code != 0 or not out.strip().isdigit():
            raise RuntimeError_(f"the database container has no user postgres: {last_lines(out)}")
        return int(out.strip())

    def _long_exec(self, cname: str, cmd: list[str], *, user: str, env: dict, timeout: float) -> tuple[int | None, str]:
        """`_exec` for a command that may run long (a restore): a client of its own whose
        requests wait up to `timeout` seconds."""
        client = docker.APIClient(version=self.api.api_version, timeout=timeout, **self._client_kwargs)
        try:
            eid = client.exec_create(cname, cmd, user=user, environment=env)["Id"]
            out = client.exec_start(eid)
            return self._exit_code(eid, tries=100, pause=0.05), (out or b"").decode(errors="replace")
        finally:
            client.close()

    @_user_errors
    def remove(self, name: str) -> None:
        """Everything labelled with the instance, in rounds until nothing is left: a
        container whose creation is still under way (a killed ensure's) shows in the list
        a moment before it can be removed."""
        check_name(name)
        deadline = time.monotonic() + 60
        while True:
            left = self._remove_round(name)
            if not left:
                self.prune_releases(name, set())  # its release images go with it
                return
            if time.monotonic() >= deadline:
                raise RuntimeError_(f"could not remove everything of {name}: {left[0]}")
            time.sleep(0.3)

    def _labelled(self, name: str | None = None) -> tuple[list, list, list]:
        """The containers, networks and volumes carrying our labels (of one instance, or all)."""
        api = self.api
        filters = self._filters(name)
        return (
            self._call("listing containers", api.containers, all=True, filters=filters),
            self._call("listing networks", api.networks, filters=filters),
            self._call("listing volumes", api.volumes, filters=filters).get("Volumes") or [],
        )

    def _remove_round(self, name: str) -> list[str]:
        """One pass over containers, networks and volumes; returns what is still there."""
        api = self.api
        filters = self._filters(name)
        problems = []
        for c in self._call("listing containers", api.containers, all=True, filters=filters):
            try:
                api.remove_container(c["Id"], force=True, v=True)
            except NotFound:
                pass
            except APIError as exc:
                problems.append(f"container {c['Names'][0].lstrip('/')}: {_short(exc)}")
        for net in self._call("listing networks", api.networks, filters=filters):
            try:
                self._remove_network(net["Id"])
            except RuntimeError_ as exc:
                problems.append(str(exc))
        for vol in self._call("listing volumes", api.volumes, filters=filters).get("Volumes") or []:
            try:
                api.remove_volume(vol["Name"], force=True)
            except NotFound:
                pass
            except APIError as exc:  # in use: a container of ours still being created or removed
                problems.append(f"volume {vol['Name']}: {_short(exc)}")
        remaining = sum(len(found) for found in self._labelled(name))
        if remaining and not problems:
            problems.append(f"{remaining} resources appeared while removing")
        return problems if remaining else []

    @_user_errors
    def logs(self, name: str, component: str = "app", tail: int = 200) -> str:
        check_name(name)
        if component not in COMPONENTS:
            raise RuntimeError_(f"unknown component {component!r} (app, db or redis)")
        cname = self.container_name(name, component)
        info = self._inspect_ours(cname, name)
        if info is None:
            return ""
        try:
            out = self._call(f"reading logs of {cname}", self.api.logs, info["Id"], stdout=True, stderr=True,
                             tail=max(1, int(tail)))
        except NotFound:
            return ""
        return out.decode("utf-8", errors="replace")

    def ensure_protections(self) -> None:
        """Nothing beyond this machine's firewall (the sweep applies that)."""

    @_user_errors
    def owned_instances(self) -> set[str]:
        labelled = [item.get("Labels") for found in self._labelled() for item in found]
        return {labels[LABEL_INSTANCE] for labels in labelled if labels and labels.get(LABEL_INSTANCE)}


BACKEND = DockerRuntime  # instances.runtime finds a backend by this name (the module is the backend)
