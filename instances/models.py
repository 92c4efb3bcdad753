import secrets
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.utils import timezone

from manager.crypto import EncryptedJSONField, EncryptedTextField


def generate_secret(nbytes: int = 18) -> str:
    return secrets.token_urlsafe(nbytes)


class Instance(models.Model):
    """One experimenter's isolated oTree installation. The row is the desired state;
    the reconciler makes the runtime match it."""

    class Status(models.TextChoices):
        PROVISIONING = "provisioning", "provisioning"
        READY_FOR_CODE = "ready_for_code", "ready for code"
        DEPLOYING = "deploying", "deploying"
        RUNNING = "running", "running"
        STOPPED = "stopped", "stopped"
        SLEEPING = "sleeping", "sleeping"
        FAILED = "failed", "failed"
        DELETING = "deleting", "deleting"

    class AuthLevel(models.TextChoices):
        STUDY = "STUDY", "STUDY (admin login required; participants only via links)"
        DEMO = "DEMO", "DEMO (admin login required; demo page public)"
        NONE = "", "none (everything public — for local trials only)"

    name = models.CharField(max_length=40, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="instances")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PROVISIONING, db_index=True)
    status_reason = models.CharField(max_length=500, blank=True)
    # Desired state: the reconciler converges the runtime to these.
    desired_running = models.BooleanField(default=True)
    delete_requested = models.BooleanField(default=False)
    generation = models.PositiveIntegerField(default=1)  # bumped by every change of desired state
    restart_generation = models.PositiveIntegerField(default=0)  # bumped by "restart"
    observed_generation = models.PositiveIntegerField(default=0)  # what the runtime last matched
    observed_restart_generation = models.PositiveIntegerField(default=0)
    # oTree settings
    admin_username = models.CharField(max_length=40, default="admin")
    admin_password = EncryptedTextField(default=generate_secret)
    rest_key = EncryptedTextField(default=generate_secret)
    auth_level = models.CharField(max_length=5, choices=AuthLevel.choices, default=AuthLevel.STUDY, blank=True)
    production = models.BooleanField(default=True)
    config_vars = EncryptedJSONField(default=dict, blank=True)
    # database
    db_password = EncryptedTextField(default=generate_secret)
    # resources (lab managers only)
    memory_mb = models.PositiveIntegerField(default=512)
    cpus = models.DecimalField(max_digits=4, decimal_places=2, default=1)
    public_port = models.PositiveIntegerField(null=True, blank=True, unique=True)
    runtime = models.CharField(max_length=20, blank=True)  # which backend runs it
    # The node it lives on, for runtimes with nodes (swarm; '' for docker and process), as the
    # reconciler last found it, so no page asks the swarm: the node's id and its hostname then.
    node = models.CharField(max_length=64, blank=True)
    node_name = models.CharField(max_length=255, blank=True)
    # The settings the app last came up healthy with (`app_settings()`; {} before the first
    # app): a change is applied like a deploy and, should the app not come up with it, these
    # are restored (instances.reconciler).
    applied_settings = EncryptedJSONField(default=dict, blank=True)
    # Scheduled backups (instances.schedule): None = the lab's LAB_BACKUP_* defaults; an
    # interval of 0 turns them off for this instance.
    backup_interval_minutes = models.PositiveIntegerField(null=True, blank=True)
    backup_keep_daily = models.PositiveIntegerField(null=True, blank=True)
    backup_keep_weekly = models.PositiveIntegerField(null=True, blank=True)
    # The oTree sessions as the manager last read them through the app's REST API
    # (instances.sessions): [{code, config, participants, started, finished, last_activity,
    # live}], and when; the dashboard and the pages show these without asking the app.
    otree_sessions = models.JSONField(default=list, blank=True)
    sessions_checked_at = models.DateTimeField(null=True, blank=True)
    # Why the last read failed ('' when it succeeded): the sessions above are then stale and
    # the manager knows of no live session (an app that does not answer blocks nothing).
    sessions_problem = models.CharField(max_length=300, blank=True)
    # Sleep (instances.sleep): an idle app is stopped and wakes on the next request.
    # sleep_after_minutes: None = the lab's LAB_SLEEP_AFTER_MINUTES; 0 = never sleeps.
    sleep_after_minutes = models.PositiveIntegerField(null=True, blank=True)
    asleep = models.BooleanField(default=False)  # desired state: the app (and maybe db/redis) sleeps
    slept_at = models.DateTimeField(null=True, blank=True)
    sleep_reason = models.CharField(max_length=200, blank=True)  # why it fell asleep
    woke_at = models.DateTimeField(null=True, blank=True)
    wake_reason = models.CharField(max_length=200, blank=True)  # why it woke ("a request to its URL", ...)
    # The last time the proxy saw a request for it (instances.proxy reads Caddy's counters).
    last_request_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    @property
    def live_sessions(self) -> list[dict]:
        """The sessions last read as live (participants active in the last minutes); none
        while the app does not answer (the last read is stale then)."""
        if self.sessions_problem:
            return []
        return [s for s in (self.otree_sessions or []) if isinstance(s, dict) and s.get("live")]

    def __str__(self):
        return self.name

    @property
    def node_label(self) -> str:
        """'hostname (id[:12])' of its node, '' when it has none."""
        if not self.node:
            return ""
        return f"{self.node_name} ({self.node[:12]})" if self.node_name else self.node[:12]

    @property
    def status_color(self):
        return {
            "provisioning": "secondary", "ready_for_code": "warning", "deploying": "info", "running": "success",
            "stopped": "dark", "failed": "danger", "deleting": "secondary", "sleeping": "light",
        }[self.status]

    @property
    def url(self) -> str:
        """The address people open. Never on the manager's host name: cookies ignore ports,
        so the manager's session would travel to the experimenter's code. Port routing:
        LAB_INSTANCE_HOST (the proxy redirects any other name there); subdomain routing:
        <name>.LAB_DOMAIN (the manager's cookies are host-only)."""
        tls = settings.LAB_TLS != "off"  # Caddy serves the instances with TLS (instances.proxy)
        if settings.LAB_ROUTING == "subdomain":
            port = f":{settings.LAB_HTTPS_PORT}" if tls and settings.LAB_HTTPS_PORT != 443 else ""
            return f"https://{self.name}.{settings.LAB_DOMAIN}{port}/"
        if self.public_port:
            host = settings.LAB_INSTANCE_HOST
            host = f"[{host}]" if ":" in host and not host.startswith("[") else host
            return f"{'https' if tls else 'http'}://{host}:{self.public_port}/"
        return ""

    @property
    def ssh_url(self) -> str:
        return f"ssh://git@{settings.LAB_PUBLIC_HOST}:{settings.LAB_SSH_PORT}/{self.name}.git"

    @property
    def https_url(self) -> str:
        return f"{settings.LAB_PUBLIC_URL}/git/{self.name}.git"

    @property
    def live_release(self):
        """The release serving now (prefetch `live_releases` to avoid a query per row)."""
        cached = getattr(self, "live_releases", None)
        if cached is not None:
            return cached[0] if cached else None
        return self.releases.filter(status="live").first()

    @property
    def db_name(self) -> str:
        return "otree"

    @property
    def db_user(self) -> str:
        return "otree"

    # What the app is started with, of the settings a user changes (the app restarts).
    APP_SETTINGS = ("config_vars", "admin_password", "auth_level", "production", "memory_mb", "cpus")

    def app_settings(self) -> dict:
        """The settings the app runs with (JSON-safe; secrets included: store encrypted)."""
        return {"config_vars": dict(self.config_vars or {}), "admin_password": self.admin_password,
                "auth_level": self.auth_level, "production": bool(self.production),
                "memory_mb": int(self.memory_mb), "cpus": f"{Decimal(str(self.cpus)):.2f}"}

    def otree_env(self) -> dict[str, str]:
        """The app's environment (what oTree reads) but for DATABASE_URL and REDIS_URL,
        which the runtime adds (it knows where they are); secrets included — never log it."""
        env = {str(k): str(v) for k, v in (self.config_vars or {}).items()}
        env.update({
            "OTREE_ADMIN_PASSWORD": self.admin_password,
            "OTREE_REST_KEY": self.rest_key,
            "OTREE_AUTH_LEVEL": self.auth_level,
            "OTREE_PRODUCTION": "1" if self.production else "",
        })
        if not self.auth_level:
            env.pop("OTREE_AUTH_LEVEL")
        return env


class Backup(models.Model):
    """A `pg_dump -Fc` of an instance's database (or, kind `repository`, a `git bundle` of
    the git history of a deleted instance: instances.git.archive), kept under
    LAB_DATA_DIR/backups/. Kind `move`: the dump a move to another swarm node restored
    there (instances.reconciler.move), kept like any other."""

    class Kind(models.TextChoices):
        MANUAL = "manual"
        BEFORE_RESET = "before_reset", "before reset"
        FINAL = "final", "final (instance deleted)"
        REPOSITORY = "repository", "git history (instance deleted)"
        MOVE = "move", "before a move to another node"
        SCHEDULED = "scheduled"
        BEFORE_RESTORE = "before_restore", "before a restore"
        UPLOAD = "upload", "uploaded"

    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"
        FAILED = "failed"

    # The backup outlives its instance (the final backup of a deleted one).
    instance = models.ForeignKey(Instance, null=True, blank=True, on_delete=models.SET_NULL, related_name="backups")
    instance_name = models.CharField(max_length=40, db_index=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.MANUAL)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    filename = models.CharField(max_length=200, blank=True)
    size = models.BigIntegerField(default=0)
    # oTree's own exports of the data (a zip of CSVs, instances.export) stored beside the
    # database dump (a reset's and a delete's backup); '' when there is none.
    data_filename = models.CharField(max_length=200, blank=True)
    data_size = models.BigIntegerField(default=0)
    # Why the data export of a reset's or a delete's backup could not be stored ('' when it
    # was, or when none was attempted): the job's result and the Backups page say it.
    data_problem = models.CharField(max_length=500, blank=True)
    # When the file was copied to LAB_BACKUP_COPY_DIR (null: not copied).
    copied_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self):
        return f"{self.instance_name} {self.kind} {self.created_at:%Y-%m-%d %H:%M}"

    @property
    def path(self):
        from instances.backups import backup_dir

        return backup_dir() / self.filename

    @property
    def data_path(self):
        """The data export's zip beside the dump (None when there is none)."""
        from instances.backups import backup_dir

        return backup_dir() / self.data_filename if self.data_filename else None


class Release(models.Model):
    """One push's deploy: recorded (queued) before anything else happens, so a crash never
    loses it; the build, start and health check move it forward; the sweep fails releases
    whose worker died."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        BUILDING = "building"
        STARTING = "starting"
        LIVE = "live"
        FAILED = "failed"
        SUPERSEDED = "superseded"
        ROLLED_BACK = "rolled_back", "rolled back"
        READY = "ready", "ready to switch"  # built and health-checked; waits for a live session to end

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="releases")
    number = models.PositiveIntegerField()  # 1, 2, 3 ... per instance
    commit = models.CharField(max_length=40)
    branch = models.CharField(max_length=200, default="main")
    author = models.CharField(max_length=200, blank=True)
    message = models.CharField(max_length=500, blank=True)
    pushed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="+")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    status_reason = models.CharField(max_length=500, blank=True)
    log = models.TextField(blank=True)  # build and start output (never secrets)
    image = models.CharField(max_length=200, blank=True)  # the built image's tag
    rollback_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    session_configs = models.JSONField(default=list, blank=True)  # [{name, display_name, num_demo_participants}]
    rooms = models.JSONField(default=list, blank=True)  # [{name, display_name, participant_labels: [...]}]
    language_code = models.CharField(max_length=20, blank=True)  # settings.LANGUAGE_CODE of the project
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-number"]
        constraints = [models.UniqueConstraint(fields=["instance", "number"], name="release_number_unique")]

    def __str__(self):
        return f"{self.instance.name} #{self.number} {self.commit[:8]} [{self.status}]"

    @property
    def duration(self):
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None
