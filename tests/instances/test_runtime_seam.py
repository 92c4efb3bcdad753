"""The runtime seam: each backend is self-contained (importing one imports no other
backend, nor what only another backend uses — except what it declares it builds on: swarm
extends docker, Swarm being Docker's engine in swarm mode) and the interface speaks oTree, not Docker
(a third backend implements `base.Runtime` and nothing else)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instances.runtime import backend_class, backend_names
from instances.runtime.base import Runtime

ROOT = Path(__file__).resolve().parents[2]
MODULES = {name: f"instances.runtime.{name}" for name in backend_names()}  # a backend is one module of that name
# What a backend loads besides its module that no other backend may load.
ONLY = {
    "docker": {"docker"},  # the Docker SDK
    "process": {"instances.runtime.procsup", "instances.runtime.tenantfs", "instances.runtime.limits"},
    "swarm": set(),
}
EXTENDS = {"swarm": "docker"}  # a backend built on another one (its builds, images, engine client)
OWN = {name: {module, *ONLY.get(name, ())} for name, module in MODULES.items()}
DOCKER_WORDS = ("image", "container", "docker", "volume", "dockerfile")


def loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing `module` (and nothing else)."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "manager.settings"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_every_backend_has_its_module():
    assert set(ONLY) == set(backend_names())  # docker, process and swarm, nothing else (no helper module counts)
    for name, module in MODULES.items():
        assert backend_class(name).__module__ == module


def test_a_new_backend_is_its_file_alone(tmp_path):
    """Adding a backend is adding one file: with `fakeengine.py` in the package (and nothing
    else changed) LAB_RUNTIME accepts it at start-up and new instances get it."""
    (tmp_path / "fakeengine.py").write_text("class FakeRuntime:\n    name = 'fakeengine'\n\n\nBACKEND = FakeRuntime\n")
    code = ("import json, django, instances.runtime as r; r.__path__.append(%r); django.setup(); "
            "print(json.dumps([r.backend_names(), r.default_backend(), r.get_runtime().name]))" % str(tmp_path))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "manager.settings", "LAB_RUNTIME": "fakeengine"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [["docker", "fakeengine", "process", "swarm"],
                                                                 "fakeengine", "fakeengine"]
    # Without the file the same setting stops start-up with one sentence naming what exists.
    proc = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("error: LAB_RUNTIME must be auto or one of docker, process, swarm "
                                   "(a backend is a module of instances/runtime/), got 'fakeengine'")


@pytest.mark.parametrize("backend", sorted(MODULES))
def test_a_backend_imports_no_other_backend(backend):
    loaded = loaded_by(MODULES[backend])
    assert MODULES[backend] in loaded
    for other, modules in OWN.items():
        if other != backend and other != EXTENDS.get(backend):
            assert not (modules & loaded), f"{backend} imports {sorted(modules & loaded)} of the {other} backend"
    # Nor the release pipeline, the database or a page: a backend takes specs, not rows.
    assert "instances.build" not in loaded and "instances.models" not in loaded and "instances.releases" not in loaded


def test_the_project_knowledge_is_backend_neutral():
    loaded = loaded_by("instances.otree_project")
    assert not any(modules & loaded for modules in OWN.values())
    assert "instances.runtime.base" not in loaded  # it knows oTree, not runtimes
    source = (ROOT / "instances" / "otree_project.py").read_text()
    assert "LABEL_" not in source and "org.otree-lab" not in source


def interface_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(Runtime).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def test_the_interface_names_no_docker_concept():
    methods = interface_methods()
    assert {"build_release", "introspect", "ensure", "deploy_app", "release_exists", "prune_releases"} <= set(methods)
    for name, signature in methods.items():
        words = [name, *signature.parameters]
        assert not [w for w in words for bad in DOCKER_WORDS if bad in w.lower()], (name, words)


@pytest.mark.parametrize("backend", sorted(MODULES))
def test_a_backend_implements_the_whole_interface(backend):
    cls = backend_class(backend)
    for name, wanted in interface_methods().items():
        method = getattr(cls, name, None)
        assert callable(method), f"{backend} lacks {name}"
        params = list(inspect.signature(method).parameters)
        assert params[:len(wanted.parameters)] == list(wanted.parameters), (backend, name, params)
    for attr in ("name", "isolation", "limits_cpu"):
        assert hasattr(cls, attr), f"{backend} lacks {attr}"
