"""Git over HTTP(S): `/git/<instance>.git/...`, smart HTTP only, through `git http-backend`.

Basic auth with the username and a personal access token as the password (no sessions,
hence no CSRF). Clone/fetch and push are for the instance's owner and lab managers; the
request body is streamed into http-backend and its answer streamed back, so the build
output of the post-receive hook reaches the pusher live. (The web server holds a request's
body before this view runs; instances.git.webcap bounds it while it arrives.) A push's
hooks learn who pushes from a one-time push token registered for its git process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from asgiref.sync import sync_to_async
from django.http import HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from instances.git.archive import ensure_repo
from instances.git.repos import (git_env, git_root, push_limit_bytes, refusal, register_push, revoke_push,
                                 too_large_message)
from instances.models import Instance
from manager.accounts.services import authenticate_token

logger = logging.getLogger(__name__)
REALM = 'Basic realm="oTree Lab"'
SERVICES = {"git-upload-pack", "git-receive-pack"}
CHUNK = 64 * 1024


def text(status: int, message: str, **headers) -> HttpResponse:
    response = HttpResponse(message.rstrip("\n") + "\n", status=status, content_type="text/plain; charset=utf-8")
    for key, value in headers.items():
        response[key] = value
    return response


def basic_credentials(request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


def _authorize(request, name: str, service: str):
    """(user, instance) or an error response."""
    credentials = basic_credentials(request)
    if credentials is None:
        return text(401, "Log in with your username and a personal access token as the password.",
                    **{"WWW-Authenticate": REALM})
    username, token = credentials
    user = authenticate_token(token)
    if user is None or user.username.lower() != username.lower():
        return text(401, "Wrong username or access token (use a personal access token as the password; "
                         "create one under Settings -> Access tokens).", **{"WWW-Authenticate": REALM})
    instance = Instance.objects.select_related("owner").filter(name=name).first()
    if instance is None:
        return text(404, f"There is no instance named {name}.")
    refused = refusal(user, instance, push=service == "git-receive-pack")
    if refused:
        return text(403, refused)
    ensure_repo(instance)
    return user, instance


def _service_of(request, path: str) -> str | None:
    if path == "info/refs" and request.method in ("GET", "HEAD"):
        service = request.GET.get("service", "")
        return service if service in SERVICES else None
    if path in SERVICES and request.method == "POST":
        return path
    return None


def _cgi_env(request, name: str, path: str, user, token: str | None) -> dict[str, str]:
    env = git_env(token)
    env.update({
        "GIT_PROJECT_ROOT": str(git_root()),
        "GIT_HTTP_EXPORT_ALL": "1",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "REQUEST_METHOD": request.method,
        "PATH_INFO": f"/{name}.git/{path}",
        "QUERY_STRING": request.META.get("QUERY_STRING", ""),
        "REMOTE_USER": user.username,
        "REMOTE_ADDR": request.META.get("REMOTE_ADDR", ""),
        "CONTENT_TYPE": request.META.get("CONTENT_TYPE", ""),
    })
    if request.META.get("CONTENT_LENGTH"):
        env["CONTENT_LENGTH"] = request.META["CONTENT_LENGTH"]
    for header in ("HTTP_CONTENT_ENCODING", "HTTP_GIT_PROTOCOL"):
        if request.META.get(header):
            env[header] = request.META[header]
    return env


def _pkt(band: int, message: str) -> bytes:
    payload = bytes([band]) + message.encode()
    return f"{len(payload) + 4:04x}".encode() + payload


@csrf_exempt
async def git_http(request, name: str, path: str):
    service = _service_of(request, path)
    if service is None:
        return text(404, "Only git's smart HTTP protocol is served here.")
    result = await sync_to_async(_authorize)(request, name, service)
    if isinstance(result, HttpResponse):
        return result
    user, instance = result
    token = None
    if service == "git-receive-pack" and request.method == "POST":  # a push: its hooks run
        token = await sync_to_async(register_push, thread_sensitive=False)(user, instance)
    try:
        return await _serve(request, name, path, service, user, token)
    except BaseException:
        await sync_to_async(revoke_push, thread_sensitive=False)(token)
        raise


async def _serve(request, name: str, path: str, service: str, user, token: str | None):
    """http-backend for an authorized request; the answer streams (and `token` is revoked
    once it has ended)."""
    proc = await asyncio.create_subprocess_exec(
        "git", "http-backend", env=_cgi_env(request, name, path, user, token),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
    )
    received = 0

    async def feed():
        nonlocal received
        try:
            while True:
                # The ASGI handler has spooled the body already; the view's own thread is gone.
                chunk = await sync_to_async(request.read, thread_sensitive=False)(CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                proc.stdin.write(chunk)
                await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # git stopped reading (e.g. the pack exceeded receive.maxInputSize)
        except Exception:
            logger.exception("feeding a git request to http-backend failed")
        finally:
            try:
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

    feeder = asyncio.ensure_future(feed())
    headers, status, rest = {}, 200, b""
    raw = b""
    while b"\r\n\r\n" not in raw and b"\n\n" not in raw:
        chunk = await proc.stdout.read(CHUNK)
        if not chunk:
            break
        raw += chunk
    if not raw:  # http-backend failed before answering (its error is in the manager's log)
        await feeder
        await proc.wait()
        await sync_to_async(revoke_push, thread_sensitive=False)(token)
        return text(500, "The git server failed; the lab manager finds the reason in the manager's log.")
    sep = b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"
    head, _, rest = raw.partition(sep)
    for line in head.decode("latin-1").splitlines():
        key, _, value = line.partition(":")
        if key.lower() == "status":
            status = int(value.strip().split()[0])
        elif key:
            headers[key.strip()] = value.strip()

    limit = push_limit_bytes() if service == "git-receive-pack" and request.method == "POST" else None

    async def body():
        # Always hold back the last 4 bytes: a push's answer ends with a flush packet, in
        # front of which a too-large push gets our own message (git shows it as `remote:`).
        tail, head = rest, rest[:5]
        try:
            while True:
                chunk = await proc.stdout.read(CHUNK)
                if not chunk:
                    break
                tail += chunk
                head = (head + chunk)[:5]
                if len(tail) > 4:
                    yield tail[:-4]
                    tail = tail[-4:]
            await feeder
            await proc.wait()
            sideband = head[4:5] in (b"\x01", b"\x02", b"\x03")  # the client asked for side-band
            if limit is not None and received > limit and tail == b"0000" and sideband:
                yield _pkt(2, too_large_message()) + tail
            elif tail:
                yield tail
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            feeder.cancel()
            await sync_to_async(revoke_push, thread_sensitive=False)(token)

    response = StreamingHttpResponse(body(), status=status, content_type=headers.pop("Content-Type", None))
    for key, value in headers.items():
        response[key] = value
    response["X-Accel-Buffering"] = "no"
    return response
