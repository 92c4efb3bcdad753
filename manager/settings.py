"""Django settings for oTree Lab Manager.

Every setting a lab may want to change comes from an environment variable (see the
README's table); everything else is fixed here.
"""

import hashlib
import ipaddress
import os
import re
from urllib.parse import urlsplit

import dj_database_url
from django.utils.http import is_same_domain

from manager import datadir
from manager.env import ConfigError, env_bool, env_duration, env_int, env_list, env_str

BASE_DIR = datadir.BASE_DIR
DATA_DIR = datadir.data_dir()

# --- where we listen and who reaches us -------------------------------------------
LAB_HOST = env_str("LAB_HOST", "127.0.0.1")
LAB_PORT = env_int("LAB_PORT", 8000)
LAB_PUBLIC_HOST = env_str("LAB_PUBLIC_HOST", LAB_HOST)
LAB_SSH_PORT = env_int("LAB_SSH_PORT", 2222)
LAB_PUSH_MAX_MB = env_int("LAB_PUSH_MAX_MB", 200)  # a git push larger than this is refused
# An uploaded backup file (instance page, Backups page, API) larger than this is refused (HTTP 413)
LAB_BACKUP_UPLOAD_MAX_MB = env_int("LAB_BACKUP_UPLOAD_MAX_MB", 1024)
if LAB_BACKUP_UPLOAD_MAX_MB < 1:
    raise ConfigError("LAB_BACKUP_UPLOAD_MAX_MB must be at least 1")
# Request bodies over 16 MB (git pushes, uploaded backups) the web server receives at
# once; more get 503 (instances.git.webcap: each takes its size in its memory for a moment).
LAB_LARGE_BODIES = env_int("LAB_LARGE_BODIES", 2)
if LAB_LARGE_BODIES < 1:
    raise ConfigError("LAB_LARGE_BODIES must be at least 1")
# Uploaded files go to a temporary file as they arrive, never into memory, and stop past
# LAB_BACKUP_UPLOAD_MAX_MB (instances.uploads).
FILE_UPLOAD_HANDLERS = ["instances.uploads.LimitedUploadHandler"]
# pre-receive refuses a pushed file (blob) larger than this, and a main/master tree whose files add up
# to more than LAB_DEPLOY_MAX_MB (what a build unpacks; a pack of zeros compresses ~1000:1)
LAB_PUSH_MAX_BLOB_MB = env_int("LAB_PUSH_MAX_BLOB_MB", 50)
LAB_DEPLOY_MAX_MB = env_int("LAB_DEPLOY_MAX_MB", 200)
if min(LAB_PUSH_MAX_MB, LAB_PUSH_MAX_BLOB_MB, LAB_DEPLOY_MAX_MB) < 1:
    raise ConfigError("LAB_PUSH_MAX_MB, LAB_PUSH_MAX_BLOB_MB and LAB_DEPLOY_MAX_MB must be at least 1")
LAB_RUNTIME = env_str("LAB_RUNTIME", "auto")
LAB_ROUTING = env_str("LAB_ROUTING", "port")
LAB_DOMAIN = env_str("LAB_DOMAIN", "")
LAB_INSTANCE_PORTS = env_str("LAB_INSTANCE_PORTS", "18000-18999")
if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", LAB_RUNTIME):
    # Its form here; that a backend of this name exists is checked at start-up by the one
    # place that knows the backends (instances.runtime.check_setting, InstancesConfig.ready).
    raise ConfigError(f"LAB_RUNTIME must be auto or the name of a runtime backend (docker, process, swarm), got {LAB_RUNTIME!r}")
if LAB_ROUTING not in {"port", "subdomain"}:
    raise ConfigError(f"LAB_ROUTING must be port or subdomain, got {LAB_ROUTING!r}")
if LAB_ROUTING == "subdomain" and not LAB_DOMAIN:
    raise ConfigError("LAB_ROUTING=subdomain needs LAB_DOMAIN (the base domain of the instances)")
# Container images of an instance's services and app builds: the official images by
# default; `manage.py build_images` builds local equivalents under these same names.
LAB_IMAGE_POSTGRES = env_str("LAB_IMAGE_POSTGRES", "postgres:15")
LAB_IMAGE_REDIS = env_str("LAB_IMAGE_REDIS", "redis:7")
LAB_IMAGE_PYTHON = env_str("LAB_IMAGE_PYTHON", "python:3.11-slim")
# The container registry the swarm runtime (LAB_RUNTIME=swarm) runs to carry release images
# to the swarm's nodes: only built locally (`manage.py build_images`, Debian's
# docker-registry, distribution 2.8; non-root, data in the volume /var/lib/docker-registry).
LAB_IMAGE_REGISTRY = env_str("LAB_IMAGE_REGISTRY", "otree-lab/registry:2.8")
# The swarm runtime's firewall on the other nodes (iptables + Python; `manage.py build_images`).
LAB_IMAGE_NETGUARD = env_str("LAB_IMAGE_NETGUARD", "otree-lab/netguard:1")
# The swarm runtime (LAB_RUNTIME=swarm; README "Docker Swarm"). LAB_SWARM_REGISTRY: the
# registry address the swarm's nodes pull release images from (host:port); empty: the
# manager runs one (LAB_IMAGE_REGISTRY) on its own node and nodes pull from
# <this node's swarm address>:<its port> (plain HTTP: each node lists it in the engine's
# "insecure-registries"). LAB_SWARM_SUBNETS: the instances' overlay networks (a /27 each).
LAB_SWARM_REGISTRY = env_str("LAB_SWARM_REGISTRY", "")
if LAB_SWARM_REGISTRY and not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._/-]+)?", LAB_SWARM_REGISTRY):
    raise ConfigError(f"LAB_SWARM_REGISTRY must be host[:port][/path] of a registry, got {LAB_SWARM_REGISTRY!r}")
LAB_SWARM_SUBNETS = env_str("LAB_SWARM_SUBNETS", "10.216.0.0/16")

# --- HTTPS by Caddy (instances.proxy; README "HTTPS") ----------------------------------
# off: plain HTTP as always (TLS, if any, terminated in front). acme: certificates from an
# ACME CA (Let's Encrypt) for public DNS names; files: the university's certificate and
# key (PEM); internal: Caddy's own CA (the manager offers its root to the lab computers).
# With TLS on, Caddy is also the manager's front door: https://LAB_PUBLIC_HOST[:LAB_HTTPS_PORT]
# is proxied to daphne on LAB_HOST:LAB_PORT (loopback only), LAB_HTTP_PORT redirects to HTTPS.
LAB_TLS = env_str("LAB_TLS", "off").strip().lower()
if LAB_TLS not in {"off", "acme", "files", "internal"}:
    raise ConfigError(f"LAB_TLS must be off, acme, files or internal, got {LAB_TLS!r}")
LAB_TLS_ON = LAB_TLS != "off"
LAB_TLS_CERT = env_str("LAB_TLS_CERT", "")
LAB_TLS_KEY = env_str("LAB_TLS_KEY", "")
LAB_ACME_EMAIL = env_str("LAB_ACME_EMAIL", "")
LAB_ACME_CA = env_str("LAB_ACME_CA", "https://acme-v02.api.letsencrypt.org/directory")
# A private ACME CA (the university's step-ca, a test CA) whose root is not in the system's
# trust store: the PEM file of that root.
LAB_ACME_CA_ROOT = env_str("LAB_ACME_CA_ROOT", "")
LAB_HTTPS_PORT = env_int("LAB_HTTPS_PORT", 443)
LAB_HTTP_PORT = env_int("LAB_HTTP_PORT", 80)
LAB_HSTS_SECONDS = env_int("LAB_HSTS_SECONDS", 31536000)
for _name, _port in (("LAB_HTTPS_PORT", LAB_HTTPS_PORT), ("LAB_HTTP_PORT", LAB_HTTP_PORT)):
    if not 1 <= _port <= 65535:
        raise ConfigError(f"{_name} must be a port number (1-65535), got {_port}")
if LAB_HSTS_SECONDS < 0:
    raise ConfigError(f"LAB_HSTS_SECONDS must be 0 (no HSTS) or a number of seconds, got {LAB_HSTS_SECONDS}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


if LAB_TLS_ON:
    if LAB_HTTPS_PORT == LAB_HTTP_PORT:
        raise ConfigError(f"LAB_HTTPS_PORT and LAB_HTTP_PORT are both {LAB_HTTPS_PORT}: give them two ports (443 and 80)")
    if LAB_PORT in (LAB_HTTPS_PORT, LAB_HTTP_PORT):
        raise ConfigError(f"LAB_PORT={LAB_PORT} is also LAB_HTTPS_PORT or LAB_HTTP_PORT: with LAB_TLS={LAB_TLS} Caddy "
                          "takes those; daphne needs another port (the default 8000)")
    if not (LAB_HOST == "localhost" or (_is_ip(LAB_HOST) and ipaddress.ip_address(LAB_HOST.strip("[]")).is_loopback)):
        raise ConfigError(f"LAB_HOST={LAB_HOST}: with LAB_TLS={LAB_TLS} Caddy is the manager's front door and the web "
                          "server must listen on a loopback address only (LAB_HOST=127.0.0.1), so nobody reaches it "
                          "around HTTPS")
    if LAB_TLS in {"acme", "files"}:
        if not env_str("LAB_PUBLIC_HOST"):
            raise ConfigError(f"LAB_TLS={LAB_TLS} needs LAB_PUBLIC_HOST: the DNS name users type to reach the manager "
                              + ("(it must resolve to this server from the internet for the ACME CA)"
                                 if LAB_TLS == "acme" else "(one of the names in LAB_TLS_CERT)"))
    if LAB_TLS == "files" and not (LAB_TLS_CERT and LAB_TLS_KEY):
        raise ConfigError("LAB_TLS=files needs LAB_TLS_CERT and LAB_TLS_KEY: the paths of the certificate (PEM, with "
                          "its chain) and of its private key (PEM, not encrypted)")
    if LAB_TLS == "acme" and not LAB_ACME_CA.startswith(("https://", "http://")):
        raise ConfigError(f"LAB_ACME_CA must be the URL of an ACME directory, got {LAB_ACME_CA!r}")

# The address users type: used in e-mails, git remotes and lobby URLs.
if LAB_TLS_ON:
    _default_public_url = f"https://{LAB_PUBLIC_HOST}" + ("" if LAB_HTTPS_PORT == 443 else f":{LAB_HTTPS_PORT}")
else:
    _default_public_url = f"http://{LAB_PUBLIC_HOST}:{LAB_PORT}"
LAB_PUBLIC_URL = env_str("LAB_PUBLIC_URL", _default_public_url).rstrip("/")

SECRET_KEY = env_str("LAB_SECRET_KEY") or datadir.django_secret_key()
LAB_ENCRYPTION_KEY = datadir.encryption_key()
DEBUG = env_bool("LAB_DEBUG", False)

# Every container, network and volume this manager creates on a Docker engine carries
# LAB_MANAGER_ID, so two managers (or a test run) sharing an engine never touch each
# other's; default: the id stored in LAB_DATA_DIR/manager-id (the compose install's image
# makes one, deploy/docker-entrypoint.sh: its data dir's path is the same in every project),
# else derived from LAB_DATA_DIR. Instance networks take /28 subnets out of
# LAB_DOCKER_SUBNETS (Docker's default address pools run out after about 15 instances).
_manager_id_file = DATA_DIR / "manager-id"
LAB_MANAGER_ID = (env_str("LAB_MANAGER_ID", "")
                  or (_manager_id_file.read_text().strip() if _manager_id_file.is_file() else "")
                  or hashlib.sha256(str(DATA_DIR).encode()).hexdigest()[:10])
if not re.fullmatch(r"[a-z0-9]{1,16}", LAB_MANAGER_ID):
    raise ConfigError(f"LAB_MANAGER_ID must be 1-16 lowercase letters or digits, got {LAB_MANAGER_ID!r}")
LAB_DOCKER_SUBNETS = env_str("LAB_DOCKER_SUBNETS", "10.213.0.0/16")
# Builds (pip and the requirements' setup.py) run in containers on networks of their own
# (a /28 each) from this pool: egress for pip even when LAB_EGRESS=deny, nothing else.
LAB_DOCKER_BUILD_SUBNETS = env_str("LAB_DOCKER_BUILD_SUBNETS", "10.214.0.0/20")
for _name, _value in (("LAB_DOCKER_SUBNETS", LAB_DOCKER_SUBNETS), ("LAB_DOCKER_BUILD_SUBNETS", LAB_DOCKER_BUILD_SUBNETS),
                      ("LAB_SWARM_SUBNETS", LAB_SWARM_SUBNETS)):
    try:
        _net = ipaddress.ip_network(_value)
    except ValueError as _exc:
        raise ConfigError(f"{_name} is not an IPv4 network: {_exc}") from None
    _smallest = 27 if _name == "LAB_SWARM_SUBNETS" else 28  # an overlay network is a /27, a bridge a /28
    if _net.version != 4 or _net.prefixlen > _smallest:
        raise ConfigError(f"{_name}={_value} must be an IPv4 network of at least one /{_smallest}")
for _first, _second in (("LAB_DOCKER_SUBNETS", "LAB_DOCKER_BUILD_SUBNETS"), ("LAB_DOCKER_SUBNETS", "LAB_SWARM_SUBNETS"),
                        ("LAB_DOCKER_BUILD_SUBNETS", "LAB_SWARM_SUBNETS")):
    if ipaddress.ip_network(globals()[_first]).overlaps(ipaddress.ip_network(globals()[_second])):
        raise ConfigError(f"{_second}={globals()[_second]} overlaps {_first}={globals()[_first]}")

# --- tenant isolation (README "Security") --------------------------------------------
# Instances run code that experimenters pushed. In `port` routing they are served on a
# host name other than the manager's, so the manager's cookies never reach them (cookies
# ignore ports): LAB_INSTANCE_HOST, by default the other name of the loopback address.
_LOOPBACK_TWIN = {"127.0.0.1": "localhost", "localhost": "127.0.0.1", "[::1]": "localhost", "::1": "localhost"}
LAB_INSTANCE_HOST = env_str("LAB_INSTANCE_HOST", _LOOPBACK_TWIN.get(LAB_PUBLIC_HOST, "") if LAB_ROUTING == "port" else "")
if LAB_ROUTING == "port":
    if not LAB_INSTANCE_HOST:
        raise ConfigError(
            f"LAB_INSTANCE_HOST is required with LAB_PUBLIC_HOST={LAB_PUBLIC_HOST} and port routing: set it to another "
            "name of this server (a second DNS name, or its IP address when users type the name), so the manager's "
            "cookies never reach the instances (cookies ignore ports)")
    _manager_hosts = {LAB_PUBLIC_HOST.strip("[]").lower(),
                      (urlsplit(env_str("LAB_PUBLIC_URL", "")).hostname or LAB_PUBLIC_HOST).strip("[]").lower()}
    if LAB_INSTANCE_HOST.strip("[]").lower() in _manager_hosts:
        raise ConfigError(
            f"LAB_INSTANCE_HOST={LAB_INSTANCE_HOST} is the manager's own host name: the instances would receive the "
            "manager's cookies (cookies ignore ports); use another name of this server")
if LAB_TLS == "acme":
    # An ACME CA (Let's Encrypt) validates DNS names over the internet: no IP, no localhost.
    for _name, _host in (("LAB_PUBLIC_HOST", LAB_PUBLIC_HOST),
                         *((("LAB_INSTANCE_HOST", LAB_INSTANCE_HOST),) if LAB_ROUTING == "port" else ())):
        _bare_host = _host.strip("[]").lower()
        if _is_ip(_bare_host) or _bare_host == "localhost" or _bare_host.endswith(".localhost") or "." not in _bare_host:
            raise ConfigError(f"{_name}={_host}: LAB_TLS=acme needs a public DNS name that resolves to this server "
                              "(an ACME CA issues no certificate for an IP address, localhost or a bare name); "
                              "use LAB_TLS=files with the university's certificate, or LAB_TLS=internal on a lab network")
    if LAB_ROUTING == "subdomain" and (_is_ip(LAB_DOMAIN) or LAB_DOMAIN.lower() in {"localhost", ""}):
        raise ConfigError(f"LAB_DOMAIN={LAB_DOMAIN}: LAB_TLS=acme needs a public DNS domain")
# The process runtime: `users` = a system user per instance (needs root); `none` = no
# isolation (a single-user laptop). Without root, process instances need `none`.
LAB_PROCESS_ISOLATION = env_str("LAB_PROCESS_ISOLATION", "users")
if LAB_PROCESS_ISOLATION not in {"users", "none"}:
    raise ConfigError(f"LAB_PROCESS_ISOLATION must be users or none, got {LAB_PROCESS_ISOLATION!r}")
LAB_IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# Whether instances reach networks outside this machine (never this machine itself,
# other instances, or link-local/metadata addresses). Builds always may (pip).
LAB_EGRESS = env_str("LAB_EGRESS", "open")
if LAB_EGRESS not in {"open", "deny"}:
    raise ConfigError(f"LAB_EGRESS must be open or deny, got {LAB_EGRESS!r}")


def _uid_range(name: str, default: str) -> tuple[int, int]:
    raw = env_str(name, default)
    low, sep, high = raw.partition("-")
    try:
        low, high = int(low), int(high)
    except ValueError:
        raise ConfigError(f"{name} must be a range of user ids such as {default}, got {raw!r}") from None
    if not sep or not 1000 <= low or high - low < 127 or high >= 2**31 - 1:
        raise ConfigError(f"{name}={raw} must be at least 128 user ids between 1000 and 2147483646")
    return low, high


# The process runtime's user ids (a range, so one firewall rule covers every instance):
# the instances' users take ids from the start; the last 64 are the build users that
# make the shared virtual environments (never an instance's own user).
LAB_PROCESS_UIDS = _uid_range("LAB_PROCESS_UIDS", "1900000000-1900099999")
LAB_PROCESS_BUILDER_UIDS = (LAB_PROCESS_UIDS[1] - 63, LAB_PROCESS_UIDS[1])
LAB_PROCESS_APP_UIDS = (LAB_PROCESS_UIDS[0], LAB_PROCESS_UIDS[1] - 64)

# --- the manager's hosts, origins, cookies and client addresses (README "Security") ---
# The manager never answers as the instances' host: a request for it (someone typed
# localhost:8000 while the manager is 127.0.0.1) is redirected to LAB_PUBLIC_URL by
# manager.hosts.InstanceHostRedirect before any cookie is read or set, so the manager's
# cookies never live on the host whose other ports run experimenters' code.
_LAB_EXTRA_HOSTS = env_list("LAB_ALLOWED_HOSTS")
LAB_CSRF_TRUSTED_ORIGINS = env_list("LAB_CSRF_TRUSTED_ORIGINS")


def _bare(host: str) -> str:
    return host.strip().strip("[]").lower()


def _instance_host_covers(pattern: str) -> bool:
    """Whether a host pattern (of ALLOWED_HOSTS: "x", ".x", "*"; of CSRF_TRUSTED_ORIGINS:
    "*.x") covers a host instances are served on."""
    pattern = _bare(pattern)
    if pattern.startswith("*"):
        pattern = pattern[1:]  # "*" -> "" (anything), "*.x" -> ".x" (x and below)
    if not pattern:
        return True
    if LAB_ROUTING == "port":
        return is_same_domain(_bare(LAB_INSTANCE_HOST), pattern)
    if pattern == _bare(LAB_PUBLIC_HOST):
        return False
    domain = LAB_DOMAIN.lower()
    return is_same_domain(f"any-instance.{domain}", pattern) or pattern.endswith("." + domain)


for _extra in _LAB_EXTRA_HOSTS:
    if _instance_host_covers(_extra):
        raise ConfigError(f"LAB_ALLOWED_HOSTS names {_extra}, where the instances are served: the manager's cookies "
                          "would reach them; leave it out")
for _origin in LAB_CSRF_TRUSTED_ORIGINS:
    _parts = urlsplit(_origin)
    if _parts.scheme not in ("http", "https") or not _parts.netloc or _parts.path not in ("", "/"):
        raise ConfigError(f"LAB_CSRF_TRUSTED_ORIGINS: {_origin!r} is not an origin such as https://lab.example.edu")
    if _instance_host_covers(_parts.hostname or ""):
        raise ConfigError(f"LAB_CSRF_TRUSTED_ORIGINS names {_origin}, where the instances are served: their pages "
                          "could post forms to the manager; leave it out")
ALLOWED_HOSTS = sorted(
    host for host in {LAB_HOST, LAB_PUBLIC_HOST, "127.0.0.1", "localhost", "[::1]", *_LAB_EXTRA_HOSTS}
    if LAB_ROUTING != "port" or _bare(host) != _bare(LAB_INSTANCE_HOST)
)
_LAB_HOST_URL = f"[{LAB_HOST}]" if ":" in LAB_HOST and not LAB_HOST.startswith("[") else LAB_HOST
# The manager's own origins: forms may be posted from these, and the websockets
# (/ws/live/, /ws/lobby/) accept a browser only from these (manager.realtime.origins).
CSRF_TRUSTED_ORIGINS = sorted({LAB_PUBLIC_URL, f"http://{_LAB_HOST_URL}:{LAB_PORT}", *LAB_CSRF_TRUSTED_ORIGINS})

# Behind a TLS-terminating proxy (deploy/), trust its X-Forwarded-Proto and -Host, and
# take the client's address from X-Forwarded-For: the entry LAB_PROXY_HOPS from the end
# (the one the outermost of our proxies appended; whatever a client put before it is
# ignored). Without LAB_BEHIND_PROXY the header is never trusted: REMOTE_ADDR it is.
# One rule for both users of the address: allauth's login rate limit reads
# ALLAUTH_TRUSTED_PROXY_COUNT, and the audit log asks allauth's adapter.
LAB_BEHIND_PROXY = env_bool("LAB_BEHIND_PROXY", False)
LAB_PROXY_HOPS = env_int("LAB_PROXY_HOPS", 1)
if not 1 <= LAB_PROXY_HOPS <= 10:
    raise ConfigError(f"LAB_PROXY_HOPS must be the number of proxies in front of the manager (1-10), got {LAB_PROXY_HOPS}")
# With LAB_TLS on, Caddy is one proxy more (the only one without LAB_BEHIND_PROXY): it sets
# X-Forwarded-Proto/-For itself (a client's own are dropped unless it comes from
# LAB_PROXY_TRUSTED_IPS behind LAB_BEHIND_PROXY), and daphne listens on loopback only.
if LAB_BEHIND_PROXY or LAB_TLS_ON:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    USE_X_FORWARDED_HOST = True
ALLAUTH_TRUSTED_PROXY_COUNT = (LAB_PROXY_HOPS if LAB_BEHIND_PROXY else 0) + (1 if LAB_TLS_ON else 0)

# Session and CSRF cookies: host-only (no Domain), HttpOnly (no script reads them: pages
# carry the CSRF token in the HTML), SameSite=Lax (Strict would drop the session on the
# first request after following a link from elsewhere, e.g. an e-mailed password link,
# and the redirect that follows it), Secure under HTTPS. Under HTTPS also the "__Host-"
# name prefix: browsers accept such a cookie only Secure, host-only and for Path=/, so a
# page on a sub-domain (an instance in subdomain routing) cannot plant one for the manager.
LAB_HTTPS = LAB_PUBLIC_URL.lower().startswith("https://")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = LAB_HTTPS
SESSION_COOKIE_NAME = "__Host-sessionid" if LAB_HTTPS else "sessionid"
CSRF_COOKIE_NAME = "__Host-csrftoken" if LAB_HTTPS else "csrftoken"
SESSION_COOKIE_DOMAIN = CSRF_COOKIE_DOMAIN = None
SESSION_COOKIE_PATH = CSRF_COOKIE_PATH = "/"
SESSION_COOKIE_HTTPONLY = CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Lax"
# "Saved." and friends travel in the session, not in a cookie of their own: the manager
# sets exactly the two cookies above.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
SESSION_COOKIE_AGE = 60 * 60 * 24 * 14
# HSTS once HTTPS works (Django sets it on HTTPS responses only; Caddy on the instances').
# Not includeSubDomains: only the names this manager serves.
SECURE_HSTS_SECONDS = LAB_HSTS_SECONDS if LAB_TLS_ON else 0
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# --- apps ---------------------------------------------------------------------------
INSTALLED_APPS = [
    "daphne",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "ninja",
    "manager",
    "manager.accounts",
    "manager.audit",
    "manager.jobs",
    "manager.realtime",
    "manager.dashboard",
    "manager.api",
    "instances",
    "lobby",
    "bots",
]

MIDDLEWARE = [
    "manager.hosts.InstanceHostRedirect",  # first: before anything reads the host or a cookie
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "manager.accounts.middleware.ForcePasswordChangeMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "manager.urls"
ASGI_APPLICATION = "manager.asgi.application"
WSGI_APPLICATION = "manager.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "manager.context_processors.lab",
            ],
        },
    },
]

# --- database -----------------------------------------------------------------------
_database_url = env_str("DATABASE_URL")
if _database_url:
    try:
        DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=60, conn_health_checks=True)}
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL is not a database URL: {exc}") from None
    if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # shared by processes: as the default file below
        DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE",
                                           "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "manager.sqlite3",
            # Web, worker and beat share the file: wait for locks instead of failing,
            # and let readers run beside the writer.
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            "TEST": {"NAME": DATA_DIR / "test-manager.sqlite3"},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- redis: broker, channel layer, cache --------------------------------------------
REDIS_URL = env_str("REDIS_URL")
LAB_EMBEDDED_REDIS = not REDIS_URL
if LAB_EMBEDDED_REDIS:
    REDIS_URL = datadir.embedded_redis_url()


def _kombu_url(url: str) -> str:
    # kombu spells a unix socket "redis+socket:///path"; redis-py spells it "unix:///path".
    return "redis+socket://" + url.removeprefix("unix://") if url.startswith("unix://") else url


CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # channels_redis waits for messages with a 5 s BZPOPMIN; redis-py 8's default socket
        # timeout is also 5 s, so an idle socket's consumer died with "Timeout reading" every
        # 5 s (the browser reconnected, missing what was sent meanwhile). A longer socket
        # timeout than the blocking pop keeps idle sockets alive.
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 5}],
                   "prefix": "lab:ch", "capacity": 1500, "expiry": 30},
    }
}
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "lab:cache",
    }
}

CELERY_BROKER_URL = _kombu_url(REDIS_URL)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True  # results live in the database (manager.jobs.Job)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True  # a killed worker's task is delivered again
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = 300  # every task has a limit; tasks may set a smaller one
CELERY_TASK_TIME_LIMIT = 330
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
LAB_READY_TIMEOUT = env_int("LAB_READY_TIMEOUT", 30)  # seconds an instance's database and Redis get to start
# The process runtime: where PostgreSQL's server programs are ("" = PATH, then
# /usr/lib/postgresql/<newest>/bin) and the Python its virtual environments are made with.
LAB_PG_BIN = env_str("LAB_PG_BIN", "")
LAB_PROCESS_PYTHON = env_str("LAB_PROCESS_PYTHON", "")
LAB_LOCK_TTL = env_int("LAB_LOCK_TTL", 30)  # seconds a killed worker's instance lock outlives it
# Deploys: seconds a build may take, seconds a new app gets to answer its health check,
# and how many release images per instance are kept for rollbacks.
LAB_BUILD_TIMEOUT = env_int("LAB_BUILD_TIMEOUT", 900)
LAB_START_TIMEOUT = env_int("LAB_START_TIMEOUT", 120)
# Builds install requirements with uv and the shared wheel cache (instances/wheelcache.py),
# or with pip as before (LAB_INSTALLER=pip); LAB_UV_CACHE_MB bounds the wheel cache.
LAB_INSTALLER = env_str("LAB_INSTALLER", "uv").strip().lower()
if LAB_INSTALLER not in ("uv", "pip"):
    raise ConfigError(f"LAB_INSTALLER must be uv or pip, not {LAB_INSTALLER!r}")
LAB_UV_CACHE_MB = env_int("LAB_UV_CACHE_MB", 4096)
if LAB_UV_CACHE_MB < 100:
    raise ConfigError("LAB_UV_CACHE_MB must be at least 100 (megabytes of cached wheels)")
# Sleeping instances (instances.sleep): an app with no request for this many minutes and no
# live oTree session is stopped (0 = never; per instance: Instance.sleep_after_minutes) and
# woken by the next request; LAB_SLEEP_DATABASES: its PostgreSQL and Redis sleep too;
# LAB_WAKE_HOLD_SECONDS: how long the proxy holds a request while the app wakes.
LAB_SLEEP_AFTER_MINUTES = env_int("LAB_SLEEP_AFTER_MINUTES", 30)
LAB_SLEEP_DATABASES = env_bool("LAB_SLEEP_DATABASES", True)
LAB_WAKE_HOLD_SECONDS = env_int("LAB_WAKE_HOLD_SECONDS", 30)
if not 1 <= LAB_WAKE_HOLD_SECONDS <= 55:  # (daphne closes a connection silent for 60 s: instances.git.webcap)
    raise ConfigError(f"LAB_WAKE_HOLD_SECONDS must be a number of seconds from 1 to 55, got {LAB_WAKE_HOLD_SECONDS}")
LAB_KEEP_RELEASES = env_int("LAB_KEEP_RELEASES", 5)
# Live oTree sessions (instances.sessions): a session is live while a participant who has
# not finished started or completed a page in the last LAB_SESSION_LIVE_MINUTES (decimals
# allowed, e.g. 0.5); restarts, resets, settings changes, rollbacks and switches to a new
# release then wait for an explicit confirmation.
_raw_live = env_str("LAB_SESSION_LIVE_MINUTES", "10")
try:
    LAB_SESSION_LIVE_MINUTES = float(_raw_live)
except ValueError:
    raise ConfigError(f"LAB_SESSION_LIVE_MINUTES must be a number of minutes, got {_raw_live!r}") from None
if not 0 < LAB_SESSION_LIVE_MINUTES <= 1440:  # (also refuses nan and inf)
    raise ConfigError(f"LAB_SESSION_LIVE_MINUTES must be more than 0 and at most 1440 (a day), got {_raw_live!r}")
# oTree's data exports as one zip (instances/export.py: "Download data", and beside the
# backup of a reset and a delete): the most the app's CSVs may add up to, in MB.
LAB_EXPORT_MAX_MB = env_int("LAB_EXPORT_MAX_MB", 512)
if LAB_EXPORT_MAX_MB < 1:
    raise ConfigError(f"LAB_EXPORT_MAX_MB must be at least 1 (MB of oTree's data exports in one zip), "
                      f"got {LAB_EXPORT_MAX_MB}")
# The reverse proxy (Caddy): port mode binds each instance's port on LAB_PROXY_BIND (when
# set; else LAB_INSTANCE_HOST if it is a local address, else all interfaces); subdomain mode
# listens on LAB_PROXY_LISTEN.
LAB_PROXY_BIND = env_str("LAB_PROXY_BIND", "")
LAB_PROXY_LISTEN = env_str("LAB_PROXY_LISTEN", ":80")
# Caddy's state (config, admin socket, HOME/XDG dirs): fixed; tests point it elsewhere.
LAB_CADDY_DIR = DATA_DIR / "caddy"
# Subdomain routing behind LAB_BEHIND_PROXY: the addresses of the proxies in front of Caddy
# (the TLS terminator). From these Caddy passes X-Forwarded-For on, appending its peer (so
# Caddy is one of the LAB_PROXY_HOPS); from anyone else it starts the header afresh.
LAB_PROXY_TRUSTED_IPS = env_list("LAB_PROXY_TRUSTED_IPS", ["127.0.0.0/8", "::1/128"])
for _net in LAB_PROXY_TRUSTED_IPS:
    try:
        ipaddress.ip_network(_net, strict=False)
    except ValueError:
        raise ConfigError(f"LAB_PROXY_TRUSTED_IPS: {_net!r} is not an IP address or network") from None
# Bot runs (bots/) hold a worker process for as long as they play: they have their own
# queue and worker (a labserver child), so deploys and backups never wait behind them.
LAB_BOT_RUNS = env_int("LAB_BOT_RUNS", 2)  # bot runs played at the same time; more wait in the queue
if LAB_BOT_RUNS < 1:
    raise ConfigError(f"LAB_BOT_RUNS must be at least 1, got {LAB_BOT_RUNS}")
CELERY_TASK_ROUTES = {"bots.run": {"queue": "bots"}}
# The default monthly cap (USD, calendar month in UTC) of each experimenter's bot runs; a lab
# manager may set another per account. Empty: no cap.
_monthly = env_str("LAB_BOT_MONTHLY_BUDGET_USD", "").strip()
try:
    LAB_BOT_MONTHLY_BUDGET_USD = float(_monthly) if _monthly else None
except ValueError:
    raise ConfigError(f"LAB_BOT_MONTHLY_BUDGET_USD must be a number of US dollars (or empty), got {_monthly!r}") from None
if LAB_BOT_MONTHLY_BUDGET_USD is not None and not 0 <= LAB_BOT_MONTHLY_BUDGET_USD < 1e9:
    raise ConfigError(f"LAB_BOT_MONTHLY_BUDGET_USD must be 0 or more, got {_monthly!r}")
# Scheduled backups (instances.schedule; README "Scheduled backups"): how often each instance
# is backed up (0 = no schedule, unless an instance sets its own), how many of the scheduled
# backups are kept (the newest of each of the last N days and M ISO weeks that have one), a
# second folder every finished backup file is copied to (a mounted network share; empty =
# none), and how often the scheduler looks for due backups.
LAB_BACKUP_INTERVAL = env_duration("LAB_BACKUP_INTERVAL", "24h")  # seconds
LAB_BACKUP_KEEP_DAILY = env_int("LAB_BACKUP_KEEP_DAILY", 7)
LAB_BACKUP_KEEP_WEEKLY = env_int("LAB_BACKUP_KEEP_WEEKLY", 4)
LAB_BACKUP_COPY_DIR = env_str("LAB_BACKUP_COPY_DIR", "")
LAB_BACKUP_CHECK_SECONDS = env_int("LAB_BACKUP_CHECK_SECONDS", 60)
for _name, _keep in (("LAB_BACKUP_KEEP_DAILY", LAB_BACKUP_KEEP_DAILY), ("LAB_BACKUP_KEEP_WEEKLY", LAB_BACKUP_KEEP_WEEKLY)):
    if not 0 <= _keep <= 1000:
        raise ConfigError(f"{_name} must be a whole number from 0 to 1000 (how many are kept), got {_keep}")
if LAB_BACKUP_COPY_DIR and not os.path.isabs(LAB_BACKUP_COPY_DIR):
    raise ConfigError(f"LAB_BACKUP_COPY_DIR must be an absolute path (a folder such as a mounted network share), "
                      f"got {LAB_BACKUP_COPY_DIR!r}")
if not 1 <= LAB_BACKUP_CHECK_SECONDS <= 3600:
    raise ConfigError(f"LAB_BACKUP_CHECK_SECONDS must be a number of seconds from 1 to 3600, got {LAB_BACKUP_CHECK_SECONDS}")
CELERY_BEAT_SCHEDULE = {
    "jobs-sweep": {"task": "manager.jobs.tasks.sweep_jobs", "schedule": 60.0},
    "instances-sweep": {"task": "instances.sweep", "schedule": 60.0, "options": {"expires": 55}},
    "sessions-sweep": {"task": "instances.sessions_sweep", "schedule": 60.0, "options": {"expires": 55}},
    "sleep-sweep": {"task": "instances.sleep_sweep", "schedule": 60.0, "options": {"expires": 55}},
    "bots-sweep": {"task": "bots.sweep", "schedule": 60.0, "options": {"expires": 55}},
    "backup-schedule": {"task": "instances.backup_schedule", "schedule": float(LAB_BACKUP_CHECK_SECONDS),
                        "options": {"expires": LAB_BACKUP_CHECK_SECONDS}},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")

# --- auth ---------------------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "account_login"
PASSWORD_RESET_TIMEOUT = 60 * 60 * 24 * 7  # invitation and reset links: one week

ACCOUNT_ADAPTER = "manager.accounts.adapter.LabAccountAdapter"
ACCOUNT_LOGIN_METHODS = {"username", "email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "username*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = "none"
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_LOGOUT_ON_GET = False
ACCOUNT_LOGOUT_ON_PASSWORD_CHANGE = False
ACCOUNT_PASSWORD_RESET_BY_CODE_ENABLED = False
ACCOUNT_PREVENT_ENUMERATION = True
ACCOUNT_SESSION_REMEMBER = None
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[oTree Lab] "
ACCOUNT_RATE_LIMITS = {
    "login_failed": env_str("LAB_LOGIN_RATE_LIMIT", "10/m/ip,5/5m/key"),
    "reset_password": "20/m/ip,5/m/key",
    "reset_password_from_key": "20/m/ip",
    "change_password": "5/m/user",
}
# Rate limits of destructive or costly actions (manager/throttle.py, defaults there):
# COUNT/PERIOD/SCOPE, comma-separated; SCOPE instance or user (per-user budgets do not apply
# to lab managers); off = no limit.
from manager import throttle as _throttle  # noqa: E402

LAB_THROTTLE_RESTART = env_str("LAB_THROTTLE_RESTART", _throttle.ACTIONS["restart"].default)
LAB_THROTTLE_RESET = env_str("LAB_THROTTLE_RESET", _throttle.ACTIONS["reset"].default)
LAB_THROTTLE_BACKUP = env_str("LAB_THROTTLE_BACKUP", _throttle.ACTIONS["backup"].default)
LAB_THROTTLE_BOT_RUN = env_str("LAB_THROTTLE_BOT_RUN", _throttle.ACTIONS["bot_run"].default)
LAB_THROTTLE_EXPORT = env_str("LAB_THROTTLE_EXPORT", _throttle.ACTIONS["export"].default)
LAB_THROTTLE_TOKEN = env_str("LAB_THROTTLE_TOKEN", _throttle.ACTIONS["token"].default)
try:
    _throttle.check_settings({name: value for name, value in globals().items() if name.startswith("LAB_THROTTLE_")})
except ValueError as _exc:
    raise ConfigError(str(_exc)) from None

MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = env_str("LAB_NAME", "oTree Lab")
MFA_TOTP_TOLERANCE = 1  # accept the neighbouring 30 s step: phone clocks drift

# --- e-mail: console by default, SMTP when LAB_SMTP_HOST is set ----------------------
LAB_NAME = env_str("LAB_NAME", "oTree Lab")
LAB_NAME_SET = bool(env_str("LAB_NAME"))
DEFAULT_FROM_EMAIL = env_str("LAB_EMAIL_FROM", f"oTree Lab Manager <noreply@{LAB_PUBLIC_HOST}>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
if env_str("LAB_SMTP_HOST"):
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = env_str("LAB_SMTP_HOST")
    EMAIL_PORT = env_int("LAB_SMTP_PORT", 587)
    EMAIL_HOST_USER = env_str("LAB_SMTP_USER")
    EMAIL_HOST_PASSWORD = env_str("LAB_SMTP_PASSWORD")
    EMAIL_USE_TLS = env_bool("LAB_SMTP_STARTTLS", EMAIL_PORT == 587)
    EMAIL_USE_SSL = env_bool("LAB_SMTP_SSL", EMAIL_PORT == 465)
    EMAIL_TIMEOUT = 20
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"

# --- static files -------------------------------------------------------------------
STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = True  # no collectstatic step needed
WHITENOISE_AUTOREFRESH = DEBUG

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("LAB_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LAB_LOG_LEVEL", "INFO")},
    # httpx2 (bot runs, the openai SDK) logs every request at INFO
    "loggers": {"django.db.backends": {"level": "WARNING"}, "httpx2": {"level": "WARNING"}},
}
