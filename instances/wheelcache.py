"""The builds' shared wheel cache (both runtimes): how `uv` installs a project's
requirements in seconds without giving one tenant's build a way into another's.

Threat: a project's requirements.txt, every package it names and every setup.py that an
sdist runs are the student's code, and they run during the build. A cache that such code
could write (uv's own cache directory, say) would let instance X plant a fake
`django-4.2.x-py3-none-any.whl` that instance Y's next build installs.

Design (the same on Docker and on the process runtime):

- The shared cache is a flat folder of wheel files (a "wheelhouse"), owned and written by
  the manager only. Docker: the volume `otree-lab-<manager id>-uvcache` (it also holds the
  `uv` binary the builds run), mounted **read-only** into build containers and never into
  an app container; the manager writes it through a container it creates and never starts
  (`put_archive`). Process runtime: `LAB_DATA_DIR/venvs/.wheels/`, root 0755, files root
  0644: build users and instances can read it, nobody but the manager writes it.
- A build runs `uv pip install --find-links <wheelhouse>` in its sandbox (the build
  container, or the build user) with a **private** uv cache that is thrown away after the
  build. uv takes every wheel the wheelhouse has (no download) and fetches or builds only
  what is new; whatever the build's code writes lands in its private cache or its own
  environment.
- After a successful build the manager (trusted side, not the sandbox) takes the packages
  uv reported as installed (`+ name==version`), asks PyPI itself for that release
  (its simple index in JSON, `https://pypi.org/simple/<name>/`), downloads the release's wheels that fit
  the build's Python and machine from the URL PyPI names, checks each file's sha256
  against PyPI's digest, and only then adds it to the wheelhouse (written to a temporary
  name, then renamed). Nothing the build produced is ever copied: a wheel built locally
  from an sdist, a package from a local path, a URL or another index stays in that build;
  a forged `+ django==4.2` line in the output only makes the manager fetch the genuine
  Django 4.2 from PyPI. A file's name is PyPI's and is checked to be a wheel of the
  requested project and version.
- Wheels built from source (oTree itself is only an sdist on PyPI) are never shared. The
  process runtime keeps those an instance's own build made (copied by the manager from the
  finished build's private cache: regular files, no link followed) in the instance's
  root-owned folder for its next builds only; Docker builds a requirements push on the
  instance's current dependencies image, so what did not change is not installed again.
- Bounded: at most `LAB_UV_CACHE_MB` (default 4096); past it the oldest wheels go first
  (after each promotion). `uv` is the `uv` package pinned in requirements.txt (from PyPI);
  `LAB_INSTALLER=pip` turns all of this off and builds with pip as before.
- Offline: when PyPI cannot be reached, the build retries once with `--offline`, so
  requirements whose versions are all in the wheelhouse still install.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

PYPI = "https://pypi.org"
FILES_HOSTS = ("files.pythonhosted.org",)
MAX_WHEEL_BYTES = 300 * 2**20
MAX_PROMOTE = 200  # packages looked up per build at most (a forged output cannot make us fetch the world)
FETCH_TIMEOUT = 60.0

# uv's report of what it installed: " + name==version" (a package from a path or URL reads
# " + name==version (from file:///...)" and does not match).
INSTALLED = re.compile(r"^ \+ ([A-Za-z0-9][A-Za-z0-9._-]{0,99})==([A-Za-z0-9][A-Za-z0-9.+!_-]{0,63})\s*$", re.M)
# The line our build scripts print with the build's Python: "otree-lab-python 3.11 x86_64".
PYTHON_LINE = re.compile(r"^otree-lab-python (\d+)\.(\d+) ([a-z0-9_]{2,20})\s*$", re.M)
# uv's words when the index cannot be reached (then the build retries --offline).
NETWORK_TROUBLE = r"dns error|error sending request|Connection refused|connection timed out|operation timed out|" \
                  r"Could not connect|Network is unreachable|No route to host|failed to lookup address"


def uv_binary() -> str:
    """The `uv` program of the manager's environment (the `uv` package from PyPI)."""
    import uv

    return uv.find_uv_bin()


_uv_digest: tuple[str, str] | None = None


def uv_digest() -> str:
    global _uv_digest
    path = uv_binary()
    if _uv_digest is None or _uv_digest[0] != path:
        _uv_digest = (path, sha256_file(Path(path)))
    return _uv_digest[1]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed(text: str) -> list[tuple[str, str]]:
    """(name, version) of each package uv installed from an index (see INSTALLED)."""
    seen, result = set(), []
    for name, version in INSTALLED.findall(text):
        if (name.lower(), version) not in seen:
            seen.add((name.lower(), version))
            result.append((name, version))
    return result[:MAX_PROMOTE]


def build_python(text: str, default: tuple[int, int, str]) -> tuple[int, int, str]:
    found = PYTHON_LINE.findall(text)
    if not found:
        return default
    major, minor, machine = found[-1]
    return int(major), int(minor), machine


def compatible(filename: str, python: tuple[int, int, str]) -> bool:
    """Whether the wheel `filename` may install on CPython major.minor on Linux/`machine`
    (a generous check: uv checks the tags exactly; this only keeps useless files out)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    major, minor, machine = python
    try:
        _, _, _, tags = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        return False
    for tag in tags:
        interp, abi, plat = tag.interpreter, tag.abi, tag.platform
        if plat != "any" and not (plat.endswith(f"_{machine}") and plat.startswith("manylinux")):
            continue
        if interp in (f"py{major}", f"py{major}{minor}") and abi == "none":
            return True
        if interp == f"cp{major}{minor}" and abi in ("none", "abi3", f"cp{major}{minor}"):
            return True
        m = re.fullmatch(rf"cp{major}(\d+)", interp)
        if m and abi == "abi3" and int(m.group(1)) <= minor:
            return True
    return False


@dataclass
class Verified:
    filename: str
    path: Path  # a temporary file of the manager's with the checked content
    sha256: str
    size: int


def pypi_wheels(name: str, version: str, python: tuple[int, int, str], *, have: set[str], session=None) -> list[dict]:
    """PyPI's files of release name==version that fit `python` and are not in `have`."""
    import requests
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version

    http = session or requests
    # PyPI's simple index in JSON (PEP 691): the files uv itself chooses from, with sha256.
    resp = http.get(f"{PYPI}/simple/{canonicalize_name(name)}/", timeout=15,
                    headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    if resp.status_code != 200:
        return []
    files = []
    for entry in resp.json().get("files") or []:
        filename = str(entry.get("filename") or "")
        url = str(entry.get("url") or "")
        digest = str((entry.get("hashes") or {}).get("sha256") or "")
        if not filename.endswith(".whl") or "/" in filename or filename in have or entry.get("yanked"):
            continue
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not url.startswith(tuple(f"https://{h}/" for h in FILES_HOSTS)):
            continue
        try:
            dist, wheel_version, _, _ = parse_wheel_filename(filename)
            if canonicalize_name(dist) != canonicalize_name(name) or wheel_version != Version(version):
                continue
        except (InvalidVersion, ValueError):
            continue
        if compatible(filename, python):
            files.append({"filename": filename, "url": url, "sha256": digest})
    return files


def download_verified(entry: dict, folder: Path, *, session=None) -> Verified | None:
    """Download one PyPI file into `folder` (a temporary name); None unless its sha256 is
    the one PyPI published."""
    import requests

    http = session or requests
    digest = hashlib.sha256()
    size = 0
    tmp = folder / f".incoming-{os.getpid()}-{hashlib.sha256(entry['filename'].encode()).hexdigest()[:12]}"
    try:
        with http.get(entry["url"], stream=True, timeout=30, allow_redirects=False) as resp:
            if resp.status_code != 200:
                return None
            with open(tmp, "wb") as fh:
                for block in resp.iter_content(1 << 20):
                    size += len(block)
                    if size > MAX_WHEEL_BYTES:
                        raise ValueError("too large")
                    digest.update(block)
                    fh.write(block)
    except Exception:  # noqa: BLE001 - a failed download caches nothing
        tmp.unlink(missing_ok=True)
        return None
    if digest.hexdigest() != entry["sha256"]:
        tmp.unlink(missing_ok=True)
        log.warning("wheel cache: %s does not match PyPI's sha256: not cached", entry["filename"])
        return None
    return Verified(entry["filename"], tmp, entry["sha256"], size)


def fetch_verified(packages: Iterable[tuple[str, str]], python: tuple[int, int, str], *, have: set[str],
                   have_releases: set[str], folder: Path,
                   deadline: float) -> tuple[list[Verified], list[tuple[str, str]]]:
    """The verified PyPI wheels of `packages` missing from the cache (downloaded into
    `folder`, in parallel, until `deadline`), and the packages PyPI answered for.
    `have_releases`: "name==version" keys already looked up (nothing to ask PyPI)."""
    import requests
    from packaging.utils import canonicalize_name

    todo = [(n, v) for n, v in packages if f"{canonicalize_name(n)}=={v}" not in have_releases]
    if not todo:
        return [], []
    session = requests.Session()
    found: list[Verified] = []

    answered: list[tuple[str, str]] = []

    def one(package):
        if time.monotonic() > deadline:
            return None
        try:
            entries = pypi_wheels(*package, python, have=have, session=session)
        except Exception:  # noqa: BLE001 - PyPI unreachable: nothing cached, the build is fine
            return None
        got = [v for e in entries[:8] if time.monotonic() < deadline
               for v in [download_verified(e, folder, session=session)] if v]
        return got if len(got) == len(entries[:8]) else None  # a failed download: asked again next time

    with ThreadPoolExecutor(max_workers=8) as pool:
        for package, result in zip(todo, pool.map(one, todo)):
            if result is not None:
                answered.append(package)
                found.extend(result)
    session.close()
    return found, answered


def release_key(filename: str) -> str:
    """"name==version" of a wheel file (canonical name)."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    dist, version, _, _ = parse_wheel_filename(filename)
    return f"{canonicalize_name(dist)}=={version}"


def to_prune(entries: dict[str, dict], cap_bytes: int) -> list[str]:
    """Files to remove (oldest added first) so the cache holds at most `cap_bytes`."""
    total = sum(int(e.get("size", 0)) for e in entries.values())
    doomed = []
    for filename, entry in sorted(entries.items(), key=lambda item: item[1].get("added", 0)):
        if total <= cap_bytes:
            break
        total -= int(entry.get("size", 0))
        doomed.append(filename)
    return doomed


def cap_bytes() -> int:
    from django.conf import settings

    return settings.LAB_UV_CACHE_MB * 2**20


def summary(added: list[Verified], out: Callable[[str], None]) -> None:
    if added:
        out(f"Wheel cache: added {len(added)} wheel(s) checked against PyPI's sha256: "
            + ", ".join(v.filename for v in added[:20]) + (" …" if len(added) > 20 else "") + "\n")


# The install step of a uv build (ours, not the tenant's), run in the build's sandbox with
# OTL_UV (the uv program), OTL_PYTHON (the interpreter that makes the venv), OTL_VENV,
# OTL_WHEELS (the read-only wheelhouse), OTL_REQUIREMENTS and OTL_TMP (private) set;
# OTL_MORE_LINKS: "--find-links X ..." of the lab's own (PIP_FIND_LINKS), no spaces in them.
# `--exact`: an environment that already exists (Docker: the instance's previous
# dependencies) gets only what changed, and loses what requirements.txt no longer names.
UV_SCRIPT = r"""set -e
export HOME="$OTL_TMP" UV_CACHE_DIR="$OTL_TMP/uv-cache" UV_LINK_MODE=copy UV_NO_PROGRESS=1 UV_NO_CONFIG=1 \
  UV_PYTHON_DOWNLOADS=never UV_COLOR=never MALLOC_ARENA_MAX=2 UV_COMPILE_BYTECODE=1
# (MALLOC_ARENA_MAX: glibc's per-thread arenas would take uv past a build's address-space limit;
# UV_COMPILE_BYTECODE: .pyc files, as pip writes them: the app, which may not write them,
# would otherwise compile oTree and Django at every start and wake)
if [ -z "${SSL_CERT_FILE:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
fi
if [ ! -x "$OTL_VENV/bin/python" ]; then
  "$OTL_PYTHON" -m venv --without-pip "$OTL_VENV"
  if [ -n "${OTL_BASE_PTH:-}" ]; then
    purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
    "$OTL_PYTHON" -c "$purelib" > "$("$OTL_VENV/bin/python" -c "$purelib")/_base_image_packages.pth"
  fi
fi
"$OTL_VENV/bin/python" -c 'import platform, sys; print("otree-lab-python %d.%d %s" % (sys.version_info[0], sys.version_info[1], platform.machine()))'
echo "uv pip install -r requirements.txt (wheels in the lab's cache are used without a download)"
run() {
  { "$OTL_UV" pip install --exact --python "$OTL_VENV/bin/python" --find-links "$OTL_WHEELS" \
      --find-links "${OTL_OWN_WHEELS:-$OTL_WHEELS}" ${OTL_MORE_LINKS:-} "$@" \
      -r "$OTL_REQUIREMENTS" 2>&1; echo $? > "$OTL_TMP/uv.rc"; } | tee "$OTL_TMP/uv.log"
  return "$(cat "$OTL_TMP/uv.rc")"
}
if ! run; then
  if grep -qiE 'NETWORK_TROUBLE' "$OTL_TMP/uv.log"; then
    echo "The package index cannot be reached: trying again with the lab's wheel cache alone (--offline)"
    run --offline
  else
    exit "$(cat "$OTL_TMP/uv.rc")"
  fi
fi
echo "Installed packages (the whole environment):"
"$OTL_UV" pip freeze --python "$OTL_VENV/bin/python" | sed 's/^/  /'
""".replace("NETWORK_TROUBLE", NETWORK_TROUBLE)


def cache_report(packages: list[tuple[str, str]], cached: set[str], own: set[str] = frozenset()) -> str:
    """Lines for the build log: which of the installed packages came from the wheel cache
    (or from the wheels this instance's earlier builds made from source)."""
    from packaging.utils import canonicalize_name

    if not packages:
        return ""
    keys = [(f"{n}=={v}", f"{canonicalize_name(n)}=={v}") for n, v in packages]
    hits = [shown for shown, key in keys if key in cached]
    mine = [shown for shown, key in keys if key not in cached and key in own]
    misses = [shown for shown, key in keys if key not in cached and key not in own]
    text = ""
    if hits:
        text += f"From the lab's wheel cache (no download): {', '.join(hits)}\n"
    if mine:
        text += f"From this instance's earlier builds (built from source then, no rebuild): {', '.join(mine)}\n"
    if misses:
        text += f"Not in the wheel cache (downloaded or built by this build): {', '.join(misses)}\n"
    return text


def cached_releases(index: dict) -> set[str]:
    keys = set()
    for filename in (index.get("wheels") or {}):
        try:
            keys.add(release_key(filename))
        except Exception:  # noqa: BLE001
            pass
    return keys


def merged_index(index: dict, added: list[Verified], looked_up: list[tuple[str, str]]) -> dict:
    from packaging.utils import canonicalize_name

    now = time.time()
    wheels = dict(index.get("wheels") or {})
    for v in added:
        wheels[v.filename] = {"size": v.size, "sha256": v.sha256, "added": now}
    seen = dict(index.get("looked_up") or {})
    for name, version in looked_up:
        seen[f"{canonicalize_name(name)}=={version}"] = now
    if len(seen) > 5000:
        seen = dict(sorted(seen.items(), key=lambda item: item[1])[-5000:])
    return {**index, "wheels": wheels, "looked_up": seen}


def lab_find_links(value: str) -> str:
    """The lab's PIP_FIND_LINKS (space-separated, as pip reads it) as uv arguments: URLs
    and folders that exist; pip skips a missing folder with a warning, uv would fail."""
    args = []
    for entry in value.split():
        if entry.startswith(("http://", "https://", "file://")) or os.path.isdir(entry):
            args += ["--find-links", entry]
    return " ".join(args)
