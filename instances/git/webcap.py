"""A cap on request bodies while they arrive at the manager's web server (daphne).

Twisted, under daphne, receives a request's whole body (into a temporary file) before
daphne hands the request to Django, and daphne then queues all of it in memory at once:
without a cap, an HTTPS `git push` of any size — or any POST from anyone, before a login
is checked — was read whole into the web process. `install()` replaces daphne's request
class with one that counts the body as it arrives and, past the cap, answers 413 with a
message and closes the connection; a `Content-Length` above the cap is refused before the
body is sent at all (curl waits for `100 Continue`, which then never comes).

Caps: git's smart-HTTP POSTs get LAB_PUSH_MAX_MB plus a quarter (and a MiB) — a push a
little over the limit still reaches git, whose receive.maxInputSize refuses it with the
usual message; far over it, the pusher sees HTTP 413. Every other request gets
OTHER_MAX_BYTES (the manager takes no uploads; Django refuses bodies over 2.5 MB anyway).

Daphne is pinned (requirements.txt); `tests/test_git_push.py` checks the cap on a real
daphne, so an upgrade that changes these internals fails there first.
"""

from __future__ import annotations

import logging
import re
import sys

from django.conf import settings

log = logging.getLogger(__name__)
OTHER_MAX_BYTES = 16 * 1024 * 1024
GIT_POST = re.compile(rb"^/git/[^/?]+\.git/git-(receive|upload)-pack(\?|$)")


def body_cap(method: bytes, path: bytes) -> int:
    """The most bytes of body a request `method path` may send."""
    if method == b"POST" and GIT_POST.match(path or b""):
        limit = settings.LAB_PUSH_MAX_MB * 1024 * 1024
        return limit + limit // 4 + 1024 * 1024
    return OTHER_MAX_BYTES


def too_large_body(cap: int) -> bytes:
    text = (f"Request refused: its body is larger than this server takes ({cap // (1024 * 1024)} MB). "
            f"A git push may be at most {settings.LAB_PUSH_MAX_MB} MB (LAB_PUSH_MAX_MB); nothing was stored.\n")
    return text.encode()


def bounded_request_class(base):
    """daphne's WebRequest with a body cap."""

    class BoundedWebRequest(base):
        lab_cap = OTHER_MAX_BYTES
        lab_received = 0
        lab_refused = False

        def gotLength(self, length):
            channel = self.channel
            self.lab_cap = body_cap(getattr(channel, "_command", b""), getattr(channel, "_path", b""))
            super().gotLength(length)
            if length is not None and length > self.lab_cap:
                self.requestHeaders.removeHeader(b"Expect")  # no "100 Continue" after the refusal
                self._lab_refuse()

        def handleContentChunk(self, data):
            if self.lab_refused:
                return
            self.lab_received += len(data)
            if self.lab_received > self.lab_cap:
                self._lab_refuse()
                return
            super().handleContentChunk(data)

        def requestReceived(self, command, path, version):
            if self.lab_refused:
                return
            super().requestReceived(command, path, version)

        def _lab_refuse(self):
            self.lab_refused = True
            body = too_large_body(self.lab_cap)
            transport = self.channel.transport if self.channel is not None else None
            if transport is None:
                return
            log.warning("request body over %d bytes refused (%s)", self.lab_cap,
                        getattr(self.channel, "_path", b"?")[:200])
            transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.channel.loseConnection()

    BoundedWebRequest.__name__ = BoundedWebRequest.__qualname__ = "BoundedWebRequest"
    return BoundedWebRequest


def install() -> bool:
    """Make daphne's HTTP factory build bounded requests (it looks its request class up in
    its module for every connection). A no-op outside a process that loaded daphne's
    server; idempotent. Returns whether the cap is in place."""
    module = sys.modules.get("daphne.http_protocol")
    if module is None:
        return False
    current = module.WebRequest
    if getattr(current, "__name__", "") == "BoundedWebRequest":
        return True
    module.WebRequest = bounded_request_class(current)
    return True
