"""What the manager (root) may do with a tenant's files, sockets and processes, and how.

The process runtime's rule: root never follows a link in a tenant's tree and never trusts
a file a tenant can write. Where root must touch such a tree itself (sealing a finished
environment, moving an old instance's data to a new user, probing a socket) it goes by
file descriptors: every step is opened with O_NOFOLLOW relative to the folder before it,
what it finds is checked with fstat (owner, kind, link count) on the very file it opened,
and only entries the expected user owns are changed. Everything else runs as the tenant
(procsup.py's `exec`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import uuid
from pathlib import Path

from .base import RuntimeError_


def processes_of(uid: int) -> list[int]:
    """Pids whose real, effective, saved or filesystem uid is `uid` (from /proc); zombies
    (ended, waiting for their parent to collect them: they hold nothing) are not counted."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as fh:
                zombie = False
                for line in fh:
                    if line.startswith(b"State:"):
                        zombie = line.split()[1:2] == [b"Z"]
                    elif line.startswith(b"Uid:"):
                        if not zombie and uid in (int(x) for x in line.split()[1:5]):
                            found.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return found


def listeners(port: int) -> set[int]:
    """Uids of the sockets listening on TCP `port` (any address, IPv4 and IPv6)."""
    owners = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 7 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        owners.add(int(fields[7]))
        except (OSError, ValueError):
            continue
    return owners


def own_folder(path: Path, mode: int, group: int | None = None) -> None:
    """`path` as a folder of the manager's (not a link), with `mode` (and `group`)."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise RuntimeError_(f"{path} is not a folder of the manager's")
    if group is not None and info.st_gid != group:
        os.chown(path, -1, group, follow_symlinks=False)
    os.chmod(path, mode)


def read_own_json(path: Path, uid: int):
    """A JSON file only `uid` can have written (its own, not a link, not writable by others)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if info.st_uid != uid or info.st_mode & 0o022 or not stat.S_ISREG(info.st_mode):
            return None
        try:
            return json.loads(fh.read(4 * 2**20))
        except ValueError:
            return None


def write_own_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_small(path: Path, limit: int = 4096) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(f"{path} is not a file")
        return fh.read(limit).decode(errors="replace")


def lexists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def exists_in(top: Path, *parts: str) -> bool:
    """Whether top/parts... exists, each step taken without following a link (a tenant's
    tree: a planted link answers False)."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        return not stat.S_ISLNK(info.st_mode)
    except OSError:
        return False
    finally:
        os.close(fd)


class tenant_socket:
    """A connection to the unix socket top/folder/name whose server runs as `uid`: the
    folder is opened without following links, the socket must not be a link, and the
    peer's uid (SO_PEERCRED) is checked before the caller sends anything."""

    def __init__(self, top: Path, folder: str, name: str, uid: int, timeout: float = 1):
        self.args = (top, folder, name, uid, timeout)

    def __enter__(self) -> socket.socket:
        top, folder, name, uid, timeout = self.args
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            sub = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        self.fd = sub
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if not stat.S_ISSOCK(os.stat(name, dir_fd=sub, follow_symlinks=False).st_mode):
                raise OSError(f"{name} is not a socket")
            self.sock.settimeout(timeout)
            self.sock.connect(f"/proc/self/fd/{sub}/{name}")
            _pid, peer_uid, _gid = struct.unpack("3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                            struct.calcsize("3i")))
            if peer_uid != uid:
                raise OSError(f"{name} is served by uid {peer_uid}, not {uid}")
        except BaseException:
            self.sock.close()
            os.close(sub)
            raise
        return self.sock

    def __exit__(self, *exc):
        self.sock.close()
        os.close(self.fd)


def seal_tree(top: Path, *, owners: set[int], uid: int, gid: int, private: bool) -> None:
    """Make `top` the manager's and read-only to everyone else, walking by file
    descriptors (no link is followed): entries not owned by one of `owners`, regular files
    with other hard links and special files are removed; the rest gets owner `uid`:`gid`,
    no write bits for group and others, no set-id bits; `private`: nothing for others."""
    dir_mode, file_mode = (0o750, 0o640) if private else (0o755, 0o644)
    top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        info = os.fstat(top_fd)
        if info.st_uid not in owners:
            raise RuntimeError_(f"{top} does not belong to its builder")
        _seal_dir(top_fd, owners, uid, gid, dir_mode, file_mode, depth=0)
        os.fchown(top_fd, uid, gid)
        os.fchmod(top_fd, dir_mode)
    finally:
        os.close(top_fd)


def _seal_dir(dir_fd: int, owners, uid, gid, dir_mode, file_mode, depth: int) -> None:
    if depth > 200:
        raise RuntimeError_("the environment is nested too deeply")
    for name in os.listdir(dir_fd):
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        kind = stat.S_IFMT(info.st_mode)
        if info.st_uid not in owners:
            _remove_at(dir_fd, name, kind)
        elif kind == stat.S_IFLNK:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        elif kind == stat.S_IFDIR:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                if (os.fstat(sub).st_ino, os.fstat(sub).st_dev) != (info.st_ino, info.st_dev):
                    raise RuntimeError_("the environment changed while it was sealed")
                _seal_dir(sub, owners, uid, gid, dir_mode, file_mode, depth + 1)
                os.fchown(sub, uid, gid)
                os.fchmod(sub, dir_mode)
            finally:
                os.close(sub)
        elif kind == stat.S_IFREG and info.st_nlink == 1:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
            try:
                now = os.fstat(fd)
                if (now.st_ino, now.st_dev) != (info.st_ino, info.st_dev):
                    raise RuntimeError_("the environment changed while it was sealed")
                os.fchown(fd, uid, gid)
                os.fchmod(fd, dir_mode if info.st_mode & 0o111 else file_mode)  # (dir_mode: the same with x bits)
            finally:
                os.close(fd)
        else:  # hard-linked files, fifos, sockets, devices: nothing an environment needs
            _remove_at(dir_fd, name, kind)


def _remove_at(dir_fd: int, name: str, kind: int) -> None:
    if kind == stat.S_IFDIR:
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def chown_tree(top: Path, uid: int, gid: int) -> None:
    """A tree the manager just made (nothing else writes in it yet) given to `uid`."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        chown_tree_at(fd, from_uid=os.geteuid(), uid=uid, gid=gid)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def chown_tree_at(dir_fd: int, *, from_uid: int, uid: int, gid: int, depth: int = 0) -> None:
    """Entries under `dir_fd` owned by `from_uid` given to `uid`:`gid`, walking by file
    descriptors (no link followed; what belongs to anyone else, e.g. a hard link to a
    foreign file, is left as it is)."""
    if depth > 200:
        return
    for name in os.listdir(dir_fd):
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                chown_tree_at(sub, from_uid=from_uid, uid=uid, gid=gid, depth=depth + 1)
                if os.fstat(sub).st_uid == from_uid:
                    os.fchown(sub, uid, gid)
            finally:
                os.close(sub)
        elif info.st_uid == from_uid and (stat.S_ISLNK(info.st_mode) or info.st_nlink == 1
                                          or not stat.S_ISREG(info.st_mode)):
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def copy_owned(src_fd: int, dest: Path, owner: int, depth: int = 0) -> None:
    """Copy the folder `src_fd` (a tenant's) into `dest` (the manager's): folders, links
    as links, and regular files `owner` owns with no other hard link; nothing else."""
    if depth > 100:
        return
    for name in os.listdir(src_fd):
        if name in ("__pycache__",):
            continue
        try:
            info = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if info.st_uid != owner:
            continue
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), dest / name)
        elif stat.S_ISDIR(info.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src_fd)
            try:
                os.mkdir(dest / name, 0o700)
                copy_owned(sub, dest / name, owner, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=src_fd)
            with os.fdopen(fd, "rb") as fh:
                now = os.fstat(fh.fileno())
                if (now.st_ino, now.st_uid, now.st_nlink) != (info.st_ino, owner, 1):
                    continue
                out_fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(out_fd, "wb") as out:
                    shutil.copyfileobj(fh, out)
                os.chmod(dest / name, 0o700 if info.st_mode & 0o100 else 0o600)
