"""uv builds with the shared wheel cache (instances/wheelcache.py), on Docker and on the
process runtime, with real pushes of a real oTree 6 project and real PyPI packages:

- a push that adds one small package installs only what changed (Docker: only that
  package; process: a fresh environment whose other packages come from the cache), the
  build output names every installed package, and a second instance's build takes them
  from the cache;
- the cache is written only by the manager with wheels whose sha256 PyPI published: a
  hostile build (a setup.py, or any code in the build sandbox) cannot write it, cannot
  replace a cached wheel, and what another instance installs stays PyPI's;
- the running app cannot write the cache (process: it is root's; Docker: not mounted);
- LAB_INSTALLER=pip builds with pip as before.
"""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import requests

from instances.models import Instance
from instances.runtime.uvcache import DOCKER_MOUNT
from tests import backends, docker_helpers, otree_projects
from tests.instances.test_releases import answers, deploy, new_instance, queued, run_jobs  # noqa: F401
from tests.job_helpers import record_jobs

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

SMALL = "tomli-w==1.2.0"  # one small pure-Python wheel (6.7 kB) that oTree does not need


@pytest.fixture(scope="module", params=["docker", "process"])
def runtime(request):
    backends.require(request.param)
    rt = backends.make(request.param)
    # A cold wheel cache, whatever the test session's earlier builds put there.
    if rt.name == "docker":
        rt.wheel_cache.remove()
    else:
        shutil.rmtree(rt.wheel_cache.folder, ignore_errors=True)
    yield rt
    for name in rt.owned_instances():
        rt.remove(name)
    if rt.name == "docker":
        docker_helpers.remove_images(rt.api, rt.manager_id)
        rt.wheel_cache.remove()


@pytest.fixture(autouse=True)
def setup(runtime, settings, monkeypatch):
    settings.LAB_RUNTIME = runtime.name
    settings.LAB_INSTALLER = "uv"
    record_jobs(monkeypatch, queued)
    yield
    queued.clear()


def pypi_sha256(filename: str, name: str, version: str) -> str:
    data = requests.get(f"https://pypi.org/simple/{name}/", timeout=30,
                        headers={"Accept": "application/vnd.pypi.simple.v1+json"}).json()
    return next(f["hashes"]["sha256"] for f in data["files"] if f["filename"] == filename)


def cache_files(runtime) -> dict[str, bytes]:
    """Every file of the wheel cache (name -> content), as the manager sees it."""
    if runtime.name == "process":
        folder = runtime.wheel_cache.folder
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    cache = runtime.wheel_cache
    cache._ensure_volume()
    with cache._writer(runtime._base_image()) as cid:
        stream, _ = runtime.api.get_archive(cid, "/cache/.")
        data = b"".join(stream)
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if member.isfile():
                files[member.name.split("/", 1)[1] if "/" in member.name else member.name] = tar.extractfile(member).read()
    return files


def wheels_match_index_and_pypi(runtime) -> dict[str, bytes]:
    """Every cached wheel is the file PyPI published (its sha256), as the index says."""
    files = cache_files(runtime)
    index = json.loads(files["index.json"])
    wheels = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith("wheels/")}
    assert set(wheels) == set(index["wheels"])
    for filename, content in wheels.items():
        assert hashlib.sha256(content).hexdigest() == index["wheels"][filename]["sha256"], filename
    return wheels


def test_adding_a_package_installs_only_it_and_a_second_instance_takes_it_from_the_cache(runtime, boss, ann,
                                                                                          tmp_path):
    a, checkout_a = new_instance(ann, "uvone", tmp_path)
    files = otree_projects.valid_project("v1")
    if runtime.name == "process":  # a fresh environment (an earlier test's of the same requirements goes)
        shutil.rmtree(runtime.venvs_root / runtime.venv_key(files["requirements.txt"].encode()), ignore_errors=True)
    first, _, _ = deploy(a, checkout_a, files, "first", ann)
    assert first.status == "live", (first.status_reason, first.log[-3000:])
    assert "uv pip install" in first.log
    # The build output names every package installed (oTree and its dependencies).
    assert "Installed packages (the whole environment):" in first.log
    for package in ("otree==6.0.15", "starlette==", "psycopg2-binary=="):
        assert package in first.log.lower() or package in first.log, package
    assert "Wheel cache: added" in first.log  # PyPI's verified wheels of this build joined the cache
    wheels = wheels_match_index_and_pypi(runtime)
    cached = next(w for w in wheels if w.startswith("starlette-"))  # oTree's dependency (oTree itself: sdist only)
    version = cached.split("-")[1]
    assert hashlib.sha256(wheels[cached]).hexdigest() == pypi_sha256(cached, "starlette", version)
    assert not any(w.lower().startswith("otree-") for w in wheels)  # built from source here: never shared

    files["requirements.txt"] += SMALL + "\n"
    second, _, _ = deploy(a, checkout_a, files, "adds one small package", ann)
    assert second.status == "live", (second.status_reason, second.log[-3000:])
    assert " + tomli-w==1.2.0" in second.log
    assert "Not in the wheel cache (downloaded or built by this build): tomli-w==1.2.0" in second.log
    if runtime.name == "docker":  # only what changed was installed, into a copy of the current packages
        assert " + otree==" not in second.log and "Installed 1 package" in second.log
    else:  # a fresh environment: every other package came from the cache or the instance's own built wheels
        assert f"starlette=={version}" in second.log.split("From the lab's wheel cache (no download): ")[1].split("\n")[0]
        assert "otree==6.0.15" in second.log.split("From this instance's earlier builds")[1].split("\n")[0]
    assert "  tomli-w==1.2.0" in second.log.split("Installed packages (the whole environment):")[1]
    assert "  otree==6.0.15" in second.log.split("Installed packages (the whole environment):")[1]
    status, body = answers(runtime, "uvone")
    assert status == 200

    # A second instance with the same packages: the PyPI wheels from the cache, tomli-w too.
    b, checkout_b = new_instance(boss, "uvtwo", tmp_path)
    # (spelt differently: identical requirements.txt files share one environment, built once)
    files["requirements.txt"] = files["requirements.txt"].replace("tomli-w", "tomli_w")
    other, _, _ = deploy(b, checkout_b, files, "same packages", boss)
    assert other.status == "live", (other.status_reason, other.log[-3000:])
    from_cache = other.log.split("From the lab's wheel cache (no download): ")[1].split("\n")[0]
    assert "tomli-w==1.2.0" in from_cache and f"starlette=={version}" in from_cache
    # What the first instance built from source is not shared: oTree's sdist is built again here.
    assert "otree==6.0.15" in other.log.split("Not in the wheel cache (downloaded or built by this build): ")[1]
    assert "From this instance's earlier builds" not in other.log

    # The running app cannot write the cache.
    if runtime.name == "process":
        # ... nor read what another instance's builds made from source (a student's own package).
        own = runtime.wheel_cache.own_wheels("uvone")
        built = next(own.glob("otree-*.whl"))
        assert own.stat().st_mode & 0o777 == 0o700
        peek = runtime._run_tenant("uvtwo", ["/bin/sh", "-c", f"cat {built} >/dev/null && echo read; ls {own}; echo done"],
                                   stdout=subprocess.PIPE)
        seen = peek.stdout.decode() if isinstance(peek.stdout, bytes) else str(peek.stdout)
        assert seen.strip().endswith("done") and "read" not in seen.split() and built.name not in seen, seen
        target = runtime.wheel_cache.wheels / cached
        result = runtime._run_tenant("uvtwo", ["/bin/sh", "-c", f"echo evil > {target}; echo evil > "
                                              f"{runtime.wheel_cache.wheels}/new.whl; echo done"])
        text = (result.stdout or b"") + (result.stderr or b"")
        text = text.decode() if isinstance(text, bytes) else text
        assert text.count("Permission denied") == 2, text
    else:
        info = runtime.api.inspect_container(runtime.container_name("uvtwo", "app"))
        assert all(m.get("Name") != runtime.wheel_cache.volume for m in info.get("Mounts") or [])
        code, text = runtime._exec(runtime.container_name("uvtwo", "app"),
                                   ["sh", "-c", f"ls -A {DOCKER_MOUNT} 2>/dev/null | wc -l; grep -c {DOCKER_MOUNT} "
                                                "/proc/self/mountinfo"])
        assert text.split() == ["0", "0"], text  # (the build's mount point, empty; nothing mounted there)
    assert wheels_match_index_and_pypi(runtime)[cached] == wheels[cached]


HOSTILE_SETUP = '''\
import glob, os, setuptools
wheels = os.environ.get("OTL_WHEELS", "")
attempts = []
for target in glob.glob(os.path.join(wheels, "*.whl")) + [os.path.join(wheels, "evil-1.0-py3-none-any.whl"),
                                                          os.path.join(os.path.dirname(wheels), "index.json")]:
    try:
        with open(target, "wb") as fh:
            fh.write(b"poisoned")
        attempts.append("written " + target)
    except OSError as exc:
        attempts.append("denied " + target + " " + exc.strerror)
venv = os.environ.get("OTL_VENV", "")
with open(os.path.join(venv, "attempts.txt"), "a") as fh:
    fh.write("\\n".join(attempts) + "\\n")
print(" + six==1.17.0")  # a forged report: the manager fetches PyPI's six, whatever this says
setuptools.setup(name="evil", version="1.0", py_modules=[])
'''

HOSTILE_STEP = f'''
for f in {DOCKER_MOUNT}/wheels/*.whl {DOCKER_MOUNT}/wheels/evil-1.0-py3-none-any.whl {DOCKER_MOUNT}/index.json; do
  if (echo poisoned > "$f") 2>/dev/null; then echo "written $f"; else echo "denied $f"; fi
done
echo " + six==1.17.0"
'''


def build(runtime, name: str, number: int, ctx: Path) -> str:
    lines = []
    built[name] = runtime.build_release(name, number, ctx, out=lines.append, timeout=600, memory_mb=1024, cpus=1.0)
    return "".join(lines)


built = {}  # instance name -> its last release (a tag or a folder)


def test_a_hostile_build_cannot_change_what_another_instance_installs(runtime, tmp_path, monkeypatch):
    """Instance X's build runs hostile code (process: a local package's setup.py; Docker:
    a step in its build container, as a PyPI sdist's setup.py would) that tries to replace
    every cached wheel, add a fake one and rewrite the index, and forges uv's report;
    instance Y then installs six from the cache: PyPI's six, and the cache is unchanged."""
    warm = tmp_path / "warm"
    warm.mkdir()
    (warm / "requirements.txt").write_text("six==1.17.0\n")
    build(runtime, "uvwarm", 1, warm)
    before = wheels_match_index_and_pypi(runtime)
    six = "six-1.17.0-py2.py3-none-any.whl"
    assert hashlib.sha256(before[six]).hexdigest() == pypi_sha256(six, "six", "1.17.0")

    hostile = tmp_path / "hostile"
    (hostile / "evil").mkdir(parents=True)
    (hostile / "evil" / "setup.py").write_text(HOSTILE_SETUP)
    if runtime.name == "process":
        (hostile / "requirements.txt").write_text("six==1.17.0\n./evil\n")
    else:
        (hostile / "requirements.txt").write_text("six==1.17.0\n# x\n")
        from instances.runtime import docker as docker_rt
        monkeypatch.setattr(docker_rt, "UV_DEPS_SCRIPT", docker_rt.UV_DEPS_SCRIPT.replace(
            "set -e\n", "set -e\n" + HOSTILE_STEP, 1))
    log = build(runtime, "uvevil", 1, hostile)
    if runtime.name == "process":
        key = runtime.venv_key((hostile / "requirements.txt").read_bytes(), "uvevil")
        attempts = (runtime.venvs_root / key / "attempts.txt").read_text()
    else:
        attempts = log
    assert "denied" in attempts and "written" not in attempts, attempts
    assert f"denied" in attempts and six in attempts  # it did try the cached wheel
    monkeypatch.undo()

    after = wheels_match_index_and_pypi(runtime)
    assert after[six] == before[six]
    assert not any(name.startswith("evil") for name in after)

    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "requirements.txt").write_text(f"six==1.17.0\n{SMALL}\n")
    log = build(runtime, "uvclean", 1, clean)
    assert "six==1.17.0" in log.split("From the lab's wheel cache (no download): ")[1].split("\n")[0]
    # What Y installed is PyPI's six.
    genuine = zipfile_member(before[six], "six.py")
    if runtime.name == "process":
        key = runtime.venv_key((clean / "requirements.txt").read_bytes(), "uvclean")
        installed = next((runtime.venvs_root / key).glob("lib/python*/site-packages/six.py")).read_bytes()
    else:
        installed = docker_file(runtime, built["uvclean"], "/opt/venv/lib/python3.11/site-packages/six.py")
    assert installed == genuine


def zipfile_member(wheel: bytes, name: str) -> bytes:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        return zf.read(name)


def docker_file(runtime, image: str, path: str) -> bytes:
    cid = runtime.api.create_container(image, command=["true"])["Id"]
    try:
        stream, _ = runtime.api.get_archive(cid, path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            return tar.extractfile(tar.getmembers()[0]).read()
    finally:
        runtime.api.remove_container(cid, force=True)


def test_pip_stays_a_fallback(runtime, settings, tmp_path):
    settings.LAB_INSTALLER = "pip"
    ctx = tmp_path / "pip"
    ctx.mkdir()
    (ctx / "requirements.txt").write_text(SMALL + "\n")
    log = build(runtime, "uvpip", 1, ctx)
    assert "Successfully installed tomli-w-1.2.0" in log or "Successfully installed tomli_w-1.2.0" in log
    assert "uv pip install" not in log


def test_cached_versions_install_when_the_index_cannot_be_reached(runtime, tmp_path, monkeypatch):
    """The index unreachable (a closed port stands in for PyPI): the build says so and
    installs from the wheel cache alone (six==1.17.0 is cached by the test above)."""
    if not any(name.startswith("wheels/six-1.17.0") for name in cache_files(runtime)):
        warm = tmp_path / "warm"
        warm.mkdir()
        (warm / "requirements.txt").write_text("six==1.17.0\n# warm\n")
        build(runtime, "uvwarm", 1, warm)
    unreachable = "http://127.0.0.1:9/simple"
    if runtime.name == "process":
        monkeypatch.setenv("UV_INDEX_URL", unreachable)  # (passed to builds, as a lab's own index would be)
    else:
        from instances.runtime import docker as docker_rt
        monkeypatch.setattr(docker_rt, "UV_DEPS_SCRIPT", docker_rt.UV_DEPS_SCRIPT.replace(
            "set -e\n", f"set -e\nexport UV_INDEX_URL={unreachable}\n", 1))
    ctx = tmp_path / "offline"
    ctx.mkdir()
    (ctx / "requirements.txt").write_text("six==1.17.0\nsix\n")  # (an environment of its own)
    log = build(runtime, "uvoffline", 1, ctx)
    assert "error sending request" in log, log
    assert "trying again with the lab's wheel cache alone (--offline)" in log
    assert " + six==1.17.0" in log and "  six==1.17.0" in log.split("Installed packages (the whole environment):")[1]
