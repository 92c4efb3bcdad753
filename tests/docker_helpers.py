"""Helpers for tests (and benchmarks) that use the real Docker engine.

Everything here looks only at resources labelled with one manager id, the id a test run
makes up for itself, so it never touches anything else on the engine.
"""

from __future__ import annotations

import io
import secrets
import tarfile
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import docker
from docker.errors import APIError, NotFound

from instances.runtime.docker import LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGER
from tests.waits import wait_until


def api(timeout: float = 60) -> docker.APIClient:
    return docker.APIClient(version="auto", timeout=timeout, **docker.utils.kwargs_from_env())


def engine_ok() -> bool:
    try:
        return bool(api(timeout=5).ping())
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


def images_present(*images: str) -> bool:
    try:
        client = api(timeout=10)
        for image in images:
            client.inspect_image(image)
        return True
    except Exception:  # noqa: BLE001
        return False


def new_manager_id() -> str:
    return "t" + secrets.token_hex(5)


def _filters(manager_id: str, instance: str | None) -> dict:
    labels = [f"{LABEL_MANAGER}={manager_id}"]
    if instance is not None:
        labels.append(f"{LABEL_INSTANCE}={instance}")
    return {"label": labels}


def labelled(manager_id: str, instance: str | None = None, client: docker.APIClient | None = None) -> dict:
    """The containers, networks and volumes carrying our labels (raw API dicts)."""
    client = client or api()
    filters = _filters(manager_id, instance)
    return {
        "containers": client.containers(all=True, filters=filters),
        "networks": client.networks(filters=filters),
        "volumes": client.volumes(filters=filters).get("Volumes") or [],
    }


def purge(manager_id: str, timeout: float = 60) -> None:
    """Remove everything labelled with `manager_id` (test clean-up), in rounds: a container
    still being created is listed a moment before it can be removed. Its images (releases,
    dependencies) and its firewall chains go too."""
    from instances import netguard

    client = api()
    try:
        netguard.remove(manager_id)
    except netguard.NetguardError:
        pass  # no iptables here: nothing was applied

    def removed() -> bool:
        found = labelled(manager_id, client=client)
        for c in found["containers"]:
            _quietly(client.remove_container, c["Id"], force=True, v=True)
        for n in found["networks"]:
            _quietly(_remove_network, client, n["Id"])
        for v in found["volumes"]:
            _quietly(client.remove_volume, v["Name"], force=True)
        return not any(found.values())

    try:
        wait_until(removed, timeout, 0.3, f"the removal of everything labelled {manager_id}")
    except AssertionError:
        pass  # a clean-up: what the engine would not let go of stays, the run goes on
    remove_images(client, manager_id)


def remove_images(client: docker.APIClient, manager_id: str) -> None:
    """Release images first (they are built on the dependencies images), newest first (uv
    builds a dependencies image on the instance's previous one); a few rounds, for what a
    child image still held."""
    for _ in range(4):
        images = client.images(filters=_filters(manager_id, None))
        if not images:
            return
        images.sort(key=lambda image: ((image.get("Labels") or {}).get(LABEL_COMPONENT) != "release",
                                       -image.get("Created", 0)))
        for image in images:
            _quietly(client.remove_image, image["Id"], force=True)


def _quietly(fn, *args, **kwargs) -> None:
    """`fn(...)`, where gone or busy is fine: the next round of `purge` tries again."""
    try:
        fn(*args, **kwargs)
    except (NotFound, APIError):
        pass


def _remove_network(client: docker.APIClient, net_id: str) -> None:
    for cid in client.inspect_network(net_id).get("Containers") or {}:
        client.disconnect_container_from_network(cid, net_id, force=True)
    client.remove_network(net_id)


def http_get(url: str, timeout: float = 2) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc).encode()


def exec_in(client: docker.APIClient, container: str, cmd: list[str], env: dict | None = None,
            user: str = "") -> tuple[int, str]:
    eid = client.exec_create(container, cmd, environment=env, user=user)["Id"]
    out = client.exec_start(eid).decode(errors="replace")
    ended = wait_until(lambda: (info := client.exec_inspect(eid))["ExitCode"] is not None and info, 5, 0.05,
                       f"the exit code of {cmd} in {container}")
    return ended["ExitCode"], out


# --- builds: packages a test host serves, projects, the build's output -------------------------

def sdist(folder: Path, name: str, backend: str) -> str:
    """A source package whose build backend (in-tree, PEP 517, no requirements: nothing
    from PyPI) is `backend`: the code a hostile requirement runs during the build."""
    pyproject = '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    files = {"pyproject.toml": pyproject, "backend.py": backend,
             "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"}
    filename = f"{name}-1.0.tar.gz"
    with tarfile.open(folder / filename, "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-1.0/{path}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return filename


def wheel(folder: Path, name: str, value: str) -> str:
    filename = f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}/__init__.py": f"VALUE = {value!r}\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{name}-1.0.dist-info/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{name}-1.0.dist-info/RECORD"])
    with zipfile.ZipFile(folder / filename, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return filename


def project(tmp_path: Path, requirements: str, settings_py: str = "SESSION_CONFIGS = []\nROOMS = []\n") -> Path:
    ctx = tmp_path / f"ctx-{secrets.token_hex(4)}"
    ctx.mkdir()
    (ctx / "requirements.txt").write_text(requirements)
    (ctx / "settings.py").write_text(settings_py)
    return ctx


class Watch:
    """The build's `out`: keeps the log, and inspects the build container the first time
    output arrives (the container runs only during the build)."""

    def __init__(self, api, rt, name):
        self.api, self.rt, self.name = api, rt, name
        self.text, self.container, self.network = [], None, None
        self.lock = threading.Lock()

    def __call__(self, text):
        self.text.append(text)
        with self.lock:
            if self.container is None:
                found = self.api.containers(filters=self.rt._filters(self.name, **{LABEL_COMPONENT: "build"}))
                if found:
                    self.container = self.api.inspect_container(found[0]["Id"])
                    (net,) = self.container["NetworkSettings"]["Networks"]
                    self.network = self.api.inspect_network(net)

    @property
    def log(self) -> str:
        return "".join(self.text)
