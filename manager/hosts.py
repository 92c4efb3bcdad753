"""The manager's own host names and origins, kept apart from the instances'.

Browsers send cookies by host name and ignore ports, so in `port` routing the instances
are served on another name of the machine (settings.LAB_INSTANCE_HOST, e.g. `localhost`
when the manager is `127.0.0.1`): the manager's session and CSRF cookies, set for its
own host, never travel with a request to an instance's port. That holds only as long
as the manager itself never answers as the instances' host: had anyone logged in at
http://localhost:8000/, the browser would send that session to http://localhost:18000/
as well. So `InstanceHostRedirect` (the first middleware) answers every request for the
instances' host with a redirect to the same path under LAB_PUBLIC_URL, before anything
reads or sets a cookie; settings.ALLOWED_HOSTS leaves that host out besides.

`origin_key()` and `manager_origins()` are the one definition of "the manager's origin"
(scheme, host AND port), used by the websocket origin check (manager.realtime.origins).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpResponse, HttpResponseRedirect
from django.http.request import split_domain_port

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, the port made explicit; None when it is
    not an http(s) origin (e.g. the "null" origin of sandboxed frames and file: pages)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def manager_origins() -> set[tuple[str, str, int]]:
    """The origins of the manager's own pages: LAB_PUBLIC_URL, http://LAB_HOST:LAB_PORT and
    LAB_CSRF_TRUSTED_ORIGINS (exact origins only: a `*.` wildcard there is for form posts,
    never for the websockets)."""
    host = settings.LAB_HOST
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    candidates = [settings.LAB_PUBLIC_URL, f"http://{host}:{settings.LAB_PORT}",
                  *settings.LAB_CSRF_TRUSTED_ORIGINS]
    return {key for key in map(origin_key, candidates) if key is not None and "*" not in key[1]}


def _raw_host(request) -> str:
    """The host the client asked for, as Django's request.get_host() reads it (without
    its ALLOWED_HOSTS check, which would refuse the instances' host with a 400)."""
    meta = request.META
    if settings.USE_X_FORWARDED_HOST and "HTTP_X_FORWARDED_HOST" in meta:
        return meta["HTTP_X_FORWARDED_HOST"]
    return meta.get("HTTP_HOST") or meta.get("SERVER_NAME", "")


def is_instance_host(host_header: str) -> bool:
    if settings.LAB_ROUTING != "port" or not settings.LAB_INSTANCE_HOST:
        return False
    domain, _port = split_domain_port(host_header)
    return domain.strip("[]") == settings.LAB_INSTANCE_HOST.strip("[]").lower()


class InstanceHostRedirect:
    """A request for the instances' host name goes to the same path under LAB_PUBLIC_URL.
    Only the health check is answered where it was asked (the supervisor asks
    http://LAB_HOST:LAB_PORT/healthz/, and LAB_HOST may be that name); it has no cookies."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not is_instance_host(_raw_host(request)):
            return self.get_response(request)
        if request.path == "/healthz/":
            return HttpResponse("ok", content_type="text/plain")
        response = HttpResponseRedirect(settings.LAB_PUBLIC_URL + request.get_full_path())
        response["Cache-Control"] = "no-store"  # the lab may change LAB_INSTANCE_HOST later
        return response
