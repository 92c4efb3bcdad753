"""Where an instance runs (issue 15): the node of a swarm instance is recorded by the
reconciler (Instance.node, node_name), so its page and the API name it without asking the
swarm; the lab managers' dashboard lists the swarm's nodes (cached a few seconds).

The swarm tests run the real SwarmRuntime on this machine's swarm (a manager id of their
own, `uinodet`, so nothing of another run is counted or touched), and remove what they made.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client

from instances import services
from instances.models import Instance
from instances.reconciler import _node_of, reconcile
from instances.runtime import backend_class
from manager.accounts.services import create_token
from manager.dashboard import nodes as dashboard_nodes
from tests.conftest import ANN_PASSWORD, BOSS_PASSWORD, need
from tests.docker_helpers import engine_ok, images_present

MANAGER_ID = "uinodet"
NODE_ID = "q1w2e3r4t5y6u7i8o9p0a1s2d"  # the shape of a swarm node id (25 characters)


def _login(username: str, password: str) -> Client:
    client = Client()
    assert client.login(username=username, password=password)
    return client


def _api(user) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {create_token(user, name='node')[1]}")


def _runtime_text(page: str) -> str:
    start = page.index('id="runtime">') + len('id="runtime">')
    text = page[start:page.index("</dd>", start)]
    return " ".join(text.replace('<span title="the swarm node it runs on">', "").replace("</span>", "").split())


def test_json_and_page_name_the_node_of_a_swarm_instance(instance, ann):
    Instance.objects.filter(pk=instance.pk).update(runtime="swarm", node=NODE_ID, node_name="lab-node-2")
    body = _api(ann).get(f"/api/v1/instances/{instance.name}").json()
    assert body["runtime"] == "swarm" and body["node"] == NODE_ID
    page = _login("ann", ANN_PASSWORD).get(f"/instances/{instance.name}/").content.decode()
    assert _runtime_text(page) == f"swarm, node lab-node-2 ({NODE_ID[:12]})"


def test_an_instance_without_nodes_has_node_null_and_the_page_names_the_runtime_only(instance, ann):
    Instance.objects.filter(pk=instance.pk).update(runtime="docker", node="", node_name="")
    body = _api(ann).get(f"/api/v1/instances/{instance.name}").json()
    assert body["runtime"] == "docker" and body["node"] is None
    listed = _api(ann).get("/api/v1/instances").json()
    assert [i["node"] for i in listed] == [None]
    page = _login("ann", ANN_PASSWORD).get(f"/instances/{instance.name}/").content.decode()
    assert _runtime_text(page) == "docker"


def test_the_openapi_document_states_node(client):
    doc = client.get("/api/v1/openapi.json").json()
    schema = doc["components"]["schemas"]["InstanceOut"]
    assert "node" in schema["required"]
    node = schema["properties"]["node"]
    assert {alt.get("type") for alt in node["anyOf"]} == {"string", "null"}
    assert "swarm" in node["description"] and "null" in node["description"]


def test_runtimes_without_nodes_record_none():
    assert _node_of(backend_class("docker")(manager_id=MANAGER_ID), "uinode-x") == ""
    assert not hasattr(backend_class("process"), "node_of")


def _swarm():
    """The real swarm runtime of this machine's swarm, under this file's manager id."""
    need(engine_ok() and images_present(settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS),
         "a Docker engine with the images (python manage.py build_images)")
    try:  # the swarm tests' helper makes this machine's engine a swarm manager when it is none
        from tests.swarm_helpers import ensure_swarm
    except ImportError:
        ensure_swarm = None
    if ensure_swarm is not None:
        ensure_swarm()
    runtime = backend_class("swarm")(manager_id=MANAGER_ID)
    need(runtime.available(), "a Docker engine that is a swarm manager (docker swarm init)")
    return runtime


@pytest.mark.docker
def test_reconcile_records_the_node_and_the_dashboard_lists_the_nodes(boss, ann, settings):
    runtime = _swarm()
    settings.LAB_RUNTIME = "swarm"
    settings.LAB_MANAGER_ID = MANAGER_ID  # the dashboard asks the swarm as this manager
    instance = services.create_instance(boss, name="uinode-study", owner=ann)
    assert instance.runtime == "swarm" and instance.node == ""
    try:
        reconcile(instance.pk, runtime=runtime)
        instance.refresh_from_db()
        assert instance.status == Instance.Status.READY_FOR_CODE, instance.status_reason
        found = {n["id"]: n for n in runtime.nodes()}
        assert instance.node == runtime.node_of(instance.name) and instance.node in found
        here = found[instance.node]
        assert instance.node_name == here["hostname"] != ""

        # The page and the JSON name it from the row.
        body = _api(ann).get(f"/api/v1/instances/{instance.name}").json()
        assert body["runtime"] == "swarm" and body["node"] == instance.node
        page = _login("ann", ANN_PASSWORD).get(f"/instances/{instance.name}/").content.decode()
        assert _runtime_text(page) == f"swarm, node {here['hostname']} ({instance.node[:12]})"

        # The dashboard: every node of the real swarm, this instance counted on its node.
        dashboard_nodes.forget()
        page = _login("boss", BOSS_PASSWORD).get("/").content.decode()
        assert 'id="nodes"' in page and 'id="nodes-problem"' not in page
        for node in runtime.nodes():
            row = page[page.index(f'data-node="{node["id"]}"'):]
            row = row[:row.index("</tr>")]
            assert node["hostname"] in row and node["id"][:12] in row
            assert f">{node['state']}<" in row and f"<td>{node['availability']}</td>" in row
            assert f"<td>{node['instances']}</td>" in row
            gib = f"{node['reserved_mb'] / 1024:.1f} of {node['memory_mb'] / 1024:.1f} GiB"
            assert gib in row
            assert ("this machine" in row) == node["local"]
        assert here["instances"] >= 1 and here["reserved_mb"] >= 80  # its database and Redis reserve 64 + 16 MB
        # ann, an experimenter, never sees the nodes.
        page = _login("ann", ANN_PASSWORD).get("/").content.decode()
        assert 'id="nodes"' not in page and 'class="node"' not in page
    finally:
        runtime.remove(instance.name)
    assert runtime.node_of(instance.name) == ""


@pytest.mark.docker
def test_the_dashboard_says_so_when_the_swarm_does_not_answer(boss, settings, monkeypatch, tmp_path):
    """LAB_RUNTIME=swarm and an engine address where no engine answers: one sentence, the
    page still 200 and fast; the answer is cached (the second view does not ask again)."""
    settings.LAB_RUNTIME = "swarm"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    dashboard_nodes.forget()
    client = _login("boss", BOSS_PASSWORD)
    response = client.get("/")
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="nodes-problem"' in page and "The swarm does not answer" in page
    assert 'class="node"' not in page
    monkeypatch.undo()  # the engine is back; the cached answer stays a few seconds
    assert "The swarm does not answer" in client.get("/").content.decode()
    dashboard_nodes.forget()
    if _swarm():
        assert "The swarm does not answer" not in client.get("/").content.decode()
