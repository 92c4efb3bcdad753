"""The runtime interface: what the reconciler asks of a backend (docker now; process and
swarm later). No page, task or API knows which backend runs an instance.

Every method is idempotent and converges: calling `ensure` twice, or after a crash in
the middle of the first call, leaves exactly one of everything. Backends label (or
otherwise mark) every resource with the manager's id and the instance name, never touch
anything unmarked, and can list what they own so the sweep can remove orphans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol


class RuntimeError_(Exception):
    """A backend failed; the message is shown to the user as the status reason."""


@dataclass(frozen=True)
class AppSpec:
    """The oTree app process of an instance (from the live release; a test image in tests)."""

    image: str
    command: list[str] | None = None  # None: the image's default
    port: int = 8000  # the port the app listens on inside its container
    env: dict[str, str] = field(default_factory=dict)  # OTREE_*, DATABASE_URL, REDIS_URL, config vars
    release_id: str = ""  # label, so a new release's container differs from the old one's
    user: str | None = None  # "uid:gid" the app runs as; None: the image's own


@dataclass(frozen=True)
class InstanceSpec:
    """Desired state of one instance, as the reconciler derives it from the database."""

    name: str  # unique, DNS-safe
    db_name: str
    db_user: str
    db_password: str
    memory_mb: int  # limit for the app container
    cpus: float  # limit for the app container
    app: AppSpec | None = None  # None until the first deploy
    # Small fixed limits for the supporting services.
    db_memory_mb: int = 256
    redis_memory_mb: int = 64


class Health(str, Enum):
    MISSING = "missing"
    STARTING = "starting"
    RUNNING = "running"  # up and answering
    EXITED = "exited"


@dataclass
class ComponentState:
    health: Health
    detail: str = ""  # e.g. "OOMKilled", "exit code 1"


@dataclass
class InstanceState:
    db: ComponentState
    redis: ComponentState
    app: ComponentState
    app_url: str = ""  # where the app answers on the host, e.g. http://127.0.0.1:32768

    @property
    def services_ready(self) -> bool:
        return self.db.health == Health.RUNNING and self.redis.health == Health.RUNNING


class Runtime(Protocol):
    name: str  # "docker", "process", ...
    isolation: str  # one sentence for the instance page

    def available(self) -> bool:
        """True when the backend can be used on this machine (e.g. the engine answers)."""

    def ensure(self, spec: InstanceSpec) -> InstanceState:
        """Create or repair everything of the instance to match `spec`; start what is stopped.
        An app container whose spec changed (image, env, limits) is replaced."""

    def state(self, name: str) -> InstanceState:
        """What runs now, without changing anything."""

    def restart_app(self, name: str) -> None:
        """Restart the app process (no-op without an app)."""

    def stop(self, name: str) -> None:
        """Stop all processes of the instance, keeping its data."""

    def backup_database(self, name: str, spec: InstanceSpec, dest: Path) -> int:
        """Write a `pg_dump -Fc` of the instance's database to `dest`; return its size."""

    def reset_database(self, name: str, spec: InstanceSpec) -> None:
        """Empty the database (drop and recreate it); the app is restarted afterwards."""

    def remove(self, name: str) -> None:
        """Remove every resource of the instance, data included. Idempotent."""

    def deploy_app(self, spec: InstanceSpec, *, timeout: float, out=None, before_switch=None) -> str:
        """Start `spec.app` beside the running app, wait until it answers HTTP, call
        `before_switch()` (an exception there aborts), then make it the instance's app; the
        old one keeps running until `retire_app`. On failure the old app is untouched and
        RuntimeError_ says why. Returns the new app's URL on the host."""

    def retire_app(self, name: str) -> None:
        """Stop the app that the last `deploy_app` replaced."""

    def image_exists(self, image: str) -> bool:
        """Whether a release's build (image) is still kept."""

    def prune_images(self, name: str, keep_releases: set[str]) -> list[str]:
        """Remove the instance's release builds except those of `keep_releases`."""

    def logs(self, name: str, component: str = "app", tail: int = 200) -> str:
        """Recent output of a component ("app", "db", "redis")."""

    def owned_instances(self) -> set[str]:
        """Names of the instances this backend has any resource of (for the orphan sweep)."""
