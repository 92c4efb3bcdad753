"""A cap on request bodies while they arrive at the manager's web server (daphne).

Twisted, under daphne, receives a request's whole body (into a temporary file) before
daphne hands the request to Django, and daphne then queues all of it in memory at once:
without a cap, an HTTPS `git push` of any size — or any POST from anyone, before a login
is checked — was read whole into the web process. `install()` replaces daphne's request
class with one that counts the body as it arrives and, past the cap, answers 413 with a
message (JSON in the API's error shape under /api/), stops passing the body on and closes the connection (what the client still sends
is read and dropped, at most the cap again, so it reads the 413 instead of a reset); a `Content-Length` above the cap is refused before the
body is sent at all (curl waits for `100 Continue`, which then never comes).

Caps: git's smart-HTTP POSTs get LAB_PUSH_MAX_MB plus a quarter (and a MiB) — a push a
little over the limit still reaches git, whose receive.maxInputSize refuses it with the
usual message; far over it, the pusher sees HTTP 413. Every other request gets
OTHER_MAX_BYTES (Django refuses other bodies over 2.5 MB anyway); an uploaded backup file
(UPLOAD_POST) LAB_BACKUP_UPLOAD_MAX_MB and a MiB.

Large bodies at once: a body past OTHER_MAX_BYTES (a git push, an uploaded backup) holds
one of LAB_LARGE_BODIES slots from the moment it is declared or grows past that size until
its request ends (daphne hands the whole body to Django at once, so each takes its size in
the web process's memory for a moment; the login is checked only then). When none is free,
the request is answered 503 with a sentence (JSON under /api/) and Retry-After, before its
body is sent when its length is declared: the web process holds at most LAB_LARGE_BODIES
large bodies, whoever sends them.

Requests Twisted cannot or will not read get a real answer, never a silently closed
connection or an empty page (`bounded_channel_class`; JSON `{"detail": ...}` under /api/,
a short text elsewhere):
- header fields over HEADERS_MAX_BYTES in all (request line included; Twisted's
  `totalHeadersSize`, also the most one line may have) or over MAX_HEADER_FIELDS of them:
  431 Request Header Fields Too Large; a request line (URL) over that size: 414 URI Too Long
  (Twisted closed the connection without a word for a line over 16 KB, and sent an empty
  400 for headers over 16 KB in all);
- anything else Twisted finds malformed (request line, a header line, body framing): 400
  with a sentence;
- Twisted no longer parses form bodies itself (daphne never used what it parsed): a
  multipart POST without a boundary got Twisted's empty 400; Django now reads the body and
  answers as everywhere else (the API: a JSON 400, the pages: the 400 page).
- a request whose head (request line and header fields) is not complete HEADER_TIMEOUT
  seconds after its first byte: 408 (a client trickling a byte every few seconds, a
  slowloris, kept a connection for ever: Twisted's idle timeout starts again with every
  byte); a connection that sends nothing for IDLE_TIMEOUT seconds is closed (Twisted's own
  idle timeout, set here: older versions waited 12 hours). A request's body and its answer
  are not timed, but by the idle timeout (a slow push keeps going while bytes arrive).
After such an answer the connection is closed for writing and what the client still sends
is read and dropped (at most DRAIN_BYTES, for at most DRAIN_SECONDS), so the client reads
the answer instead of a connection reset.

Daphne and Twisted are pinned (requirements.txt); `tests/instances/test_git_push.py` checks the body
cap and `tests/manager/test_http_edges.py` the answers on a real daphne (and through Caddy), so an
upgrade that changes these internals fails there first.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from http import HTTPStatus

from django.conf import settings

log = logging.getLogger(__name__)
OTHER_MAX_BYTES = 16 * 1024 * 1024
GIT_POST = re.compile(rb"^/git/[^/?]+\.git/git-(receive|upload)-pack(\?|$)")
# Uploads of backup files (the API, the instance page, the Backups page).
UPLOAD_POST = re.compile(rb"^(/api/v1/instances/[^/?]+/backups|/instances/[^/?]+/backups/upload/|/backups/upload/)"
                         rb"(\?|$)")


def body_cap(method: bytes, path: bytes) -> int:
    """The most bytes of body a request `method path` may send."""
    if method == b"POST" and GIT_POST.match(path or b""):
        limit = settings.LAB_PUSH_MAX_MB * 1024 * 1024
        return limit + limit // 4 + 1024 * 1024
    if method == b"POST" and UPLOAD_POST.match(path or b""):  # the file and a form's few fields
        return settings.LAB_BACKUP_UPLOAD_MAX_MB * 1024 * 1024 + 1024 * 1024
    return OTHER_MAX_BYTES


API_TOO_LARGE = "The request body is too large."  # the API's own words (manager.api.errors)


def too_large(cap: int, method: bytes = b"", path: bytes = b"") -> bytes:
    """The whole 413 answer to a body over `cap`: JSON in the API's error shape under /api/,
    the push limit for a git push, a sentence elsewhere."""
    path = path or b""
    if path.startswith(b"/api/"):
        body, kind = json.dumps({"detail": API_TOO_LARGE}).encode(), b"application/json"
    else:
        text = f"Request refused: its body is larger than this server takes ({cap // (1024 * 1024)} MB)."
        if method == b"POST" and GIT_POST.match(path):
            text += f" A git push may be at most {settings.LAB_PUSH_MAX_MB} MB (LAB_PUSH_MAX_MB); nothing was stored."
        elif method == b"POST" and UPLOAD_POST.match(path):
            text += (f" An uploaded backup may be at most {settings.LAB_BACKUP_UPLOAD_MAX_MB} MB "
                     "(LAB_BACKUP_UPLOAD_MAX_MB); nothing was stored.")
        body, kind = (text + "\n").encode(), b"text/plain; charset=utf-8"
    return (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: %s\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % (kind, len(body)) + body)


def busy_answer(path: bytes = b"") -> bytes:
    """The whole 503 answer to a large body while LAB_LARGE_BODIES others are received."""
    text = (f"Request refused: the server is receiving {settings.LAB_LARGE_BODIES} other large "
            f"upload{'s' if settings.LAB_LARGE_BODIES != 1 else ''} or git push{'es' if settings.LAB_LARGE_BODIES != 1 else ''} "
            "right now (LAB_LARGE_BODIES); nothing was stored. Try again in a minute.")
    if (path or b"").startswith(b"/api/"):
        body, kind = json.dumps({"detail": text}).encode(), b"application/json"
    else:
        body, kind = (text + "\n").encode(), b"text/plain; charset=utf-8"
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: %s\r\nRetry-After: 60\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % (kind, len(body)) + body)


class _Slots:
    """The large bodies being received (the reactor's thread alone counts them)."""

    taken = 0


def http_responses() -> dict:
    """Twisted's reason phrases by status."""
    from twisted.web import http

    return http.RESPONSES


def bounded_request_class(base):
    """daphne's WebRequest with a body cap (and the standard reason phrase of every status)."""

    class BoundedWebRequest(base):
        lab_cap = OTHER_MAX_BYTES
        lab_received = 0
        lab_refused = False
        lab_slot = False

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Django reads form bodies; Twisted's own parse (unused by daphne) answered a
            # malformed multipart body with an empty 400 and cost the reactor a second parse.
            self._parsePOSTFormSubmission = False

        def gotLength(self, length):
            channel = self.channel
            self.lab_cap = body_cap(getattr(channel, "_command", b""), getattr(channel, "_path", b""))
            super().gotLength(length)
            if length is not None and length > self.lab_cap:
                self.requestHeaders.removeHeader(b"Expect")  # no "100 Continue" after the refusal
                self._lab_refuse()
            elif length is not None and length > OTHER_MAX_BYTES and not self._lab_take_slot():
                self.requestHeaders.removeHeader(b"Expect")
                self._lab_refuse(busy=True)

        def handleContentChunk(self, data):
            if self.lab_refused:
                return
            self.lab_received += len(data)
            if self.lab_received > self.lab_cap:
                self._lab_refuse()
                return
            if self.lab_received > OTHER_MAX_BYTES and not self._lab_take_slot():
                self._lab_refuse(busy=True)
                return
            super().handleContentChunk(data)

        def _lab_take_slot(self) -> bool:
            if self.lab_slot:
                return True
            if _Slots.taken >= settings.LAB_LARGE_BODIES:
                return False
            _Slots.taken += 1
            self.lab_slot = True
            return True

        def _lab_free_slot(self):
            if self.lab_slot:
                self.lab_slot = False
                _Slots.taken -= 1

        def finish(self):
            self._lab_free_slot()
            return super().finish()

        def connectionLost(self, reason):
            self._lab_free_slot()
            return super().connectionLost(reason)

        def requestReceived(self, command, path, version):
            if self.lab_refused:
                return
            super().requestReceived(command, path, version)

        def setResponseCode(self, code, message=None):
            # Twisted knows no reason phrase for 422, 429, 431 …: "429 Unknown Status". The
            # standard's phrase instead ("429 Too Many Requests").
            if message is None and code not in http_responses():
                try:
                    message = HTTPStatus(code).phrase.encode()
                except ValueError:
                    pass
            super().setResponseCode(code, message)

        def _lab_refuse(self, busy: bool = False):
            self.lab_refused = True
            self._lab_free_slot()  # what it sent is dropped
            transport = self.channel.transport if self.channel is not None else None
            if transport is None:
                return
            path = getattr(self.channel, "_path", b"") or b""
            if busy:
                log.warning("large body refused: %d others are received (%s)", _Slots.taken, path[:200] or b"?")
                answer = busy_answer(path)
            else:
                log.warning("request body over %d bytes refused (%s)", self.lab_cap, path[:200] or b"?")
                answer = too_large(self.lab_cap, getattr(self.channel, "_command", b""), path)
            send = getattr(self.channel, "lab_answer_and_drain", None)
            if send is None:
                transport.write(answer)
                self.channel.loseConnection()
                return
            # A client still sending (git, curl) reads the 413 only if its rest is read and
            # dropped; closing at once resets the connection over the unread answer.
            send(answer, drain=max(DRAIN_BYTES, self.lab_cap))

    BoundedWebRequest.__name__ = BoundedWebRequest.__qualname__ = "BoundedWebRequest"
    return BoundedWebRequest


# --- answers for requests Twisted refuses before daphne sees them ------------------------

HEADERS_MAX_BYTES = 16384  # request line and header fields together (and the longest line)
MAX_HEADER_FIELDS = 500
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 5
HEADER_TIMEOUT = 20  # seconds from a request's first byte to the end of its header fields
IDLE_TIMEOUT = 60  # seconds a connection may send nothing (between requests, or mid-request)

REFUSALS = {
    400: ("Bad Request",
          "Bad request: this server could not read it as HTTP/1.1 (its request line, a header field "
          "or the framing of its body is malformed)."),
    414: ("URI Too Long",
          "Request refused: its address (URL) is longer than this server takes "
          f"({HEADERS_MAX_BYTES // 1024} KB)."),
    408: ("Request Timeout",
          f"Request refused: its request line and header fields did not arrive within {HEADER_TIMEOUT} seconds."),
    431: ("Request Header Fields Too Large",
          "Request refused: its header fields are larger than this server takes "
          f"({HEADERS_MAX_BYTES // 1024} KB in all, at most {MAX_HEADER_FIELDS} fields). "
          "Clearing this site's cookies usually helps."),
}


def refusal(status: int, path: bytes = b"") -> bytes:
    """The whole HTTP answer `status` (JSON for a path under /api/)."""
    reason, text = REFUSALS[status]
    if (path or b"").startswith(b"/api/"):
        body, kind = json.dumps({"detail": text}).encode(), b"application/json"
    else:
        body, kind = (text + "\n").encode(), b"text/plain; charset=utf-8"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, reason.encode(), kind, len(body)) + body)


def _request_line_path(data: bytes) -> bytes:
    """The path of a (partial) request line: b"GET /api/v1/x?… HTTP/1.1" -> b"/api/v1/x?…"."""
    parts = data.split(b" ", 2)
    return parts[1] if len(parts) > 1 else b""


def bounded_channel_class(base):
    """Twisted's HTTPChannel with real answers for what it refuses (see the docstring)."""

    class BoundedHTTPChannel(base):
        totalHeadersSize = HEADERS_MAX_BYTES
        MAX_LENGTH = HEADERS_MAX_BYTES
        maxHeaders = MAX_HEADER_FIELDS
        lab_refused = False
        lab_drained = 0
        lab_drain_limit = DRAIN_BYTES
        lab_head_timer = None

        def _lab_in_request_line(self) -> bool:
            return bool(getattr(self, "_HTTPChannel__first_line", 0))

        # A request's head (request line and header fields) must be complete within
        # HEADER_TIMEOUT of its first byte: Twisted's idle timeout starts again with every
        # byte, so a client sending one every few seconds (slowloris) held a connection
        # for as long as it liked.
        def _lab_head_started(self):
            if self.lab_head_timer is None and not self.lab_refused:
                self.lab_head_timer = self.callLater(HEADER_TIMEOUT, self._lab_head_too_slow)

        def _lab_head_done(self):
            timer, self.lab_head_timer = self.lab_head_timer, None
            if timer is not None and timer.active():
                timer.cancel()

        def _lab_head_too_slow(self):
            self.lab_head_timer = None
            if self.lab_refused or self.transport is None:
                return
            in_line = self._lab_in_request_line()
            path = _request_line_path(bytes(getattr(self, "_buffer", b""))) if in_line else getattr(self, "_path", b"")
            self._lab_refuse(408, path)

        def setLineMode(self, extra=b""):
            if extra:  # the next request's first bytes, sent while the last one was answered
                self._lab_head_started()
            return super().setLineMode(extra)

        def allHeadersReceived(self):
            self._lab_head_done()
            super().allHeadersReceived()

        def connectionLost(self, reason):
            self._lab_head_done()
            super().connectionLost(reason)

        def lineReceived(self, line):
            if self.lab_refused:
                return
            if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
                self.lineLengthExceeded(line)  # the same answer as for one line over MAX_LENGTH
                return
            super().lineReceived(line)

        def lineLengthExceeded(self, line):
            """414 for the request line (URL), 431 for a header field."""
            if self._lab_in_request_line():
                self._lab_refuse(414, _request_line_path(line))
            else:
                self._lab_refuse(431, getattr(self, "_path", b""))

        def headerReceived(self, line):
            if self.lab_refused:
                return False
            if self._receivedHeaderCount >= self.maxHeaders:
                self._lab_refuse(431, getattr(self, "_path", b""))
                return False
            return super().headerReceived(line)

        def _respondToBadRequestAndDisconnect(self):
            path = getattr(self, "_path", b"") if not self._lab_in_request_line() else b""
            self._lab_refuse(400, path)

        def dataReceived(self, data):
            if not self.lab_refused:
                if data and self.line_mode:  # (a request's head; its body comes in raw mode)
                    self._lab_head_started()
                return super().dataReceived(data)
            self.lab_drained += len(data)  # read and dropped: the client gets to read the answer
            if self.lab_drained > self.lab_drain_limit and self.transport is not None:
                self.transport.abortConnection()

        def _lab_refuse(self, status: int, path: bytes):
            if self.lab_refused:
                return
            self.lab_refused = True
            transport = self.transport
            if transport is None:
                return
            log.warning("request refused with %d (%s)", status, (path or b"?")[:200])
            self.lab_answer_and_drain(refusal(status, path))

        def lab_answer_and_drain(self, answer: bytes, drain: int = DRAIN_BYTES):
            """Send `answer`, close for writing, then read and drop at most `drain` bytes."""
            self.lab_refused = True
            self.lab_drain_limit = drain
            transport = self.transport
            if transport is None:
                return
            transport.write(answer)
            self.persistent = False
            half_close = getattr(transport, "loseWriteConnection", None)
            if half_close is None:
                self.loseConnection()
                return
            half_close()  # the answer, then end of stream; the client then closes its side
            self.setTimeout(DRAIN_SECONDS)  # or, at the latest, Twisted's timeout closes it

    BoundedHTTPChannel.__name__ = BoundedHTTPChannel.__qualname__ = "BoundedHTTPChannel"
    return BoundedHTTPChannel


def install() -> bool:
    """Make daphne's HTTP factory build bounded requests (it looks its request class up in
    its module for every connection) on channels that answer what they refuse. A no-op
    outside a process that loaded daphne's server; idempotent. Returns whether the caps
    are in place."""
    module = sys.modules.get("daphne.http_protocol")
    if module is None:
        return False
    current = module.WebRequest
    if getattr(current, "__name__", "") != "BoundedWebRequest":
        module.WebRequest = bounded_request_class(current)
    factory = module.HTTPFactory
    if not getattr(factory, "lab_bounded", False):
        from twisted.web import http

        channel_class = bounded_channel_class(http.HTTPChannel)

        def protocol(self):
            # Read by the factory's buildProtocol right after this, for the new channel:
            # Twisted's idle timeout (12 hours in older versions) is ours.
            self.timeOut = IDLE_TIMEOUT
            return http._GenericHTTPChannelProtocol(channel_class())

        factory.protocol = protocol
        factory.lab_bounded = True
    return True
