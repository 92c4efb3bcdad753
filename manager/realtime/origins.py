"""Which pages may open the manager's websockets (/ws/live/ and the kiosk's /ws/lobby/…).

A browser sends the page's origin with every websocket handshake, and cookies go along
whatever that origin is (same-site pages even with SameSite cookies: two names of one
lab domain are one "site"). So the handshake is accepted only from the manager's own
origins — scheme, host AND port (manager.hosts.manager_origins): channels'
AllowedHostsOriginValidator compared host names only, so a page of an instance on
another port of the manager's host could open /ws/live/ as its visitor.

No Origin header at all: not a browser (a browser always sends one, and a page cannot
remove it), e.g. the tests' and benchmarks' clients. Such a client has to hold the
session cookie itself, so it can do nothing the person could not do anyway: accepted.
"""

from __future__ import annotations

import logging

from channels.security.websocket import WebsocketDenier

from manager.hosts import manager_origins, origin_key

log = logging.getLogger(__name__)


def handshake_origins(scope) -> list[str]:
    return [value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"origin"]


def origin_allowed(origins: list[str]) -> bool:
    if not origins:
        return True
    if len(origins) > 1:
        return False  # never sent by a browser: ambiguous, refused
    return origin_key(origins[0]) in manager_origins()


class ManagerOriginOnly:
    """ASGI middleware for websockets: refuse (HTTP 403) a handshake from a foreign origin."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError("ManagerOriginOnly guards websocket connections only")
        origins = handshake_origins(scope)
        if origin_allowed(origins):
            return await self.application(scope, receive, send)
        log.warning("websocket %s refused: origin %s is not the manager's", scope.get("path"), ", ".join(origins))
        return await WebsocketDenier()(scope, receive, send)
