"""Instances: every rule about creating, changing and deleting them.

A change writes the desired state (and bumps `generation`) in one transaction and, after
commit, enqueues a job that runs the reconciler. Whatever happens to that job, the
periodic sweep reconciles again, so the runtime always converges to the database.
"""

import contextlib
import logging
import re
import subprocess
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F

from instances import build, otree_project, sessions, state
from instances.git import archive
from instances.git.repos import repo_path
from instances.models import Instance, generate_secret
from manager import texts
from manager import throttle
from manager.accounts.models import User
from manager.accounts.services import Conflict, NotAllowed
from manager.audit.services import record
from manager.jobs import services as jobs

NAME_RE = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
NAME_LENGTH = (2, 40)
RESERVED_NAMES = {"admin", "api", "git", "lobby", "static", "www", "manager", "lab", "ws", "mail"}
RESERVED_CONFIG_PREFIXES = ("OTREE_",)
# Set by the runtimes (the process runtime gives each instance its own TMPDIR).
RESERVED_CONFIG_KEYS = {"DATABASE_URL", "REDIS_URL", "PORT", "PATH", "HOME", "TMPDIR"}
# Variables that change how programs are loaded or how Python starts: a value there can
# keep the app from starting (PYTHONHOME=/x, PYTHONIOENCODING=x, LD_AUDIT=x) or run other
# code in it. Compared ignoring case: `ld_preload` does nothing on Linux, but refusing it
# too tells the experimenter the same rule. MALLOC_* (e.g. MALLOC_ARENA_MAX, a common
# memory setting of Python web apps) stays allowed.
LOADER_CONFIG_PREFIXES = {"LD_": "changes how programs are loaded",
                          "PYTHON": "changes how Python starts"}
LOADER_CONFIG_KEYS = {"GCONV_PATH": "makes the C library load other code",
                      "GLIBC_TUNABLES": "changes how the C library and the program loader start",
                      "LOCPATH": "makes the C library load locale data from elsewhere"}
MAX_CONFIG_VARS = 100
MAX_CONFIG_VALUE = 4096  # characters of one value
MAX_CONFIG_NAME = 64
# All config vars together, as the app's environment holds them ("NAME=value\0", UTF-8):
# far below what the kernel passes to a program (one string at most 128 KiB, all of
# argv and environment about a quarter of the stack limit), beside what the manager adds.
MAX_CONFIG_BYTES = 64 * 1024
MEMORY_RANGE = (128, 16384)
CPU_RANGE = (Decimal("0.1"), Decimal("16"))


# --- validation ---------------------------------------------------------------------

def validate_name(name: str) -> str:
    name = texts.check_text(name or "", field="name", label="The name", single_line=True).strip()
    if not name:
        raise ValidationError({"name": ["A name is required."]})
    if not NAME_LENGTH[0] <= len(name) <= NAME_LENGTH[1]:
        raise ValidationError({"name": [f"Use {NAME_LENGTH[0]} to {NAME_LENGTH[1]} characters (this one has "
                                        f"{len(name)})."]})
    if name != name.lower():
        raise ValidationError({"name": ["Use lowercase letters only (the name becomes part of URLs)."]})
    if not NAME_RE.match(name) or "--" in name:
        raise ValidationError({"name": [
            "Use lowercase letters, digits and single hyphens; start with a letter and end with a letter "
            "or digit (e.g. public-goods-2)."]})
    if name in RESERVED_NAMES:
        raise ValidationError({"name": [f"{name!r} is reserved; choose another name."]})
    if settings.LAB_ROUTING == "subdomain" and f"{name}.{settings.LAB_DOMAIN}".lower() == settings.LAB_PUBLIC_HOST.lower():
        raise ValidationError({"name": [f"{name}.{settings.LAB_DOMAIN} is the manager's own address; choose another "
                                        "name."]})
    if Instance.objects.filter(name=name).exists():
        raise Conflict({"name": [f"An instance named {name!r} already exists."]})
    return name


def _config_name_problem(key: str) -> str | None:
    """Why `key` (exactly as given: never trimmed) cannot name an environment variable."""
    if not isinstance(key, str):
        return "is not text"
    if not key:
        return "is empty"
    found = texts.problem(key, max_length=MAX_CONFIG_NAME, single_line=True)
    if found:
        return found
    if key[0].isdigit():
        return "starts with a digit"
    bad = next((c for c in key if not (c == "_" or ("A" <= c <= "Z") or ("a" <= c <= "z") or ("0" <= c <= "9"))),
               None)
    if bad is not None:
        shown = texts.character_name(bad) if bad.isspace() or not bad.isprintable() else repr(bad)
        return f"contains {shown}"
    return None


def config_name_refusal(key: str) -> str | None:
    """Why `key` cannot be a config var (one sentence), or None."""
    found = _config_name_problem(key)
    if found:
        return (f"{key!r} is not a valid variable name: it {found} (names are taken exactly as given: "
                "letters A-Z, a-z, digits and _, not starting with a digit, at most "
                f"{MAX_CONFIG_NAME} characters).")
    upper = key.upper()
    if upper.startswith(RESERVED_CONFIG_PREFIXES) or upper in RESERVED_CONFIG_KEYS:
        return (f"{key} is set by the manager; use the instance's own settings (admin password, auth level, "
                "production) instead.")
    reason = LOADER_CONFIG_KEYS.get(upper) or next(
        (why for prefix, why in LOADER_CONFIG_PREFIXES.items() if upper.startswith(prefix)), None)
    if reason:
        return f"{key} {reason} and cannot be set as a config var."
    return None


def clean_config_vars(values) -> dict[str, str]:
    """The config vars as given, or ValidationError({"env": [why]}): names checked exactly as
    given (never trimmed, so two names never become one), values text the app's
    environment can hold, all of them within MAX_CONFIG_BYTES."""
    if not isinstance(values, dict):
        raise ValidationError({"env": ["Config vars must be an object of NAME: value pairs."]})
    if len(values) > MAX_CONFIG_VARS:
        raise ValidationError({"env": [f"At most {MAX_CONFIG_VARS} config vars."]})
    cleaned = {}
    for key, value in values.items():
        refusal = config_name_refusal(key)
        if refusal:
            raise ValidationError({"env": [refusal]})
        if not isinstance(value, str):
            raise ValidationError({"env": [f"The value of {key} must be text."]})
        texts.check_text(value, field="env", max_length=MAX_CONFIG_VALUE, label=f"The value of {key}")
        cleaned[key] = value
    size = sum(len(f"{k}={v}".encode()) + 1 for k, v in cleaned.items())
    if size > MAX_CONFIG_BYTES:
        raise ValidationError({"env": [f"The config vars are too large together ({size} bytes as the app's "
                                       f"environment, at most {MAX_CONFIG_BYTES})."]})
    return cleaned


# oTree starts Sentry when SENTRY_DSN is set, and exits at once ("add sentry_sdk to your
# requirements.txt") when the package is missing.
SENTRY_VAR, SENTRY_PACKAGE = "SENTRY_DSN", "sentry-sdk"
MAX_REQUIREMENTS_READ = 1024 * 1024  # bytes of a release's requirements.txt read for that check


def _live_requirements(instance: Instance) -> tuple[int, set[str]] | None:
    """(number, requirement names) of the live release's requirements.txt, or None when
    there is no live release or its file cannot be read (too large, no repository)."""
    live = instance.releases.filter(status="live").first()
    if live is None:
        return None
    repo, path = repo_path(instance), f"{live.commit}:requirements.txt"
    try:
        if int(build.git(repo, "cat-file", "-s", path, timeout=10)) > MAX_REQUIREMENTS_READ:
            return None
        text = build.git(repo, "cat-file", "blob", path, timeout=10).decode(errors="replace")
    except (build.BuildFailed, OSError, ValueError, subprocess.SubprocessError):
        return None
    return live.number, {name for name, _ in otree_project.requirement_names(text)}


def check_packages_for(instance: Instance, config_vars: dict) -> None:
    """Refuse a config var the live release's app cannot start with (SENTRY_DSN without
    sentry-sdk in its requirements.txt) before anything is stored. A value already set
    stays; without a live release the first deploy says it (oTree's own message)."""
    value = config_vars.get(SENTRY_VAR)
    if not value or (instance.config_vars or {}).get(SENTRY_VAR) == value:
        return
    found = _live_requirements(instance)
    if found is not None and SENTRY_PACKAGE not in found[1]:
        raise ValidationError({"env": [
            f"{SENTRY_VAR} needs the {SENTRY_PACKAGE} package, which the live release #{found[0]} does not "
            f"install (oTree would not start): add {SENTRY_PACKAGE} to requirements.txt and push it first."]})


def _clean_limits(memory_mb, cpus):
    """Memory: a whole number of MiB in MEMORY_RANGE. CPUs: a finite number in CPU_RANGE
    with at most two decimals, checked as given (0.099 is refused, never rounded up to
    0.10). A bool is neither (True is not 1)."""
    errors = {}
    if memory_mb is not None:
        if not isinstance(memory_mb, int) or isinstance(memory_mb, bool):
            errors["memory_mb"] = ["Memory must be a whole number of MiB."]
        elif not MEMORY_RANGE[0] <= memory_mb <= MEMORY_RANGE[1]:
            errors["memory_mb"] = [f"Memory must be between {MEMORY_RANGE[0]} and {MEMORY_RANGE[1]} MiB."]
    if cpus is not None:
        value = None
        if not isinstance(cpus, bool) and isinstance(cpus, (int, float, str, Decimal)):
            try:
                value = Decimal(str(cpus).strip())  # (str() of a number has no spaces to strip)
            except (InvalidOperation, ValueError):
                pass
        if value is None:
            errors["cpus"] = ["CPUs must be a number such as 0.5 or 2."]
        elif not value.is_finite():
            errors["cpus"] = ["CPUs must be a finite number such as 0.5 or 2."]
        elif not CPU_RANGE[0] <= value <= CPU_RANGE[1]:
            errors["cpus"] = [f"CPUs must be between {CPU_RANGE[0]} and {CPU_RANGE[1]} (this is {cpus})."]
        elif value != value.quantize(Decimal("0.01")):
            errors["cpus"] = [f"CPUs take at most two decimals, e.g. 0.25 (this is {cpus}); nothing is rounded."]
        else:
            cpus = value.quantize(Decimal("0.01"))
    if errors:
        raise ValidationError(errors)
    return memory_mb, cpus


def _allocate_port() -> int | None:
    if settings.LAB_ROUTING != "port":
        return None
    low, _, high = settings.LAB_INSTANCE_PORTS.partition("-")
    used = set(Instance.objects.exclude(public_port=None).values_list("public_port", flat=True))
    for port in range(int(low), int(high or low) + 1):
        if port not in used:
            return port
    raise NotAllowed(f"No free port left in LAB_INSTANCE_PORTS ({settings.LAB_INSTANCE_PORTS}).")


# --- changes --------------------------------------------------------------------------

def _reconcile_job(actor, instance, label, action="reconcile"):
    return jobs.start(jobs.task("instances.instance_action"), user=actor, kind=f"instance.{action}", label=label,
                      args=[instance.pk, action], link=f"/instances/{instance.name}/")


def _user(user_or_username):
    """A user, or the account of that username (the API passes names)."""
    if not isinstance(user_or_username, str):
        return user_or_username
    texts.check_text(user_or_username, field="owner", max_length=150, label="The owner's username", single_line=True)
    found = User.objects.filter(username__iexact=user_or_username).first()
    if found is None:
        raise ValidationError({"owner": [f"There is no account named {user_or_username!r}."]})
    return found


def _backend_for_new_instance() -> str:
    """The backend a new instance is recorded with ("" when none is usable: the reconciler
    then says why). A runtime that cannot isolate instances on this machine refuses the
    creation itself (ValidationError with what to do: the form's error, API 422)."""
    from instances.runtime import Refused, RuntimeError_, default_backend

    try:
        return default_backend()
    except Refused as exc:
        raise ValidationError(str(exc)) from None
    except RuntimeError_:
        return ""


def _archive_old_repository(name: str) -> None:
    """A repository left for `name` by an instance deleted before (by an earlier version of
    the manager) is archived among the backups, never served to the new instance. Should
    this fail, the repositories' own check (archive.ensure_repo) archives it at first use."""
    try:
        archive.archive_orphan(name)
    except Exception:  # noqa: BLE001 - see above: the new instance never gets the old history
        logging.getLogger(__name__).warning("archiving the old repository of %s failed", name, exc_info=True)


def create_instance(actor, *, name: str, owner, request=None, then=None) -> Instance:
    """`then(instance)`: instead of the usual creation job (e.g. a restore's job, which creates it)."""
    name = validate_name(name)
    owner = _user(owner)
    if owner is None:
        raise ValidationError({"owner": ["Choose the experimenter who owns the instance."]})
    if not owner.is_active:
        raise ValidationError({"owner": [f"{owner.username} is deactivated."]})
    backend = _backend_for_new_instance()  # (may ask the Docker engine: not inside the transaction)
    _archive_old_repository(name)
    try:
        with transaction.atomic():
            instance = Instance.objects.create(name=name, owner=owner, public_port=_allocate_port(), runtime=backend)
            record(actor, "instance.create", instance, f"created instance {name} for {owner.username}", request)
            if then is not None:
                then(instance)
            else:
                _reconcile_job(actor, instance, f"Create instance {name}", "create")
    except IntegrityError:
        raise Conflict({"name": [f"An instance named {name!r} already exists."]}) from None
    return instance


def _restart_budget(actor, instance: Instance):
    """A change that restarts the app (settings, limits, the admin password, once a release
    runs) counts against the restart budget, as *Restart* does (`LAB_THROTTLE_RESTART`);
    before the first deploy nothing restarts and nothing is counted."""
    if instance.releases.filter(status="live").exists():
        return throttle.take("restart", actor, instance)
    return contextlib.nullcontext()


def update_settings(actor, instance: Instance, *, auth_level=None, production=None, env=None,
                    memory_mb=None, cpus=None, request=None, force: bool = False) -> Instance:
    """Change oTree settings (owner) and limits (lab managers). The app restarts with the new
    settings; the database is never touched. While an oTree session is live, SessionLive
    (409) unless `force`."""
    if (memory_mb is not None or cpus is not None) and not actor.is_superuser:
        raise NotAllowed("Only lab managers may change memory and CPU limits.")
    changes = {}
    if auth_level is not None:
        if auth_level not in Instance.AuthLevel.values:
            raise ValidationError({"auth_level": ["Auth level must be STUDY, DEMO or empty (none)."]})
        changes["auth_level"] = auth_level
    if production is not None:
        if not isinstance(production, bool):
            raise ValidationError({"production": ["Production must be true or false."]})
        changes["production"] = production
    if env is not None:
        changes["config_vars"] = clean_config_vars(env)
        check_packages_for(instance, changes["config_vars"])
    memory_mb, cpus = _clean_limits(memory_mb, cpus)
    if memory_mb is not None:
        changes["memory_mb"] = memory_mb
    if cpus is not None:
        changes["cpus"] = cpus
    changes = {k: v for k, v in changes.items() if getattr(instance, k) != v}
    if not changes:
        return instance
    forced = sessions.require_idle(instance, "changing the settings (the app restarts)", force)
    with _restart_budget(actor, instance), transaction.atomic():
        for key, value in changes.items():
            setattr(instance, key, value)
        instance.generation += 1
        instance.save(update_fields=[*changes, "generation", "updated_at"])
        # Config var values are secrets: the audit log names only the keys that changed.
        summary = ", ".join(sorted("config vars" if k == "config_vars" else k for k in changes))
        record(actor, "instance.settings", instance, f"changed {summary} of {instance.name}{forced}", request,
               changed=sorted(changes))
        _reconcile_job(actor, instance, f"Apply new settings to {instance.name}", "apply")
    return instance


ADMIN_PASSWORD_LENGTH = (8, 128)


def check_admin_password(password: str) -> str:
    """The oTree admin password as given (it goes into the app's environment, and must be
    typable into oTree's login form): 8 to 128 characters, no NUL, no lone surrogate, no
    line break or other control character (a password field cannot send one)."""
    low, high = ADMIN_PASSWORD_LENGTH
    texts.check_text(password, field="password", label="The oTree admin password", single_line=True)
    if not low <= len(password) <= high:
        raise ValidationError({"password": [f"The oTree admin password must have {low} to {high} characters "
                                            f"(this one has {len(password)})."]})
    return password


def set_admin_password(actor, instance: Instance, password: str | None = None, request=None,
                       force: bool = False) -> str:
    if password is None or password == "":
        password = generate_secret(12)
    else:
        check_admin_password(password)
    forced = sessions.require_idle(instance, "setting the admin password (the app restarts)", force)
    with _restart_budget(actor, instance), transaction.atomic():
        instance.admin_password = password
        instance.generation += 1
        instance.save(update_fields=["admin_password", "generation", "updated_at"])
        record(actor, "instance.admin_password", instance, f"set the oTree admin password of {instance.name}{forced}",
               request)
        _reconcile_job(actor, instance, f"Apply new admin password to {instance.name}", "apply")
    return password


def restart(actor, instance: Instance, request=None, force: bool = False):
    forced = sessions.require_idle(instance, "restarting", force)
    with throttle.take("restart", actor, instance), transaction.atomic():
        Instance.objects.filter(pk=instance.pk).update(restart_generation=F("restart_generation") + 1,
                                                       desired_running=True)
        instance.refresh_from_db()
        record(actor, "instance.restart", instance, f"restarted {instance.name}{forced}", request)
        return _reconcile_job(actor, instance, f"Restart {instance.name}", "restart")


def reset_database(actor, instance: Instance, request=None, force: bool = False):
    if instance.delete_requested:
        raise NotAllowed(f"{instance.name} is being deleted.")
    forced = sessions.require_idle(instance, "resetting the database (its data are backed up, then emptied)", force)
    with throttle.take("reset", actor, instance), transaction.atomic():
        record(actor, "instance.reset_database", instance, f"reset the database of {instance.name}{forced}", request)
        return _reconcile_job(actor, instance, f"Back up and reset the database of {instance.name}", "reset")


def wake_now(actor, instance: Instance, request=None):
    """*Wake now* (owner, lab managers): a job wakes the sleeping instance (instances.sleep;
    seconds). NotAllowed when it is not asleep."""
    if not Instance.objects.filter(pk=instance.pk, asleep=True).exists():
        raise NotAllowed(f"{instance.name} is not asleep.")
    return _reconcile_job(actor, instance, f"Wake {instance.name}", "wake")


def backup_now(actor, instance: Instance, request=None):
    with throttle.take("backup", actor, instance), transaction.atomic():
        record(actor, "instance.backup", instance, f"backed up {instance.name}", request)
        return _reconcile_job(actor, instance, f"Back up {instance.name}", "backup")


# --- restoring and uploading backups --------------------------------------------------------

def restore_backup(actor, instance: Instance, backup, request=None, force: bool = False):
    """Restore `backup` into `instance` (its owner, lab managers; a backup the actor may see:
    selectors.get_visible_backup). Checked before anything is queued: the kind of backup, its
    file, that it fits the instance's database (a ValidationError says why); the job checks
    its content in the instance's sandbox, takes a fresh backup, restores, restarts the app.
    Counts against the reset budget. A live oTree session refuses it (sessions.SessionLive,
    409) unless `force`."""
    from instances.backups import restore_problem
    from instances.runtime import RuntimeError_, get_runtime
    from instances.selectors import can_see

    from instances.selectors import visible_backups

    if not can_see(actor, instance) or not visible_backups(actor).filter(pk=backup.pk).exists():
        raise NotAllowed("You may not restore this backup into this instance.")
    if instance.delete_requested:
        raise NotAllowed(f"{instance.name} is being deleted.")
    try:
        suffix = get_runtime(instance).backup_suffix(instance.name) if instance.runtime else None
    except RuntimeError_:
        suffix = None  # the job checks again once the runtime answers
    problem = restore_problem(backup, suffix)
    if problem:
        raise ValidationError({"backup": [problem]})
    forced = sessions.require_idle(instance, "restoring a backup (its data are backed up, then replaced)", force)
    with throttle.take("reset", actor, instance), transaction.atomic():
        record(actor, "instance.restore", instance, f"restore {backup.filename} into {instance.name}{forced}",
               request, backup=backup.filename, force=bool(force))
        return jobs.start(jobs.task("instances.restore"), user=actor, kind="instance.restore",
                          label=f"Restore {backup.filename} into {instance.name}", args=[instance.pk, backup.pk],
                          link=f"/instances/{instance.name}/")


def restore_into_new(actor, backup, *, name: str, owner, request=None):
    """A new instance `name` for `owner`, made with the data of `backup`, in one job (lab
    managers): its database is created, then the backup restored into it. Returns (instance, job)."""
    from instances.backups import restore_problem

    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may restore a backup into a new instance.")
    problem = restore_problem(backup, None)
    if problem:
        raise ValidationError({"backup": [problem]})
    holder = {}

    def made(instance):
        holder["job"] = jobs.start(jobs.task("instances.restore"), user=actor, kind="instance.restore",
                                   label=f"Create {instance.name} with the data of {backup.filename}",
                                   args=[instance.pk, backup.pk, True], link=f"/instances/{instance.name}/")
        record(actor, "instance.restore", instance, f"restore {backup.filename} into the new {instance.name}",
               request, backup=backup.filename)

    instance = create_instance(actor, name=name, owner=owner, request=request, then=made)
    return instance, holder["job"]


def upload_backup(actor, instance: Instance, upload, request=None):
    """Keep an uploaded backup file (`upload`: instances.uploads.LimitedFile, on disk) among
    the instance's backups (kind `upload`) under a generated name, 0600, once its first
    bytes say it is a backup this instance can restore: a `pg_dump -Fc` archive (PGDMP) for
    PostgreSQL, an SQLite database for SQLite. The file's content is checked in the
    instance's sandbox when it is restored. Anything else: ValidationError, nothing kept."""
    import os

    from instances.backups import DATABASE_LABEL, SUFFIX_LABEL, backup_dir, file_format, upload_name
    from instances.models import Backup
    from instances.runtime import RuntimeError_, get_runtime
    from instances.selectors import can_see

    try:
        if not can_see(actor, instance):
            raise NotAllowed("You may not upload backups to this instance.")
        if upload is None or not getattr(upload, "path", None):
            raise ValidationError({"file": ["Choose a backup file to upload."]})
        found = file_format(upload.path)
        if not found:
            raise ValidationError({"file": ["This is neither a PostgreSQL dump made with pg_dump -Fc (it starts with "
                                            "PGDMP) nor an SQLite database file; nothing was stored."]})
        try:
            suffix = get_runtime(instance).backup_suffix(instance.name) if instance.runtime else ".dump"
        except RuntimeError_:
            suffix = ".dump"
        if found != suffix:
            raise ValidationError({"file": [f"This is {SUFFIX_LABEL[found]}, but {instance.name} has "
                                            f"{DATABASE_LABEL[suffix]}: upload {SUFFIX_LABEL[suffix]}; nothing was stored."]})
        with throttle.take("backup", actor, instance):
            filename = upload_name(instance.name, suffix)
            dest = backup_dir() / filename
            os.chmod(upload.path, 0o600)
            os.replace(upload.path, dest)  # the same folder: a rename
            size = dest.stat().st_size
            with transaction.atomic():
                row = Backup.objects.create(instance=instance, instance_name=instance.name, owner=instance.owner,
                                            kind=Backup.Kind.UPLOAD, status=Backup.Status.DONE, filename=filename,
                                            size=size, created_by=actor if actor.is_authenticated else None)
                record(actor, "instance.backup_upload", instance,
                       f"uploaded a backup of {size} bytes to {instance.name} as {filename}", request,
                       filename=filename, size=size)
            return row
    finally:
        if upload is not None and hasattr(upload, "discard"):
            upload.discard()


def transfer(actor, instance: Instance, new_owner, request=None) -> Instance:
    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may transfer instances.")
    new_owner = _user(new_owner)
    if not new_owner.is_active:
        raise ValidationError({"owner": [f"{new_owner.username} is deactivated."]})
    if new_owner.pk == instance.owner_id:
        return instance
    with transaction.atomic():
        old = instance.owner.username
        instance.owner = new_owner
        instance.save(update_fields=["owner", "updated_at"])
        record(actor, "instance.transfer", instance, f"moved {instance.name} from {old} to {new_owner.username}",
               request, old_owner=old, new_owner=new_owner.username)
    return instance


def delete_instance(actor, instance: Instance, request=None, force: bool = False):
    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may delete instances.")
    forced = sessions.require_idle(instance, "deleting the instance (it ends the data collection)", force)
    with transaction.atomic():
        state.set_status(instance, Instance.Status.DELETING, "final backup, then removal", notify=False,
                         delete_requested=True, generation=F("generation") + 1)
        record(actor, "instance.delete", instance, f"deleted instance {instance.name} (a final backup is kept){forced}",
               request)
        job = _reconcile_job(actor, instance, f"Delete {instance.name}", "delete")
    state.push_state(instance)
    return job


# --- swarm nodes: moving instances, draining nodes (lab managers) ---------------------------

NODE_ID_MAX = 64  # characters of a node id as given (swarm ids have 25)
AVAILABILITY_WORDS = {"pause": "paused (no new instances: it is being drained, or paused by hand)",
                      "drain": "drained (for maintenance)"}
NODES_TIMEOUT = 10  # seconds one engine call of these services may take


def _swarm():
    """This lab's swarm runtime, or None when the engine here is no swarm manager."""
    from instances.runtime import backend_class

    cls = backend_class("swarm")
    if cls is None:
        return None
    runtime = cls(timeout=NODES_TIMEOUT)
    return runtime if runtime.available() else None


def _swarm_nodes(runtime) -> list[dict]:
    from instances.runtime import RuntimeError_

    try:
        return runtime.nodes()
    except RuntimeError_ as exc:
        raise Conflict(f"The swarm did not list its nodes ({exc}); nothing was changed.") from None


def list_nodes(actor) -> list[dict]:
    """The swarm's nodes (SwarmRuntime.nodes()), [] when this lab has no swarm."""
    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may list the swarm's nodes.")
    runtime = _swarm()
    return _swarm_nodes(runtime) if runtime is not None else []


def _node(actor, node_id: str, what: str) -> tuple[object, dict]:
    """(the swarm runtime, node `node_id`) for a lab manager; Http404 when there is none."""
    from django.http import Http404

    if not actor.is_superuser:
        raise NotAllowed(f"Only lab managers may {what}.")
    if not isinstance(node_id, str) or texts.problem(node_id, max_length=NODE_ID_MAX, single_line=True):
        raise Http404("There is no such node in the swarm.")
    runtime = _swarm()
    if runtime is None:
        raise Http404(f"There is no node {node_id!r}: this lab has no swarm (the Docker engine here is no swarm "
                      "manager).")
    node = next((n for n in _swarm_nodes(runtime) if n["id"] == node_id), None)
    if node is None:
        raise Http404(f"There is no node {node_id!r} in the swarm (the dashboard's Nodes table and "
                      "GET /api/v1/nodes list them).")
    return runtime, node


def move_instance(actor, instance: Instance, node_id, request=None):
    """Move a swarm instance to another node (lab managers): a job backs its database up,
    restores it on node `node_id` and starts the app there (instances.reconciler.move);
    the instance is down meanwhile. Refused, with why: another runtime than swarm, a node
    that does not exist (422), is not ready or not active, or is its own node (409)."""
    from instances.runtime import RuntimeError_

    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may move instances.")
    if instance.delete_requested:
        raise Conflict(f"{instance.name} is being deleted.")
    if instance.runtime != "swarm":
        runtime_name = instance.runtime or "no"
        raise Conflict(f"{instance.name} runs on the {runtime_name} runtime: only instances of the swarm runtime "
                       "live on nodes and can move between them.")
    if not isinstance(node_id, str):
        raise ValidationError({"node": ["The node must be a node's id (text)."]})
    node_id = texts.check_text(node_id, field="node", max_length=NODE_ID_MAX, label="The node",
                               single_line=True).strip()
    if not node_id:
        raise ValidationError({"node": ["Choose the node to move it to."]})
    runtime = _swarm()
    if runtime is None:
        raise Conflict("The swarm does not answer (the Docker engine here is unreachable or no swarm manager); "
                       "nothing was moved.")
    nodes = {n["id"]: n for n in _swarm_nodes(runtime)}
    node = nodes.get(node_id)
    if node is None:
        raise ValidationError({"node": [f"There is no node {node_id!r} in the swarm (the dashboard's Nodes table "
                                        "and GET /api/v1/nodes list them)."]})
    hostname = node["hostname"] or node_id[:12]
    if node["state"] != "ready":
        raise Conflict({"node": [f"Node {hostname} is {node['state']}"
                                 f"{' (' + node['message'] + ')' if node['message'] else ''}: an instance can only "
                                 "move to a ready node."]})
    if node["availability"] != "active":
        availability = AVAILABILITY_WORDS.get(node["availability"], node["availability"])
        raise Conflict({"node": [f"Node {hostname} is {availability}: no instance may move there until it is "
                                 "activated again (dashboard, Nodes)."]})
    try:
        current = runtime.node_of(instance.name)
    except RuntimeError_ as exc:
        raise Conflict(f"The swarm did not say where {instance.name} runs ({exc}); nothing was moved.") from None
    if not current:
        raise Conflict(f"{instance.name} has no database on any node yet (it is being set up): nothing to move.")
    if current == node_id:
        raise Conflict({"node": [f"{instance.name} runs on node {hostname} already: choose another node."]})
    source = nodes.get(current, {}).get("hostname") or current[:12]
    with transaction.atomic():
        record(actor, "instance.move", instance, f"moved {instance.name} from node {source} to node {hostname}",
               request, source=current, target=node_id)
        return jobs.start(jobs.task("instances.move_instance"), user=actor, kind="instance.move",
                          label=f"Move {instance.name} to node {hostname}", args=[instance.pk, node_id],
                          link=f"/instances/{instance.name}/")


def drain_node(actor, node_id, request=None):
    """Drain a swarm node for maintenance (lab managers): it is paused at once (no new
    instance goes there; those on it keep running), then a job moves its instances to
    other nodes one after another (instances.reconciler.drain) and drains it once none is
    left. Returns the job."""
    from instances.runtime import RuntimeError_

    runtime, node = _node(actor, node_id, "drain nodes")
    hostname = node["hostname"] or node_id[:12]
    try:
        if node["availability"] == "active":
            runtime.set_node_availability(node_id, "pause")
    except RuntimeError_ as exc:
        raise Conflict(f"The swarm did not pause node {hostname} ({exc}); nothing was changed.") from None
    with transaction.atomic():
        record(actor, "node.drain", None, f"drained node {hostname} (its instances move to other nodes)", request,
               node=node_id, hostname=hostname)
        return jobs.start(jobs.task("instances.drain_node"), user=actor, kind="node.drain",
                          label=f"Drain node {hostname}", args=[node_id], link="/#nodes")


def activate_node(actor, node_id, request=None) -> dict:
    """Make a paused or drained node active again (lab managers): new instances may be
    placed there. Returns the node as nodes() lists it."""
    from instances.runtime import RuntimeError_

    runtime, node = _node(actor, node_id, "activate nodes")
    hostname = node["hostname"] or node_id[:12]
    if node["availability"] != "active":
        try:
            runtime.set_node_availability(node_id, "active")
        except RuntimeError_ as exc:
            raise Conflict(f"The swarm did not activate node {hostname} ({exc}).") from None
        record(actor, "node.activate", None, f"activated node {hostname} (instances may be placed there again)",
               request, node=node_id, hostname=hostname)
    return next((n for n in _swarm_nodes(runtime) if n["id"] == node_id), {**node, "availability": "active"})
