"""Local container images for labs without access to a container registry.

By default an instance runs the official `postgres`, `redis` and `python` images (names in
settings: LAB_IMAGE_POSTGRES, LAB_IMAGE_REDIS, LAB_IMAGE_PYTHON). `manage.py build_images`
builds equivalent images from a Debian mirror instead and tags them with those same names,
so the defaults work without any further configuration. It also builds `registry`
(LAB_IMAGE_REGISTRY, Debian's docker-registry), the container registry through which the
swarm runtime carries release images to the swarm's nodes, and `netguard`
(LAB_IMAGE_NETGUARD, Debian's iptables and Python), the instances' firewall on the swarm's
other nodes:

1. debootstrap (variant minbase) one Debian root file system into a temporary directory,
   add the extra CA bundle to its trust store when one is given, apply the suite's
   updates and security fixes, strip documentation, and `docker import` it as
   `otree-lab/debian-base:<suite>` (kept as a cache for the next run);
2. `docker build` (the classic builder: no BuildKit, no registry) the small Dockerfiles
   beside this module FROM that base;
3. start each new image once and check that it works (for postgres: the time from
   `docker run` until `pg_isready` answers; for registry: until `GET /v2/` answers 200).

Images that exist already are skipped; `force` rebuilds them, base included.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

HERE = Path(__file__).resolve().parent
IMAGES = ("postgres", "redis", "python", "registry", "netguard")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEFAULT_SUITE = "bookworm"
BASE_REPOSITORY = "otree-lab/debian-base"
LABEL = "org.otree-lab.image"  # on every image built here: postgres, redis, python, registry, debian-base
LABEL_CA = "org.otree-lab.extra-ca"  # sha256 prefix of the extra CA bundle, or "none"
CHECK_LABEL = "org.otree-lab.build-check"  # on the throw-away containers of the checks
CA_FILE = "/etc/ssl/certs/ca-certificates.crt"  # the trust store's bundle inside the images
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

Out = Callable[[str], None]


class BuildError(Exception):
    """Something the person running the command has to fix; the message says what."""


@dataclass
class BuildOptions:
    mirror: str = DEFAULT_MIRROR
    suite: str = DEFAULT_SUITE
    # Debian security archive; None: the default one when the mirror is the default
    # mirror, else none (a local mirror rarely carries it); "" or "none": none.
    security_mirror: str | None = None
    ca_bundle: Path | None = None
    only: tuple[str, ...] = IMAGES
    force: bool = False
    names: dict[str, str] = field(default_factory=dict)  # image -> tag; default: settings


@dataclass
class Result:
    image: str
    tag: str
    status: str  # "built" or "skipped"
    seconds: float = 0.0
    size: int = 0
    check: str = ""  # what the check after the build measured


def configured_names() -> dict[str, str]:
    from django.conf import settings

    return {
        "postgres": settings.LAB_IMAGE_POSTGRES,
        "redis": settings.LAB_IMAGE_REDIS,
        "python": settings.LAB_IMAGE_PYTHON,
        "registry": settings.LAB_IMAGE_REGISTRY,
        "netguard": settings.LAB_IMAGE_NETGUARD,
    }


def connect() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=1800)  # a build step may be silent for minutes
        client.ping()
        return client
    except (DockerException, OSError) as exc:
        raise BuildError(
            f"the Docker engine is not reachable ({exc}). Is dockerd running, and may this "
            "user use its socket (root or the docker group)? On Debian: apt install docker.io"
        ) from None


def image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except ImageNotFound:
        return False


def read_ca_bundle(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise BuildError(f"cannot read the CA bundle {path}: {exc.strerror}") from None
    pems = re.findall(r"-----BEGIN CERTIFICATE-----\s.+?-----END CERTIFICATE-----", text, re.S)
    if not pems:
        raise BuildError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return pems


def ca_fingerprint(pems: list[str]) -> str:
    if not pems:
        return "none"
    return hashlib.sha256("\n".join(pems).encode()).hexdigest()[:16]


def security_source(opts: BuildOptions) -> str:
    sec = opts.security_mirror
    if sec is None:
        return DEFAULT_SECURITY_MIRROR if opts.mirror.rstrip("/") == DEFAULT_MIRROR else ""
    return "" if sec.strip().lower() in {"", "none"} else sec.rstrip("/")


# --- the base root file system ------------------------------------------------------


def check_can_debootstrap() -> None:
    if os.geteuid() != 0:
        raise BuildError("building the Debian base needs root (debootstrap and chroot): run it with sudo")
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed: apt install debootstrap")


def check_mirror(mirror: str, suite: str, pems: list[str]) -> None:
    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        if pems:
            context.load_verify_locations(cadata="\n".join(pems))
    try:
        with urllib.request.urlopen(url, timeout=20, context=context) as response:
            head = response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise BuildError(f"the mirror has no suite {suite!r}: {url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BuildError(f"the Debian mirror is unreachable: {url}: {reason}") from None
    if "Suite:" not in head and "Codename:" not in head:
        raise BuildError(f"{url} does not look like a Debian Release file")


# Phases of debootstrap worth showing (the per-package lines are not).
_PHASE = re.compile(r"^(I: (Retrieving (InRelease|Release|Packages)|Checking Release signature|Resolving|Installing core|"
                    r"Unpacking required|Configuring required|Unpacking the base|Configuring the base|"
                    r"Base system installed).*|[EW]: .*)$")


def debootstrap(opts: BuildOptions, rootfs: Path, out: Out) -> None:
    cmd = ["debootstrap", "--variant=minbase", "--include=ca-certificates", "--components=main",
           opts.suite, str(rootfs), opts.mirror]
    out(f"  $ {' '.join(cmd)}")
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if _PHASE.match(line):
            out(f"    {line}")
    if proc.wait() != 0:
        log = rootfs / "debootstrap" / "debootstrap.log"
        if log.exists():
            tail.extend(log.read_text(errors="replace").splitlines()[-15:])
        raise BuildError("debootstrap failed (exit %d):\n%s" % (proc.returncode, "\n".join(tail)))


APT_CONF = """\
// otree-lab: small images
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
"""

DPKG_NODOC = """\
# otree-lab: no documentation, manual pages or translations in the images
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""


def _run_chroot(rootfs: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full_env = {"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    full_env.update({k: v for k, v in os.environ.items() if k in PROXY_VARS})
    full_env.update(env or {})
    proc = subprocess.run(["chroot", str(rootfs), *args], env=full_env, capture_output=True, text=True,
                          errors="replace")
    if proc.returncode != 0:
        raise BuildError(f"in the new root file system, `{' '.join(args)}` failed:\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    return proc.stdout


def prepare_rootfs(rootfs: Path, opts: BuildOptions, pems: list[str], out: Out) -> None:
    mirror = opts.mirror.rstrip("/")
    sources = [f"deb {mirror} {opts.suite} main", f"deb {mirror} {opts.suite}-updates main"]
    security = security_source(opts)
    if security:
        sources.append(f"deb {security} {opts.suite}-security main")
    (rootfs / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    (rootfs / "etc/apt/apt.conf.d/90otree-lab").write_text(APT_CONF)
    (rootfs / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/dpkg/dpkg.cfg.d/90otree-lab-nodoc").write_text(DPKG_NODOC)
    policy = rootfs / "usr/sbin/policy-rc.d"  # no service starts during package installs
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)

    if pems:
        extra = rootfs / "usr/local/share/ca-certificates"
        extra.mkdir(parents=True, exist_ok=True)
        for i, pem in enumerate(pems):
            (extra / f"otree-lab-extra-{i:03d}.crt").write_text(pem + "\n")
        _run_chroot(rootfs, "update-ca-certificates")
        out(f"  added {len(pems)} certificates of {opts.ca_bundle} to the trust store ({CA_FILE})")

    out(f"  applying {opts.suite}-updates" + (f" and {opts.suite}-security" if security else "")
        + " (apt-get upgrade)")
    proc_dir = rootfs / "proc"
    mounted = subprocess.run(["mount", "-t", "proc", "proc", str(proc_dir)], capture_output=True, text=True)
    if mounted.returncode != 0:
        raise BuildError(f"cannot mount /proc in the new root file system: {mounted.stderr.strip()}")
    try:
        _run_chroot(rootfs, "apt-get", "update", "-qq")
        upgraded = _run_chroot(rootfs, "apt-get", "upgrade", "-y", "-qq", "-o", "Dpkg::Use-Pty=0")
        count = len(re.findall(r"^Unpacking ", upgraded, re.M))
        out(f"    {count} packages upgraded")
    finally:
        subprocess.run(["umount", "-l", str(proc_dir)], check=False)

    # What an image needs no copy of.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/lintian/*",
                    "var/log/*.log", "var/log/apt/*", "var/cache/debconf/*-old", "var/lib/dpkg/*-old",
                    "tmp/*", "var/tmp/*", "debootstrap"):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != "lock" and path.name != "partial":
                path.unlink()
    for doc in (rootfs / "usr/share/doc").glob("*"):
        if doc.is_dir() and not doc.is_symlink():
            for item in doc.iterdir():
                if item.name != "copyright":
                    shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    for name in ("etc/resolv.conf", "etc/hostname", "etc/machine-id"):  # docker provides these
        path = rootfs / name
        if path.exists() and not path.is_symlink():
            path.write_text("")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def remove_rootfs(path: Path) -> None:
    for point in _mounts_under(path):  # e.g. /proc left mounted by a failed debootstrap
        subprocess.run(["umount", "-l", point], check=False)
    if not _mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)


def import_base(client: docker.DockerClient, rootfs: Path, tag: str, opts: BuildOptions,
                pems: list[str], workdir: Path) -> None:
    archive = workdir / "rootfs.tar"
    packed = subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=security.capability",
         "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*",
         "-C", str(rootfs), "-cf", str(archive), "."],
        capture_output=True, text=True,
    )
    if packed.returncode != 0:
        raise BuildError(f"packing the root file system failed: {packed.stderr.strip()[-2000:]}")
    changes = [f"ENV PATH={PATH}", "ENV LANG=C.UTF-8", 'CMD ["bash"]']
    if pems:
        # pip (its own certifi), requests and OpenSSL clients trust the extra CA too.
        changes += [f"ENV SSL_CERT_FILE={CA_FILE}", f"ENV REQUESTS_CA_BUNDLE={CA_FILE}", f"ENV PIP_CERT={CA_FILE}"]
    labels = _labels("debian-base", opts, pems)
    changes += [f'LABEL {key}="{value}"' for key, value in labels.items()]
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_file(str(archive), repository=repository, tag=version, changes=changes)
    archive.unlink()


def build_base(client: docker.DockerClient, tag: str, opts: BuildOptions, pems: list[str], out: Out) -> float:
    started = time.monotonic()
    check_can_debootstrap()
    check_mirror(opts.mirror, opts.suite, pems)
    workdir = Path(tempfile.mkdtemp(prefix="otree-lab-images-"))
    rootfs = workdir / "rootfs"
    try:
        out(f"  debootstrap {opts.suite} (minbase) from {opts.mirror}")
        debootstrap(opts, rootfs, out)
        prepare_rootfs(rootfs, opts, pems, out)
        out(f"  docker import -> {tag}")
        import_base(client, rootfs, tag, opts, pems, workdir)
    finally:
        remove_rootfs(rootfs)
        shutil.rmtree(workdir, ignore_errors=True)
    return time.monotonic() - started


# --- the images -----------------------------------------------------------------------


def _labels(image: str, opts: BuildOptions, pems: list[str]) -> dict[str, str]:
    return {
        LABEL: image,
        "org.otree-lab.debian-suite": opts.suite,
        "org.otree-lab.debian-mirror": opts.mirror,
        LABEL_CA: ca_fingerprint(pems),
        "org.otree-lab.built-by": "manage.py build_images",
    }


def build_context(image: str) -> io.BytesIO:
    """The directory beside this module as a build context (a tar in memory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted((HERE / image).iterdir()):
            info = tarfile.TarInfo(path.name)
            data = path.read_bytes()
            info.size = len(data)
            info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            info.mtime = 0  # the same files give the same context: the cache works
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def build_image(client: docker.DockerClient, image: str, tag: str, base: str, labels: dict[str, str],
                out: Out, nocache: bool) -> None:
    buildargs = {"BASE": base}
    buildargs.update({k: v for k, v in os.environ.items() if k in PROXY_VARS})
    tail: collections.deque[str] = collections.deque(maxlen=40)
    stream = client.api.build(fileobj=build_context(image), custom_context=True, tag=tag, buildargs=buildargs,
                              labels=labels, rm=True, forcerm=True, pull=False, nocache=nocache, decode=True)
    for chunk in stream:
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            raise BuildError(f"docker build of {tag} failed: {detail.strip()}\n" + "\n".join(tail))
        for line in chunk.get("stream", "").splitlines():
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if line.startswith("Step "):
                out(f"    {line[:150]}")


def _remove_container(container) -> None:
    try:
        container.remove(force=True, v=True)
    except (NotFound, APIError):
        pass


def _exec_ok(container, cmd: list[str]) -> tuple[bool, str]:
    result = container.exec_run(cmd)
    return result.exit_code == 0, result.output.decode(errors="replace").strip()


def check_image(client: docker.DockerClient, image: str, tag: str) -> str:
    """Start the new image; return what was measured. BuildError when it misbehaves."""
    labels = {CHECK_LABEL: image}
    if image == "python":
        try:
            output = client.containers.run(
                tag, ["sh", "-c", "python --version && pip --version && git --version"],
                remove=True, labels=labels, stderr=True)
        except DockerException as exc:
            raise BuildError(f"{tag} does not work: {exc}") from None
        text = output.decode(errors="replace")
        found = re.findall(r"^(Python|pip|git version) (\S+)", text, re.M)
        if len(found) != 3:
            raise BuildError(f"{tag}: python, pip or git missing:\n{text}")
        return ", ".join(f"{name.split()[0]} {ver}" for name, ver in found)

    if image == "netguard":  # the tools the node guard runs (it needs the node's network to apply rules)
        try:
            output = client.containers.run(
                tag, ["sh", "-c", "iptables-nft --version && iptables-legacy --version && python3 --version && "
                                  "python3 -c 'import psutil; print(\"psutil\", psutil.__version__)'"],
                remove=True, labels=labels, stderr=True)
        except DockerException as exc:
            raise BuildError(f"{tag} does not work: {exc}") from None
        text = output.decode(errors="replace")
        if text.count("iptables v") != 2 or "Python 3" not in text or "psutil" not in text:
            raise BuildError(f"{tag}: iptables, python3 or psutil missing:\n{text}")
        return "; ".join(line.strip() for line in text.splitlines() if line.strip())

    if image == "postgres":  # as an instance uses it
        env = {"POSTGRES_PASSWORD": secrets.token_urlsafe(12), "POSTGRES_USER": "check", "POSTGRES_DB": "check"}
        command = ["-c", "shared_buffers=16MB", "-c", "max_connections=30"]
        probe = ["pg_isready", "-q", "-h", "127.0.0.1"]
    elif image == "registry":
        env, command, probe = {}, None, ["healthcheck.sh"]  # GET /v2/ answers 200
    else:
        env, command, probe = {}, None, ["redis-cli", "ping"]
    os.sync()  # the build's own writeback is no part of a start
    times, user = [], ""
    for _ in range(3):
        seconds, user = _first_start(client, image, tag, command, env, probe, labels)
        times.append(seconds)
    probe_name = {"postgres": "pg_isready", "registry": "GET /v2/ 200"}.get(image, "redis-cli ping")
    return (f"first start: docker run -> {probe_name} in {sorted(times)[1]:.2f} s median of 3 "
            f"({', '.join(f'{t:.2f}' for t in times)}), runs as {user}")


def _first_start(client, image, tag, command, env, probe, labels) -> tuple[float, str]:
    started = time.monotonic()
    container = client.containers.run(tag, command, environment=env, labels=labels, detach=True)
    try:
        deadline = started + 60
        while True:
            ok, output = _exec_ok(container, probe)
            if ok and (image != "redis" or output == "PONG"):
                break
            container.reload()
            if container.status not in {"created", "running"} or time.monotonic() > deadline:
                logs = container.logs(tail=30).decode(errors="replace")
                raise BuildError(f"{tag} did not become ready (status {container.status}):\n{logs}")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        ok, user = _exec_ok(container, ["stat", "-c", "%U", "/proc/1"])
        if not ok or user in {"", "root"}:
            raise BuildError(f"{tag}: the server runs as {user or 'unknown'}, not as an unprivileged user")
        return seconds, user
    finally:
        _remove_container(container)


# --- the command ----------------------------------------------------------------------


def build_images(opts: BuildOptions, out: Out = print) -> list[Result]:
    try:
        return _build_images(opts, out)
    except DockerException as exc:  # the engine refused something: say what, no traceback
        raise BuildError(f"Docker: {exc}") from None


def _build_images(opts: BuildOptions, out: Out) -> list[Result]:
    total_started = time.monotonic()
    unknown = set(opts.only) - set(IMAGES)
    if unknown:
        raise BuildError(f"unknown image(s) {', '.join(sorted(unknown))}; choose from {', '.join(IMAGES)}")
    names = {**configured_names(), **opts.names}
    pems = read_ca_bundle(opts.ca_bundle) if opts.ca_bundle else []
    client = connect()
    version = client.version()
    out(f"Docker engine {version.get('Version')} (API {version.get('ApiVersion')}); "
        f"Debian {opts.suite} from {opts.mirror}"
        + (f"; extra CA bundle {opts.ca_bundle} ({len(pems)} certificates)" if pems else ""))

    results: list[Result] = []
    todo = []
    for image in IMAGES:
        if image not in opts.only:
            continue
        tag = names[image]
        if image_exists(client, tag) and not opts.force:
            out(f"{image}: {tag} exists, skipped")
            results.append(Result(image, tag, "skipped", size=client.images.get(tag).attrs.get("Size", 0)))
        else:
            todo.append(image)

    if todo:
        base = f"{BASE_REPOSITORY}:{opts.suite}"
        reason = ""
        if opts.force:
            reason = "--force"
        elif not image_exists(client, base):
            reason = "not built yet"
        elif pems and client.images.get(base).labels.get(LABEL_CA) != ca_fingerprint(pems):
            reason = "built without this extra CA bundle"  # (no bundle given: any base will do)
        if reason:
            out(f"base: building {base} ({reason})")
            seconds = build_base(client, base, opts, pems, out)
            size = client.images.get(base).attrs.get("Size", 0)
            out(f"base: {base} built in {seconds:.0f} s, {size / 2**20:.0f} MiB")
        else:
            out(f"base: {base} exists, reused")

        for image in todo:
            tag = names[image]
            out(f"{image}: building {tag} FROM {base}")
            started = time.monotonic()
            old = None
            try:
                old = client.images.get(tag)
            except ImageNotFound:
                pass
            build_image(client, image, tag, base, _labels(image, opts, pems), out, nocache=opts.force)
            seconds = time.monotonic() - started
            new = client.images.get(tag)
            if old is not None and old.id != new.id and LABEL in old.labels:
                try:  # the previous build of ours, now untagged
                    client.images.remove(old.id)
                except APIError:
                    pass  # still used by a container
            check = check_image(client, image, tag)
            size = new.attrs.get("Size", 0)
            out(f"{image}: {tag} built in {seconds:.0f} s, {size / 2**20:.0f} MiB; {check}")
            results.append(Result(image, tag, "built", seconds, size, check))

    out(f"done in {time.monotonic() - total_started:.0f} s: "
        + ", ".join(f"{r.image} {r.status}" for r in results))
    return results
