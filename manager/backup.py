"""A backup of the manager itself: its database and its data dir, in one .tar.gz
(`manage.py backup_manager` / `manage.py restore_manager`).

The archive holds, in this order (so that it can be read as a stream, from stdin):
- `manifest.json`: format, date, database engine, manager id, data dir;
- `database.pgdump` (PostgreSQL: `pg_dump --format=custom`) or `database.sqlite3` (SQLite:
  a consistent copy made with SQLite's backup API while the manager may be running);
- `data/...`: the data dir — git repositories, instance backups, secrets keys, Caddy's
  certificates and CA, the manager id of the compose install, logs. Not in it: the SQLite
  database files (they are `database.sqlite3`), sockets and `run/`, `static/` (collected
  again at start), `venvs/` (the process runtime's environments, rebuilt when missing),
  and the backup being written itself.

PostgreSQL credentials go to pg_dump/pg_restore in their environment (PGPASSWORD), never
on a command line.
"""

from __future__ import annotations

import datetime as dt
import glob
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

FORMAT = 1
SKIP_TOP = {"run", "static", "venvs"}  # regenerated, or sockets only
PG_TIMEOUT = 3600


class BackupError(Exception):
    """The backup or restore cannot go on; the message says why and what to do."""


# --- the database ---------------------------------------------------------------------------------

def _db():
    from django.db import connections

    return connections["default"]


def engine() -> str:
    vendor = _db().vendor
    if vendor not in ("postgresql", "sqlite"):
        raise BackupError(f"the manager's database is {vendor}: only PostgreSQL and SQLite can be backed up")
    return vendor


def _sqlite_files() -> set[str]:
    from django.conf import settings

    name = str(settings.DATABASES["default"]["NAME"])
    test_name = str(settings.DATABASES["default"].get("TEST", {}).get("NAME") or "")
    return {p for base in (name, test_name) if base for p in (base, base + "-wal", base + "-shm", base + "-journal")}


def pg_program(name: str) -> str:
    """pg_dump/pg_restore: on PATH, in LAB_PG_BIN, or the newest /usr/lib/postgresql/<N>/bin."""
    found = shutil.which(name)
    if found:
        return found
    from django.conf import settings

    folders = [settings.LAB_PG_BIN]
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if
                      p.split("/")[-2].isdigit() else 0, reverse=True)
    for folder in folders:
        if folder and os.access(os.path.join(folder, name), os.X_OK):
            return os.path.join(folder, name)
    raise BackupError(f"{name} is missing: install PostgreSQL's client programs (apt install postgresql-client, "
                      "the same major version as the server)")


def _pg_env() -> dict[str, str]:
    settings = _db().settings_dict
    env = dict(os.environ)
    for key, value in (("PGHOST", settings.get("HOST")), ("PGPORT", settings.get("PORT")),
                       ("PGUSER", settings.get("USER")), ("PGPASSWORD", settings.get("PASSWORD")),
                       ("PGDATABASE", settings.get("NAME"))):
        if value:
            env[key] = str(value)
        else:
            env.pop(key, None)
    for key, value in (settings.get("OPTIONS") or {}).items():
        if key == "sslmode":
            env["PGSSLMODE"] = str(value)
    return env


def _run_pg(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, env=_pg_env(), capture_output=True, text=True, timeout=PG_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what} took longer than {PG_TIMEOUT} s") from None
    if done.returncode != 0:
        raise BackupError(f"{what} failed ({Path(argv[0]).name} exited with {done.returncode}): "
                          f"{done.stderr.strip()[-2000:]}")


def dump_database(folder: Path) -> Path:
    """The database into a file in `folder`."""
    if engine() == "postgresql":
        out = folder / "database.pgdump"
        _run_pg([pg_program("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", "--file", str(out)],
                "dumping the manager's PostgreSQL database")
        return out
    out = folder / "database.sqlite3"
    conn = _db()
    conn.ensure_connection()
    target = sqlite3.connect(out)
    try:
        conn.connection.backup(target)
    finally:
        target.close()
    return out


def table_names() -> list[str]:
    with _db().cursor() as cursor:
        return _db().introspection.table_names(cursor)


def users_in_database() -> int:
    """How many accounts the database holds (0 when it has no tables yet)."""
    from django.contrib.auth import get_user_model

    table = get_user_model()._meta.db_table
    if table not in table_names():
        return 0
    with _db().cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {_db().ops.quote_name(table)}")
        return cursor.fetchone()[0]


def _empty_postgresql() -> None:
    names = table_names()
    if names:
        quoted = ", ".join(_db().ops.quote_name(n) for n in names)
        with _db().cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {quoted} CASCADE")


def restore_database(path: Path, kind: str) -> None:
    current = engine()
    if kind != current:
        raise BackupError(f"the backup holds a {kind} database, but this manager's database is {current}: "
                          "restore it into a manager configured like the one it came from (DATABASE_URL)")
    if current == "postgresql":
        _empty_postgresql()
        _db().close()
        _run_pg([pg_program("pg_restore"), "--no-owner", "--no-privileges", "--single-transaction",
                 "--exit-on-error", "--dbname", _db().settings_dict["NAME"], str(path)],
                "restoring the manager's PostgreSQL database")
        return
    name = Path(_db().settings_dict["NAME"])
    _db().close()
    fd, tmp = tempfile.mkstemp(prefix=".restore-", dir=name.parent)
    os.close(fd)
    source = sqlite3.connect(path)
    try:
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    for suffix in ("-wal", "-shm", "-journal"):
        Path(str(name) + suffix).unlink(missing_ok=True)
    os.replace(tmp, name)


# --- the archive ----------------------------------------------------------------------------------

def _skipped(path: Path, rel: str, excluded: set[str]) -> bool:
    return rel.split("/", 1)[0] in SKIP_TOP or str(path) in excluded


def write_backup(fileobj, *, outputs: tuple[Path, ...] = ()) -> dict:
    """Write the archive to `fileobj` (a stream); `outputs` (the file being written, and
    the name it gets) are never put into it. Returns the manifest."""
    from django.conf import settings

    data_dir = Path(settings.DATA_DIR)
    kind = engine()
    manifest = {"format": FORMAT, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "database": kind, "manager_id": settings.LAB_MANAGER_ID,
                "data_dir": str(data_dir)}
    excluded = _sqlite_files() if kind == "sqlite" else set()
    with tempfile.TemporaryDirectory(prefix="lab-backup-") as tmp:
        dump = dump_database(Path(tmp))
        with tarfile.open(fileobj=fileobj, mode="w|gz") as tar:
            body = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size, info.mtime, info.mode = len(body), int(dt.datetime.now().timestamp()), 0o600
            tar.addfile(info, io.BytesIO(body))
            tar.add(dump, arcname=dump.name, recursive=False)
            tar.add(data_dir, arcname="data", recursive=False)
            for root, dirs, files in os.walk(data_dir):
                root_path = Path(root)
                keep = []
                for name in sorted(dirs):
                    path = root_path / name
                    rel = path.relative_to(data_dir).as_posix()
                    if _skipped(path, rel, excluded) or path.is_symlink():
                        continue
                    tar.add(path, arcname=f"data/{rel}", recursive=False)
                    keep.append(name)
                dirs[:] = keep
                for name in sorted(files):
                    path = root_path / name
                    rel = path.relative_to(data_dir).as_posix()
                    if _skipped(path, rel, excluded):
                        continue
                    try:
                        st = path.lstat()
                    except FileNotFoundError:
                        continue  # removed meanwhile (a temporary file)
                    if not stat.S_ISREG(st.st_mode):
                        continue  # sockets, links, fifos
                    if any(path == out or (out.exists() and os.path.samestat(st, out.stat())) for out in outputs):
                        continue
                    try:
                        tar.add(path, arcname=f"data/{rel}", recursive=False)
                    except FileNotFoundError:
                        continue
    return manifest


def _safe_rel(name: str) -> str:
    parts = Path(name).parts
    if not name.startswith("data") or Path(name).is_absolute() or ".." in parts:
        raise BackupError(f"the backup holds an unexpected entry {name!r}: not a manager backup, or damaged")
    return "/".join(parts[1:])


def clear_data_dir(keep: set[str]) -> None:
    """Everything in the data dir except what must stay (sockets of running programs are
    under run/; the SQLite database is replaced on its own)."""
    from django.conf import settings

    data_dir = Path(settings.DATA_DIR)
    for entry in data_dir.iterdir():
        if entry.name in SKIP_TOP or str(entry) in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def read_backup(fileobj, *, force: bool) -> dict:
    """Restore from the archive stream: refuses a non-empty database unless `force`."""
    from django.conf import settings

    data_dir = Path(settings.DATA_DIR)
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"not a manager backup (.tar.gz): {exc}") from None
    with tar, tempfile.TemporaryDirectory(prefix="lab-restore-") as tmp:
        try:
            members = iter(tar)
            first = next(members, None)
            if first is None or first.name != "manifest.json" or not first.isfile():
                raise BackupError("not a manager backup: it does not start with manifest.json")
            manifest = json.loads(tar.extractfile(first).read())
            if manifest.get("format") != FORMAT:
                raise BackupError(f"backup format {manifest.get('format')!r} is not one this version reads ({FORMAT})")
            kind = manifest.get("database")
            users = users_in_database()
            if users and not force:
                raise BackupError(
                    f"the manager's database is not empty ({users} accounts): restoring replaces it and the data dir. "
                    "Stop the manager's services first, then run again with --force")
            dump = next(members, None)
            expected = {"postgresql": "database.pgdump", "sqlite": "database.sqlite3"}.get(kind)
            if dump is None or dump.name != expected or not dump.isfile():
                raise BackupError(f"the backup has no {expected or 'database'}: damaged or incomplete")
            dump_path = Path(tmp) / dump.name
            with tar.extractfile(dump) as src, open(dump_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            restore_database(dump_path, kind)
            clear_data_dir(keep=_sqlite_files() if kind == "sqlite" else set())
            for member in members:
                rel = _safe_rel(member.name)
                if not rel:
                    continue
                target = data_dir / rel
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    os.chmod(target, member.mode & 0o7777)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.chmod(target, member.mode & 0o7777)
                    os.utime(target, (member.mtime, member.mtime))
                # anything else (links, devices) is never written by backup_manager: ignored
        except (tarfile.TarError, EOFError, json.JSONDecodeError) as exc:
            raise BackupError(f"the backup is damaged: {exc}") from None
    return manifest
