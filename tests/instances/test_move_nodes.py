"""Moving an instance to another swarm node and draining a node (issue 15): lab managers
only; every refusal is one specific sentence, on the instance page's form (422) and in the
API (403/404/409/422); a drain pauses the node at once and a job moves its instances.

The swarm tests run the real SwarmRuntime on this machine's single-node swarm under a
manager id of their own (`mvtmove`: nothing of another run is counted or touched). The
availability of this machine's node is changed for real only briefly, and set back to
active in a `finally`. A real move needs a second node (the runtime's own tests do it).
"""

from __future__ import annotations

import pytest
from django.test import Client

from instances import reconciler, services
from instances.models import Backup, Instance
from instances.runtime import backend_class
from instances.tasks import move_instance as move_task
from manager.accounts.services import create_token
from manager.audit.models import AuditEvent
from manager.dashboard import nodes as dashboard_nodes
from manager.jobs.models import Job
from tests import backends
from tests.conftest import need
from tests.job_helpers import record_jobs, run_recorded

MANAGER_ID = "mvtmove"


def _page(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _api(user) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {create_token(user, name='move', throttled=False)[1]}")


def _move_page(client, name, node):
    return client.post(f"/instances/{name}/move/", {"node": node})


def _move_api(client, name, node):
    return client.post(f"/api/v1/instances/{name}/move", {"node": node}, content_type="application/json")


def _form_error(response) -> str:
    """The move form's error sentence(s) on the page that answered."""
    form = response.context["move_form"]
    return " ".join(str(e) for errors in form.errors.values() for e in errors)


def _nothing_started():
    assert not Job.objects.filter(kind__in=["instance.move", "node.drain"]).exists()
    assert not AuditEvent.objects.filter(action__in=["instance.move", "node.drain"]).exists()


# --- without a swarm: who may, which instances ------------------------------------------------

def test_experimenters_may_not_move_and_do_not_see_the_form(instance, ann, bob):
    Instance.objects.filter(pk=instance.pk).update(runtime="swarm", node="q1w2e3r4t5y6u7i8o9p0a1s2d")
    assert _move_page(_page(ann), instance.name, "x").status_code == 403
    assert _move_page(_page(bob), instance.name, "x").status_code == 403
    response = _move_api(_api(ann), instance.name, "x")
    assert response.status_code == 403
    assert response.json()["detail"] == "Only lab managers may move instances."
    assert _move_api(_api(bob), instance.name, "x").status_code == 404  # not visible to bob
    with pytest.raises(services.NotAllowed, match="^Only lab managers may move instances.$"):
        services.move_instance(ann, instance, "x")
    page = _page(ann).get(f"/instances/{instance.name}/").content.decode()
    assert 'id="move"' not in page and "Move to another node" not in page
    for url in ("/api/v1/nodes", "/api/v1/nodes/x/drain", "/api/v1/nodes/x/activate"):
        call = _api(ann).get if url == "/api/v1/nodes" else _api(ann).post
        assert call(url).status_code == 403, url
    for action in ("drain", "activate"):
        assert _page(ann).post(f"/nodes/x/{action}/").status_code == 403
    _nothing_started()


def test_an_instance_of_another_runtime_cannot_move(instance, boss):
    Instance.objects.filter(pk=instance.pk).update(runtime="docker", node="")
    sentence = ("ann-study runs on the docker runtime: only instances of the swarm runtime live on nodes and can "
                "move between them.")
    response = _move_page(_page(boss), instance.name, "q1w2e3r4t5y6u7i8o9p0a1s2d")
    assert response.status_code == 422 and _form_error(response) == sentence
    response = _move_api(_api(boss), instance.name, "q1w2e3r4t5y6u7i8o9p0a1s2d")
    assert response.status_code == 409 and response.json()["detail"] == sentence
    page = _page(boss).get(f"/instances/{instance.name}/").content.decode()
    assert 'id="move"' not in page  # the form is for swarm instances only
    _nothing_started()


def test_the_node_must_be_given_as_text(instance, boss):
    Instance.objects.filter(pk=instance.pk).update(runtime="swarm")
    response = _move_api(_api(boss), instance.name, "")
    assert response.status_code == 422 and "node" in response.json()["detail"]
    response = _api(boss).post(f"/api/v1/instances/{instance.name}/move", {"node": 5},
                               content_type="application/json")
    assert response.status_code == 422
    response = _move_page(_page(boss), instance.name, "")
    assert response.status_code == 422 and _form_error(response) == "Choose the node to move it to."
    _nothing_started()


# --- on this machine's swarm -------------------------------------------------------------------

@pytest.fixture
def swarm(settings):
    """The real swarm runtime of this machine (manager id mvtmove, LAB_RUNTIME=swarm),
    placing instances on this node; what the test made is removed."""
    backends.require("swarm")
    settings.LAB_RUNTIME = "swarm"
    settings.LAB_MANAGER_ID = MANAGER_ID
    runtime = backend_class("swarm")(manager_id=MANAGER_ID)
    need(runtime.available(), "a Docker engine that is a swarm manager (docker swarm init)")
    dashboard_nodes.forget()
    yield runtime
    for name in runtime.owned_instances():
        runtime.remove(name)
    dashboard_nodes.forget()


def _this_node(runtime) -> dict:
    return next(n for n in runtime.nodes() if n["local"])


@pytest.mark.docker
def test_refusals_on_the_swarm_same_and_unknown_node(swarm, boss, ann):
    instance = services.create_instance(boss, name="mvt-same", owner=ann)
    reconciler.reconcile(instance.pk, runtime=swarm)
    instance.refresh_from_db()
    here = _this_node(swarm)
    assert instance.node == here["id"] and instance.status == Instance.Status.READY_FOR_CODE
    Job.objects.all().delete()
    AuditEvent.objects.all().delete()

    # The page offers the other ready, active nodes only (here: none) and says what happens.
    page = _page(boss).get(f"/instances/{instance.name}/").content.decode()
    form = page[page.index('id="move"'):page.index("</form>", page.index('id="move"'))]
    assert f'value="{here["id"]}"' not in form
    text = " ".join(form.split())
    for words in ("down for a short time", "10–30 seconds", "backed up (the backup stays under Backups)",
                  "restored on the chosen node", "Nothing in the database is lost", "Redis is not moved"):
        assert words in text, words
    if len([n for n in swarm.nodes() if n["state"] == "ready" and n["availability"] == "active"]) == 1:
        assert 'id="move-none"' in form and 'type="submit"' not in form

    same = f"mvt-same runs on node {here['hostname']} already: choose another node."
    response = _move_page(_page(boss), instance.name, here["id"])
    assert response.status_code == 422 and _form_error(response) == same
    response = _move_api(_api(boss), instance.name, here["id"])
    assert response.status_code == 409 and response.json()["detail"] == f"node: {same}"

    unknown = ("There is no node 'nope0nope0nope0nope0nope0' in the swarm (the dashboard's Nodes table and "
               "GET /api/v1/nodes list them).")
    response = _move_page(_page(boss), instance.name, "nope0nope0nope0nope0nope0")
    assert response.status_code == 422 and _form_error(response) == unknown
    response = _move_api(_api(boss), instance.name, "nope0nope0nope0nope0nope0")
    assert response.status_code == 422 and response.json()["detail"] == f"node: {unknown}"
    _nothing_started()


@pytest.mark.docker
def test_a_failed_move_keeps_the_instance_where_it_was(swarm, boss, ann, monkeypatch):
    """The job's reconciler step, with a target the runtime refuses (the service would
    refuse it first): a `move` backup row made and marked failed (no dump was written),
    the job failed with the runtime's sentence, the instance reconciled on its node."""
    instance = services.create_instance(boss, name="mvt-fail", owner=ann)
    reconciler.reconcile(instance.pk, runtime=swarm)
    instance.refresh_from_db()
    node = instance.node
    queued = {}
    record_jobs(monkeypatch, queued)
    from manager.jobs import services as jobs

    job = jobs.start(jobs.task("instances.move_instance"), user=boss, kind="instance.move", label="Move mvt-fail",
                     args=[instance.pk, "nope0nope0nope0nope0nope0"])
    [job] = run_recorded(queued, "instance.move")
    assert job.status == Job.Status.FAILED
    assert job.message == "Move mvt-fail: mvt-fail: no node nope0nope0nope0nope0nope0 in the swarm"
    instance.refresh_from_db()
    assert instance.status == Instance.Status.READY_FOR_CODE and instance.node == node
    [backup] = Backup.objects.filter(instance=instance)
    assert backup.kind == Backup.Kind.MOVE and backup.status == Backup.Status.FAILED
    assert not backup.path.exists()
    assert move_task.job_time_limit == 1800


@pytest.mark.docker
def test_drain_and_activate_this_machines_node(swarm, boss, ann, monkeypatch):
    """Through the page and the API, for real: a drain pauses the node at once (no new
    instances there), a move to it is refused, the drain job finds no instance of this lab
    there and says so (the manager's own node stays paused); activate makes it active.
    Always set back to active."""
    here = _this_node(swarm)
    assert here["availability"] == "active", "this machine's node must be active to begin with"
    parked = Instance.objects.create(name="mvt-parked", owner=ann, runtime="swarm")  # no services: on no node
    queued = {}
    record_jobs(monkeypatch, queued)
    page = _page(boss)
    try:
        response = page.post(f"/nodes/{here['id']}/drain/")
        assert response.status_code == 302 and response["Location"] == "/"
        assert _this_node(swarm)["availability"] == "pause"
        dashboard = page.get("/").content.decode()
        row = dashboard[dashboard.index(f'data-node="{here["id"]}"'):]
        row = row[:row.index("</tr>")]
        assert "<td>pause</td>" in row and "node-activate" in row and "node-drain" in row
        assert "its instances move to other nodes one after another" in dashboard

        # No instance may move to a paused node: the page and the API say so.
        paused = (f"Node {here['hostname']} is paused (no new instances: it is being drained, or paused by hand): "
                  "no instance may move there until it is activated again (dashboard, Nodes).")
        response = _move_page(page, parked.name, here["id"])
        assert response.status_code == 422 and _form_error(response) == paused
        response = _move_api(_api(boss), parked.name, here["id"])
        assert response.status_code == 409 and response.json()["detail"] == f"node: {paused}"

        [job] = run_recorded(queued, "node.drain")
        assert job.status == Job.Status.SUCCEEDED, job.message
        assert job.message.startswith(f"node {here['hostname']}: no instances of this lab on it, nothing to move")
        assert "stays paused" in job.message
        assert _this_node(swarm)["availability"] == "pause"  # the manager's own node is never drained
        event = AuditEvent.objects.get(action="node.drain")
        assert event.actor == boss and event.data == {"node": here["id"], "hostname": here["hostname"]}

        response = _api(boss).post(f"/api/v1/nodes/{here['id']}/activate")
        assert response.status_code == 200 and response.json()["availability"] == "active"
        assert _this_node(swarm)["availability"] == "active"
        assert AuditEvent.objects.filter(action="node.activate").count() == 1

        # The API's drain, the page's activate.
        response = _api(boss).post(f"/api/v1/nodes/{here['id']}/drain")
        assert response.status_code == 202
        assert Job.objects.get(pk=response.json()["job"]).kind == "node.drain"
        assert _this_node(swarm)["availability"] == "pause"
        response = page.post(f"/nodes/{here['id']}/activate/")
        assert response.status_code == 302
        assert _this_node(swarm)["availability"] == "active"
    finally:
        if _this_node(swarm)["availability"] != "active":
            swarm.set_node_availability(here["id"], "active")
    listed = _api(boss).get("/api/v1/nodes").json()
    assert {n["id"] for n in listed} == {n["id"] for n in swarm.nodes()}
    assert next(n for n in listed if n["local"])["availability"] == "active"


@pytest.mark.docker
def test_unknown_nodes_are_404(swarm, boss):
    for url in ("/api/v1/nodes/nope/drain", "/api/v1/nodes/nope/activate"):
        response = _api(boss).post(url)
        assert response.status_code == 404
        assert response.json()["detail"].startswith("There is no node 'nope' in the swarm")
    for action in ("drain", "activate"):
        assert _page(boss).post(f"/nodes/nope/{action}/").status_code == 404
    _nothing_started()
