"""The code's shape (issue 13): one writer of an instance's status; no import circles
(the graph of bench/imports.py).

Read with `ast` (nothing imported)."""

import ast
import importlib.util
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parents[2]
PACKAGES = ("manager", "instances", "lobby", "bots")
STATUS_FIELDS = {"status", "status_reason"}
WRITERS = {"update", "create", "get_or_create", "update_or_create", "bulk_create", "bulk_update"}


def _root(node):
    """The names along a call/attribute chain such as `Instance.objects.filter(...).update`."""
    names = []
    while True:
        if isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Name):
            names.append(node.id)
            return names
        else:
            return names


def status_writes(source: str) -> list[int]:
    """Lines that write an Instance's status: `Instance.objects...update(status=...)` (and
    create & co.), or `<instance>.status = ...` / `.status_reason = ...` on a name that
    holds an instance."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITERS:
            if "Instance" in _root(node.func.value) and STATUS_FIELDS & {k.arg for k in node.keywords}:
                lines.append(node.lineno)
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr in STATUS_FIELDS:
                owner = _root(target.value)
                if owner and "instance" in owner[0].lower():
                    lines.append(node.lineno)
    return sorted(lines)


def test_the_checker_sees_every_kind_of_status_write():
    source = (
        "Instance.objects.filter(pk=1).update(status='failed')\n"
        "Instance.objects.filter(pk=1).update(status_reason='x')\n"
        "Instance.objects.create(name='a', status='running')\n"
        "instance.status = 'running'\n"
        "self.instance.status_reason = 'x'\n"
        "Release.objects.filter(instance=instance).update(status='live')\n"  # a release: not counted
        "job.status = 'failed'\n"  # a job: not counted
    )
    assert status_writes(source) == [1, 2, 3, 4, 5]


def test_only_instances_state_writes_an_instances_status():
    found = {}
    for package in PACKAGES:
        for path in sorted((BASE_DIR / package).rglob("*.py")):
            if "migrations" in path.parts or path == BASE_DIR / "instances" / "state.py":
                continue
            lines = status_writes(path.read_text(encoding="utf-8"))
            if lines:
                found[str(path.relative_to(BASE_DIR))] = lines
    assert found == {}, "write an instance's status through instances.state.set_status()"


def _import_graph():
    spec = importlib.util.spec_from_file_location("bench_imports", BASE_DIR / "bench" / "imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    modules = module.collect_modules()
    edges = module.build_graph(modules)
    return module, modules, edges


def test_no_import_circle():
    """Not among the project's modules (module- or function-level imports)."""
    module, modules, edges = _import_graph()
    assert module.strongly_connected(sorted(modules), edges) == []


def test_the_layers_of_instances_and_bots():
    """The tasks are the top: services and releases enqueue them by name; the releases call
    the reconciler, never the other way; state and spec sit on the models; the bots'
    engine and services never import their tasks."""
    module, modules, edges = _import_graph()
    assert set(edges["instances.state"]) <= {"instances.models", "manager.realtime.services", "manager.texts"}
    for lower in ("instances.services", "instances.releases", "instances.reconciler"):
        assert "instances.tasks" not in edges[lower], f"{lower} imports the tasks"
    assert "instances.releases" not in edges["instances.reconciler"]
    assert not {"bots.tasks", "bots.engine"} & set(edges["bots.services"])


def test_the_import_graph_sees_function_level_imports():
    module, modules, edges = _import_graph()
    source = ("import os\nfrom instances import proxy\nif TYPE_CHECKING:\n    from bots import engine\n"
              "def f():\n    from instances.git import archive\n")
    found = [(ast.unparse(node), inside) for node, inside in module._imports(ast.parse(source))]
    assert found == [("import os", False), ("from instances import proxy", False),
                     ("from instances.git import archive", True)]


def test_the_supervisor_knows_no_app_and_labserver_wires_caddy(monkeypatch):
    module, modules, edges = _import_graph()
    assert not [target for target in edges["manager.supervisor"] if target.split(".")[0] in module.APPS]
    assert "manager.supervisor" not in edges["instances.proxy"]

    from instances import proxy
    from manager.management.commands import labserver
    from manager.supervisor import SupervisorError

    monkeypatch.setattr(proxy, "caddy_binary", lambda: None)
    with pytest.raises(SupervisorError, match="^the Caddy binary is missing"):
        labserver.caddy_spec().launch()  # a reason not to start, as the supervisor shows it


def test_the_shared_parts_of_manager_import_no_app():
    """Only the aggregation at the top (urls, API, asgi, dashboard, management commands)
    imports the apps: the live socket's consumer knows no domain (the apps register their
    topics and followers) and the routing serves what the apps register."""
    module, modules, edges = _import_graph()
    assert module.upward_imports(edges) == []


def test_each_app_registers_its_sockets_topics_and_followers():
    from manager.realtime import routing, topics

    assert [str(p.pattern) for p in routing.websocket_urlpatterns] == [
        "ws/live/", "ws/lobby/<slug:instance>/<str:room>/"]
    assert {"user", "instance", "instances", "lobby", "botrun"} <= set(topics._registry)
    assert list(topics._followers) == ["follow_logs", "follow_release"]
