"""Git over SSH: the manager's own SSH server (asyncssh), `ssh://git@HOST:LAB_SSH_PORT/<name>.git`.

Public-key authentication against the users' SSH keys (by fingerprint; active users only);
the user name is `git`. The only commands are `git-receive-pack '<name>.git'` and
`git-upload-pack '<name>.git'` for an instance the key's owner may see. No passwords, no
shell, no forwarding, no SFTP: everything else gets a message on stderr and exit status 1.

A push streams from the client into `git receive-pack` (SSH flow control: nothing is held
here) and is cut off once it passes LAB_PUSH_MAX_MB (git's own receive.maxInputSize
usually stops it first; this is the bound that does not depend on git). Its hooks learn
who pushes from a one-time push token registered for this git process (repos.register_push).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
from pathlib import Path

import asyncssh
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from instances.git.archive import ensure_repo
from instances.git.repos import (git_env, push_limit_bytes, refusal, register_push, repo_path,
                                 revoke_push, too_large_message)
from instances.models import Instance
from manager.accounts.models import SSHKey

logger = logging.getLogger(__name__)
SSH_USER = "git"
COMMANDS = {"git-receive-pack", "git-upload-pack"}
PATH_RE = re.compile(r"^/?(?P<name>[a-z][a-z0-9-]*[a-z0-9])(\.git)?/?$")
CHUNK = 64 * 1024
INPUT_SLACK = 1024 * 1024  # protocol lines around the pack


def host_key_path() -> Path:
    return Path(settings.DATA_DIR) / "secrets" / "ssh_host_ed25519_key"


def host_key() -> asyncssh.SSHKey:
    """The server's host key, generated once (clients remember it)."""
    path = host_key_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.export_private_key())
        try:
            os.link(tmp, path)  # never replaces a key another process wrote meanwhile
        except FileExistsError:
            pass
        os.unlink(tmp)
    return asyncssh.read_private_key(str(path))


def _user_of_key(fingerprint: str):
    close_old_connections()
    key = SSHKey.objects.select_related("user").filter(fingerprint=fingerprint, user__is_active=True).first()
    if key is None:
        return None
    SSHKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now())
    return key.user


class GitSSHServer(asyncssh.SSHServer):
    def __init__(self):
        self.user = None

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Called for the key's offer and again, right before its signature is checked; the
        # last key validated is the one that authenticated.
        if username != SSH_USER:
            return False
        self.user = await sync_to_async(_user_of_key, thread_sensitive=False)(key.get_fingerprint("sha256"))
        return self.user is not None

    def server_requested(self, listen_host, listen_port):
        return False  # no remote port forwarding

    def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
        return False  # no local port forwarding


def parse_command(command: str | None) -> tuple[str, str]:
    """(service, instance name) of a git command; ValueError with the message otherwise."""
    if not command:
        raise ValueError("shell")
    try:
        words = shlex.split(command)
    except ValueError:
        raise ValueError("command") from None
    if len(words) == 3 and words[0] == "git" and f"git-{words[1]}" in COMMANDS:
        words = [f"git-{words[1]}", words[2]]
    if len(words) != 2 or words[0] not in COMMANDS:
        raise ValueError("command")
    match = PATH_RE.match(words[1])
    if match is None:
        raise ValueError("command")
    return words[0], match["name"]


def _authorize(user, service: str, name: str) -> Instance:
    close_old_connections()
    instance = Instance.objects.select_related("owner").filter(name=name).first()
    if instance is None:
        raise PermissionError(f"There is no instance named {name}.")
    user.refresh_from_db()
    refused = refusal(user, instance, push=service == "git-receive-pack")
    if refused:
        raise PermissionError(refused)
    ensure_repo(instance)
    return instance


def usage(user) -> str:
    host, port = settings.LAB_PUBLIC_HOST, settings.LAB_SSH_PORT
    return (f"Hi {user.username}! You are authenticated, but oTree Lab gives no shell access.\n"
            f"Push your code with git instead: git push ssh://git@{host}:{port}/<instance>.git main\n")


class TooLarge(Exception):
    """The client sent more than a push may be."""


async def _pump(reader, write, count=None, limit: int | None = None) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        if count is not None:
            count[0] += len(data)
            if limit is not None and count[0] > limit:
                raise TooLarge()
        await write(data)


async def handle(process: asyncssh.SSHServerProcess) -> None:
    user = process.get_extra_info("connection").get_owner().user
    try:
        try:
            service, name = parse_command(process.command)
        except ValueError as exc:
            if str(exc) == "shell":
                process.stderr.write(usage(user).encode())
            else:
                process.stderr.write(f"oTree Lab only runs git push and git fetch here, not {process.command!r}.\n"
                                     .encode())
            process.exit(1)
            return
        try:
            instance = await sync_to_async(_authorize, thread_sensitive=False)(user, service, name)
        except PermissionError as exc:
            process.stderr.write(f"{exc}\n".encode())
            process.exit(1)
            return
        await run_git(process, service, instance, user)
    except (asyncssh.Error, BrokenPipeError, ConnectionError):
        process.exit(1)
    except Exception:
        logger.exception("git over SSH failed")
        process.stderr.write(b"Internal error of the oTree Lab git server; nothing more to say here.\n")
        process.exit(1)


async def run_git(process, service: str, instance: Instance, user) -> None:
    push = service == "git-receive-pack"
    token = await sync_to_async(register_push, thread_sensitive=False)(user, instance) if push else None
    try:
        await _run_git(process, service, instance, token)
    finally:
        if token:
            await sync_to_async(revoke_push, thread_sensitive=False)(token)


async def _run_git(process, service: str, instance: Instance, token: str | None) -> None:
    env = git_env(token)
    protocol = (process.env or {}).get("GIT_PROTOCOL", "")
    if re.fullmatch(r"version=[0-9]", protocol or ""):
        env["GIT_PROTOCOL"] = protocol
    proc = await asyncio.create_subprocess_exec(
        "git", service.removeprefix("git-"), str(repo_path(instance)), env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    received = [0]
    limit = push_limit_bytes() + INPUT_SLACK if token else None
    cut = asyncio.Event()

    async def to_git(data):
        proc.stdin.write(data)
        await proc.stdin.drain()

    async def to_client_out(data):
        process.stdout.write(data)
        await process.stdout.drain()

    async def to_client_err(data):
        process.stderr.write(data)
        await process.stderr.drain()

    async def feed():
        try:
            await _pump(process.stdin, to_git, received, limit)
        except TooLarge:  # git gets no more: it stops, and nothing is stored
            cut.set()
            proc.kill()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            try:
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

    feeder = asyncio.ensure_future(feed())
    try:
        await asyncio.gather(_pump(proc.stdout, to_client_out), _pump(proc.stderr, to_client_err))
        code = await proc.wait()
        if token and (cut.is_set() or received[0] > push_limit_bytes()):
            process.stderr.write(too_large_message().encode())
            code = code or 1
        process.exit(code if code >= 0 else 1)  # (killed by a signal: a plain failure)
    finally:
        feeder.cancel()
        if proc.returncode is None:  # the client went away: git cleans up its lock files on SIGTERM
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()


async def start_server(host: str, port: int):
    return await asyncssh.create_server(
        GitSSHServer, host, port,
        server_host_keys=[host_key()],
        process_factory=handle,
        encoding=None,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        line_editor=False,
        server_version="oTreeLab",
    )
