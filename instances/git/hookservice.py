"""The hook service: runs the repositories' pre-receive and post-receive hooks inside the
git service's process (`manage.py git_sshd`), where Django is already loaded, so a push
does not wait for two Django start-ups. `hook_client.py` (the hook program git runs)
connects to its unix socket, `LAB_DATA_DIR/run/git-hooks.sock` (owner only).

Who may ask: only a process of the manager's own user (the kernel's SO_PEERCRED of the
connection, checked before anything is read), and the request names the pusher only by
the push's one-time token (repos.claim_push): connecting to the socket claims no account.

Each hook runs in a thread of its own (`hooks.run`, the same code the fallback
`manage.py git_hook` runs); what it prints goes back to the client line by line.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.db import close_old_connections, connections

from instances.git import hooks
from instances.git.repos import git_root, hook_socket_path

logger = logging.getLogger(__name__)
MAX_REQUEST = 4 * 1024 * 1024  # the ref updates of one push
MAX_HOOKS = 64  # hooks at once (a post-receive follows its build for minutes)
WRITE_TIMEOUT = 60


class SocketOut(io.TextIOBase):
    """A text stream for a hook thread whose writes go to the client; a client that went
    away (the pusher pressed Ctrl-C) raises BrokenPipeError in the hook."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter):
        self.loop = loop
        self.writer = writer

    def write(self, text: str) -> int:
        if text:
            future = asyncio.run_coroutine_threadsafe(send(self.writer, {"out": text}), self.loop)
            try:
                future.result(timeout=WRITE_TIMEOUT)
            except (ConnectionError, TimeoutError) as exc:
                raise BrokenPipeError(str(exc)) from None
        return len(text)


async def send(writer: asyncio.StreamWriter, message: dict) -> None:
    if writer.is_closing():
        raise ConnectionResetError("the hook's client is gone")
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


def run_hook(request: dict, out: SocketOut) -> int:
    """One hook, in a worker thread, with its own database connection."""
    close_old_connections()
    try:
        hook = request.get("hook")
        git_dir = Path(str(request.get("git_dir", ""))).resolve()
        if hook not in hooks.HOOKS or git_dir.parent != git_root().resolve():
            hooks.say(f"error: not a hook of an instance repository ({hook}, {git_dir.name})", out)
            return 2
        stdin = io.StringIO(str(request.get("stdin", "")))
        return hooks.run(hook, git_dir, stdin=stdin, out=out, token=str(request.get("token", "")),
                         quarantine=str(request.get("quarantine", "")))
    except BrokenPipeError:
        return 1
    except Exception:  # the pusher sees a short line; the details go to the log
        logger.exception("git hook %s failed", request.get("hook"))
        try:
            hooks.say("error: the manager could not run this hook (see its log); push again.", out)
        except BrokenPipeError:
            pass
        return 1
    finally:
        connections.close_all()


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The user id of the process at the other end of a unix socket (from the kernel)."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def start(path: Path | None = None) -> asyncio.AbstractServer:
    """Listen on the hook socket (replacing a stale one of a killed process)."""
    path = path or hook_socket_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    pool = ThreadPoolExecutor(MAX_HOOKS, thread_name_prefix="git-hook")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        code = 1
        try:
            uid = peer_uid(writer)
            if uid != os.geteuid():
                logger.warning("git hook request from uid %s refused (only the manager's own user, %s, may ask)",
                               uid, os.geteuid())
                await send(writer, {"out": "error: this socket serves the manager's own git processes only\n"})
                await send(writer, {"exit": 1})
                # Take (and drop) the request, so that closing does not reset the connection
                # before the client has read the answer.
                await asyncio.wait_for(reader.readline(), timeout=5)
                return
            line = await asyncio.wait_for(reader.readline(), timeout=30)
            request = json.loads(line)
            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(pool, run_hook, request, SocketOut(loop, writer))
            await send(writer, {"exit": code})
        except (ValueError, asyncio.TimeoutError, ConnectionError) as exc:
            logger.warning("git hook request dropped: %s", exc)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path), limit=MAX_REQUEST)
    os.chmod(path, 0o600)
    return server
