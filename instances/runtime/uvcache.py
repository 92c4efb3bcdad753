"""Where each runtime keeps the builds' shared wheel cache (the design: instances/wheelcache.py).

Docker (and swarm, whose builds are Docker's): the volume `otree-lab-<manager id>-uvcache`
holds `uv` (the manager's pinned binary), `wheels/` and `index.json`. Build containers
mount it read-only at /opt/otree-lab-cache; app containers never mount it. The manager
writes it only through a container it creates and never starts (`put_archive`), and
prunes it with a container that runs `rm` of the files it names (no network, nothing of a
tenant's).

Process runtime: `LAB_DATA_DIR/venvs/.wheels/` (root 0755; wheels and index.json root
0644) and `uv` copied to `instances/.tools/uv` (root 0755); the manager writes them as
itself, build users and instances can only read them.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from instances import wheelcache

DOCKER_MOUNT = "/opt/otree-lab-cache"
LABEL_MANAGER = "org.otree-lab.manager"  # (docker.py's labels; not imported: docker.py imports this module)
PROMOTE_SECONDS = 60.0  # the most a build waits for the cache to take its new wheels


def _promote(index: dict, log_text: str, default_python, out, store, prune, folder: Path | None = None,
             own: set[str] = frozenset()) -> None:
    """The trusted side of a build: PyPI's verified wheels of what the build installed
    into the cache (`store(verified, new_index)`), then the size cap (`prune(names)`)."""
    packages = wheelcache.installed(log_text)
    python = wheelcache.build_python(log_text, default_python)
    cached = wheelcache.cached_releases(index)
    report = wheelcache.cache_report(packages, cached, own)
    if report:
        out(report)
    if not packages:
        return
    with tempfile.TemporaryDirectory(prefix=".lab-wheels-", dir=folder) as tmp:
        added, answered = wheelcache.fetch_verified(
            packages, python, have=set(index.get("wheels") or {}),
            have_releases=cached | set(index.get("looked_up") or {}), folder=Path(tmp),
            deadline=time.monotonic() + PROMOTE_SECONDS)
        if not added and not answered:
            return
        new_index = wheelcache.merged_index(index, added, answered)
        doomed = wheelcache.to_prune(new_index["wheels"], wheelcache.cap_bytes())
        for name in doomed:
            new_index["wheels"].pop(name, None)
        store(added, new_index)
        if doomed:
            prune(doomed)
            out(f"Wheel cache: removed {len(doomed)} old wheel(s) to stay under LAB_UV_CACHE_MB\n")
        wheelcache.summary(added, out)


def _news(index: dict, log_text: str) -> bool:
    """Whether the build installed a package the index has not looked up yet."""
    from packaging.utils import canonicalize_name

    known = wheelcache.cached_releases(index) | set(index.get("looked_up") or {})
    return any(f"{canonicalize_name(n)}=={v}" not in known for n, v in wheelcache.installed(log_text))


def _default_python() -> tuple[int, int, str]:
    import platform
    import sys

    return sys.version_info[0], sys.version_info[1], platform.machine()


MEMO_SECONDS = 300.0
_memo: dict = {}  # volume -> ((its creation time, uv's digest), index, when read)


class DockerWheelCache:
    def __init__(self, runtime):
        self.rt = runtime

    @property
    def volume(self) -> str:
        return f"otree-lab-{self.rt.manager_id}-uvcache"

    def binds(self) -> dict:
        return {self.volume: {"bind": DOCKER_MOUNT, "mode": "ro"}}

    def _labels(self) -> dict:
        return {LABEL_MANAGER: self.rt.manager_id, "org.otree-lab.instance": "", "org.otree-lab.component": "uvcache"}

    def _ensure_volume(self) -> str:
        from docker.errors import NotFound

        from .base import RuntimeError_

        api = self.rt.api
        try:
            vol = api.inspect_volume(self.volume)
        except NotFound:
            vol = self.rt._call(f"creating volume {self.volume}", api.create_volume, self.volume, driver="local",
                                labels=self._labels())
        if (vol.get("Labels") or {}).get(LABEL_MANAGER) != self.rt.manager_id:
            raise RuntimeError_(f"a Docker volume named {self.volume} exists that this manager did not create")
        return str(vol.get("CreatedAt") or "")

    @contextmanager
    def _writer(self, image: str):
        """A container that is never started, with the volume mounted writable at /cache:
        the manager's way to put files into the volume and read them back."""
        api = self.rt.api
        host_config = api.create_host_config(binds={self.volume: {"bind": "/cache", "mode": "rw"}},
                                             network_mode="none")
        cid = self.rt._call("creating the wheel cache's writer", api.create_container, image, command=["true"],
                            labels=self._labels(), host_config=host_config, network_disabled=True)["Id"]
        try:
            yield cid
        finally:
            try:
                api.remove_container(cid, force=True)
            except Exception:  # noqa: BLE001
                pass

    def _read_index(self, cid: str) -> dict:
        from docker.errors import NotFound

        try:
            stream, _ = self.rt.api.get_archive(cid, "/cache/index.json")
        except NotFound:
            return {}
        data = b"".join(stream)
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                member = tar.extractfile("index.json")
                index = json.loads(member.read()) if member else {}
        except (tarfile.TarError, KeyError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    @staticmethod
    def _tar(files: list[tuple[str, Path | bytes | None, int]], dest) -> None:
        with tarfile.open(fileobj=dest, mode="w") as tar:
            for arcname, source, mode in files:
                info = tarfile.TarInfo(arcname)
                info.uid = info.gid = 0
                info.mtime = int(time.time())
                info.mode = mode
                if source is None:
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif isinstance(source, bytes):
                    info.size = len(source)
                    tar.addfile(info, io.BytesIO(source))
                else:
                    info.size = source.stat().st_size
                    with open(source, "rb") as fh:
                        tar.addfile(info, fh)

    def _put(self, cid: str, files) -> None:
        with tempfile.TemporaryFile() as fh:
            self._tar(files, fh)
            fh.seek(0)
            self.rt._call("writing the wheel cache", self.rt.api.put_archive, cid, "/cache", fh)

    def _lock(self):
        from manager import locks

        return locks.lock(f"uvcache:{self.rt.manager_id}", wait=120)

    def prepare(self, image: str) -> dict:
        """The volume with the current `uv` and a wheels/ folder; returns its index (as
        this process last saw it, for up to MEMO_SECONDS: it only spares a look-up)."""
        created = self._ensure_volume()
        digest = wheelcache.uv_digest()
        memo = _memo.get(self.volume)
        if memo and memo[0] == (created, digest) and time.monotonic() - memo[2] < MEMO_SECONDS:
            return memo[1]
        index = self._prepare(image, digest)
        _memo[self.volume] = ((created, digest), index, time.monotonic())
        return index

    def _prepare(self, image: str, digest: str) -> dict:
        with self._writer(image) as cid:
            index = self._read_index(cid)
            if index.get("uv") == digest:
                return index
            with self._lock():
                index = self._read_index(cid)
                if index.get("uv") != digest:
                    index = {**index, "uv": digest}
                    self._put(cid, [("wheels", None, 0o755), ("uv", Path(wheelcache.uv_binary()), 0o755),
                                    ("index.json", json.dumps(index).encode(), 0o644)])
        return index

    def promote(self, image: str, log_text: str, out, known: dict | None = None) -> None:
        """`known`: the index as the build began (prepare()); when it has every package
        the build installed, nothing is written (and no writer container is made)."""
        if known is not None and not _news(known, log_text):
            report = wheelcache.cache_report(wheelcache.installed(log_text), wheelcache.cached_releases(known))
            if report:
                out(report)
            return
        try:
            with self._lock(), self._writer(image) as cid:
                index = self._read_index(cid)

                def store(added, new_index):
                    self._put(cid, [(f"wheels/{v.filename}", v.path, 0o644) for v in added]
                              + [("index.json", json.dumps(new_index).encode(), 0o644)])
                    memo = _memo.get(self.volume)
                    if memo:
                        _memo[self.volume] = (memo[0], new_index, memo[2])

                _promote(index, log_text, _default_python(), out, store, lambda names: self._prune(image, names))
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: the build stands
            out(f"Wheel cache not updated: {' '.join(str(exc).split())[:200]}\n")

    def _prune(self, image: str, names: list[str]) -> None:
        api = self.rt.api
        host_config = api.create_host_config(binds={self.volume: {"bind": "/cache", "mode": "rw"}},
                                             network_mode="none", cap_drop=["ALL"], cap_add=["CHOWN"],
                                             security_opt=["no-new-privileges"])
        argv = ["rm", "-f", "--"] + [f"/cache/wheels/{n}" for n in names if "/" not in n and not n.startswith(".")]
        cid = self.rt._call("pruning the wheel cache", api.create_container, image, command=argv, user="0:0",
                            labels=self._labels(), host_config=host_config, network_disabled=True)["Id"]
        try:
            api.start(cid)
            api.wait(cid, timeout=60)
        finally:
            api.remove_container(cid, force=True)

    def remove(self) -> None:
        from docker.errors import NotFound

        try:
            self.rt.api.remove_volume(self.volume, force=True)
        except NotFound:
            pass


class ProcessWheelCache:
    def __init__(self, runtime):
        self.rt = runtime

    @property
    def folder(self) -> Path:
        return self.rt.venvs_root / ".wheels"

    @property
    def wheels(self) -> Path:
        return self.folder / "wheels"

    @contextmanager
    def _lock(self):
        with open(self.rt.venvs_root / ".wheels.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_index(self) -> dict:
        try:
            index = json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def _write_index(self, index: dict) -> None:
        tmp = self.folder / f".index.{os.getpid()}"
        tmp.write_text(json.dumps(index))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.folder / "index.json")

    def prepare(self) -> tuple[dict, str]:
        """The wheelhouse (made when missing) and its index, and the path of `uv` the
        build users may run."""
        for path in (self.folder, self.wheels):
            path.mkdir(mode=0o755, exist_ok=True)
            if path.is_symlink() or path.stat().st_uid != os.geteuid():
                raise RuntimeError(f"{path} is not the manager's")
            os.chmod(path, 0o755)
        return self._read_index(), self.rt._tool(wheelcache.uv_binary())

    def own_wheels(self, name: str) -> Path:
        """The wheels this instance's own builds made from source (root's, mode 700: the build
        users serve every instance, so each of its builds gets a copy in its own work folder)."""
        return self.rt.dir(name) / "built-wheels"

    def own_releases(self, name: str) -> set[str]:
        keys = set()
        for path in self.own_wheels(name).glob("*.whl"):
            try:
                keys.add(wheelcache.release_key(path.name))
            except Exception:  # noqa: BLE001
                pass
        return keys

    def harvest(self, name: str, uv_cache: Path) -> None:
        """Keep the wheels a finished build made from sdists (in its private uv cache) for
        this instance's next builds only: regular files, no link followed, bounded. Their
        content is the instance's own build's: never shared with another instance."""
        import shutil
        import stat

        dest = self.own_wheels(name)
        tmp = dest.with_name(f".built-wheels.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)  # (root-only: each build gets a copy, instances.runtime.process)
        total = count = 0
        # (The build's processes are dead by now: nothing changes this tree while it is read.
        # No link anywhere on the way: a build could have replaced a folder with one.)
        # `uv_cache` is <work>/tmp/uv-cache, <work> the manager's (in root's venvs/).
        real = uv_cache.parent.parent.resolve() / uv_cache.parent.name / uv_cache.name
        tops = sorted(uv_cache.glob("sdists-v*")) if uv_cache.is_dir() and uv_cache.resolve() == real else []
        for top in tops:
            if top.resolve() != real / top.name:
                continue
            for dirpath, _, filenames in os.walk(top, followlinks=False):
                for filename in filenames:
                    if not filename.endswith(".whl") or count >= 200 or "/" in filename:
                        continue
                    try:
                        wheelcache.release_key(filename)
                        fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    except Exception:  # noqa: BLE001 - not a wheel's name, a link, gone
                        continue
                    with os.fdopen(fd, "rb") as src:
                        info = os.fstat(src.fileno())
                        if not stat.S_ISREG(info.st_mode) or total + info.st_size > 500 * 2**20:
                            continue
                        with open(tmp / filename, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                    os.chmod(tmp / filename, 0o644)
                    total += info.st_size
                    count += 1
        if dest.exists() and count == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)

    def promote(self, log_text: str, out, name: str = "") -> None:
        try:
            with self._lock():
                index = self._read_index()

                def store(added, new_index):
                    for v in added:
                        os.chmod(v.path, 0o644)
                        os.replace(v.path, self.wheels / v.filename)  # same file system: moved, not copied
                    self._write_index(new_index)

                def prune(names):
                    for n in names:
                        if "/" not in n and not n.startswith("."):
                            (self.wheels / n).unlink(missing_ok=True)

                _promote(index, log_text, self._python(), out, store, prune, folder=self.folder,
                         own=self.own_releases(name) if name else set())
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: the build stands
            out(f"Wheel cache not updated: {' '.join(str(exc).split())[:200]}\n")

    def _python(self) -> tuple[int, int, str]:
        import platform
        import subprocess

        version = subprocess.run([self.rt.python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
        if len(version) == 2:
            return int(version[0]), int(version[1]), platform.machine()
        return _default_python()
