"""The hostile oTree project of issue 11: an experimenter's code that tries every escape.

It is a real oTree 6 project (pushed and deployed through the real pipeline by
tests/instances/test_hostile.py) whose three pieces of code each attack:

- **the build** — requirements.txt names `hostile-probe @ http://<outside host>/.../
  hostile_probe-1.0.tar.gz`, an sdist made by `sdist()` and served by an outside test host
  (tests/netns_helpers.outside_host). Its setup.py runs while pip builds it: every probe
  below, a fork bomb, and a look at its memory limits (cgroups, RLIMIT_AS — not an
  allocation: a build whose process is killed for memory fails, and this build must go
  live for the rest of the attack; the settings reader and the app allocate for real). It
  writes what it found into the package (hostile_probe/build_report.json, installed with
  it) and leaves a daemon (double fork, own session) that holds a .pth in the environment
  open and, once the build is over, writes code through it and calls home: a poisoned
  shared environment, if the daemon outlives the build;
- **the settings reader** — settings.py runs the probes when it is imported. In the
  manager's settings reader (introspection) it adds the fork bomb and the memory grab —
  the bomb only once its own app runs: where both share the instance's process budget, a
  bomb during the app's start would only fail its own deploy — and reports through the
  only channel that reader has, the rooms it lists: `hostile_summary` ("stage=settings
  tried=N violations=K uid=U ..."), `hostile_limits`, then one room per violation. In the
  app process its findings join the app's;
- **the app** — its app module runs the probes at import, prints each finding to the
  app's log (`@@HOSTILE@@{json}`), and adds routes to oTree's Starlette app:
  `GET /hostile/report` (everything this process and the build found) and
  `GET|POST /hostile/run/<probe>` for the attacks a test times itself: `all` (the probes
  again, with the targets posted), `forkbomb` (2000 processes held together), `memory`
  (past the instance's limit), `busy` (busy loops), `pth` (a .pth into its environment's
  site-packages), `metadata` (the process runtime's instance.json/state.json/spec.json
  rewritten, a process of its own session racing the supervisor on state.json, symlinks
  planted where the manager writes temporary files), `dblink` (its SQLite file replaced
  by a link to the manager's database; `?undo=1` puts its own file back), `traps` (in
  every folder of its own: symbolic links to the neighbour's folder and the manager's
  secrets, a hard link to the manager's key).

The probes (tests/hostile/probe.py, the package's code): its identity (root? capabilities?
the manager's or the neighbour's uid?); read and write each file and folder the test names
(the neighbour instance's tree, the manager's secrets, database, backups, repositories,
sockets' folders); connect to unix sockets (the neighbour's PostgreSQL and Redis, the
manager's Redis, git-hook socket, Caddy admin socket, the Docker socket) and TCP ports
(a listener of the host on 0.0.0.0 tried on every host address — loopback, eth0, the
Docker bridges and the instance's own networks' gateways —, one on 127.0.0.1 standing in
for the manager's web and SSH ports, the neighbour's app port and containers, the metadata
address 169.254.169.254), log in to the neighbour's PostgreSQL with its real password,
signal the neighbour's processes and read their environment; and the controls: its own
database and Redis, its own project files, the outside test host (the build always; the
app when LAB_EGRESS=open).

Each finding says whether the target was reached and what the test expects ("blocked",
"allowed", "info"); `probe.violations()` lists escapes that worked and controls that failed.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

from tests.otree_projects import OTREE_REQUIREMENT

PROBE_SOURCE = Path(__file__).with_name("probe.py")
SDIST_NAME = "hostile_probe-1.0.tar.gz"

SETUP_PY = '''\
"""hostile-probe: attacks from inside the build (see hostile_probe/__init__.py)."""
import json
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(HERE, "hostile_probe")
REPORT = os.path.join(PACKAGE, "build_report.json")

# pip runs this file several times per build (metadata, wheel): the attacks run once.
if not os.path.exists(REPORT):
    try:
        sys.path.insert(0, HERE)
        import hostile_probe

        targets = hostile_probe.load_targets(PACKAGE)
        found = hostile_probe.run_stage("build", limits=True, targets=targets)
        found.append(hostile_probe.start_build_daemon(targets))
    except BaseException as exc:  # the report says so; the build goes on
        found = [{"stage": "build", "probe": "setup.py", "target": "", "what": "", "reached": False,
                  "expect": "info", "detail": repr(exc)[:300]}]
    with open(REPORT, "w") as fh:
        json.dump(found, fh)

setup(name="hostile-probe", version="1.0", packages=["hostile_probe"],
      package_data={"hostile_probe": ["*.json"]})
'''

SETTINGS = '''\
import os
import sys
from os import environ

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import hostile_probe
except Exception:  # noqa: BLE001 - no probe, no report: the test sees the stage missing
    hostile_probe = None

if hostile_probe is None or "timeoutsubprocess" in sys.argv:
    _STAGE = None
elif sys.argv[:1] == ["-c"]:
    _STAGE = "settings"  # the manager's settings reader (python -c ...)
else:
    _STAGE = "app"
_FOUND = hostile_probe.run_stage(_STAGE, HERE, limits=_STAGE == "settings", echo=_STAGE == "app") if _STAGE else []


def _report_rooms(found):
    """The settings reader's only way out: the rooms it lists."""
    if not _STAGE:
        return []
    bad = hostile_probe.violations(found)
    who = next((f for f in found if f["probe"] == "identity"), {}).get("target", "")
    limits = "; ".join(f"{f['probe']}: {f['detail']}" for f in found if f["probe"] in ("wait", "forks", "memory"))
    rooms = [dict(name="hostile_summary",
                  display_name=f"stage={_STAGE} tried={len(found)} violations={len(bad)} {who}"[:200]),
             dict(name="hostile_limits", display_name=(limits or "none")[:200])]
    for i, item in enumerate(bad[:40]):
        text = f"{item['expect']} {item['probe']} {item['target']} ({item['what']}): {item['detail']}"
        rooms.append(dict(name=f"violation_{i:02d}", display_name=text[:200]))
    return rooms


SESSION_CONFIGS = [
    dict(name="hostile_game", display_name="Hostile game", app_sequence=["hostile"], num_demo_participants=1),
]
SESSION_CONFIG_DEFAULTS = dict(real_world_currency_per_point=1.00, participation_fee=0.00, doc="")
PARTICIPANT_FIELDS = []
SESSION_FIELDS = []
LANGUAGE_CODE = "en"
REAL_WORLD_CURRENCY_CODE = "USD"
USE_POINTS = True
ROOMS = [dict(name="online", display_name="Online")] + _report_rooms(_FOUND)
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = environ.get("OTREE_ADMIN_PASSWORD")
DEMO_PAGE_INTRO_HTML = ""
SECRET_KEY = "not-a-secret-hostile-key"
# VERSION_MARK
'''

APP = '''\
"""The hostile app: probes at import, and routes for the probes a test times itself."""
import json
import os

from otree.api import *  # noqa: F403

import hostile_probe as hp

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
hp.run_stage("app", PROJECT, echo=True)


def _on_demand(name, targets, query):
    stage = "app"
    if name == "all":
        found = hp.file_probes(stage, targets) + hp.network_probes(stage, targets)
        found += hp.neighbour_processes(stage, targets) + hp.own_services(stage)
    elif name == "forkbomb":
        found = [hp.fork_bomb(stage, int(query.get("n", 2000)), float(query.get("hold", 3)))]
    elif name == "memory":
        found = [hp.allocate(stage, int(query.get("mb", targets.get("allocate_mb", 1280))))]
    elif name == "busy":
        found = [hp.busy(stage, float(query.get("seconds", 6)), int(query.get("procs", 4)))]
    elif name == "pth":
        found = hp.plant_pth(stage, targets)
    elif name == "metadata":
        found = hp.rewrite_metadata(stage, targets, float(query.get("keep", 0)))
    elif name == "traps":
        found = hp.plant_tree_links(stage, targets)
    elif name == "dblink":
        found = hp.link_database(stage, targets, undo=query.get("undo") == "1")
    else:
        found = [hp.record(stage, "unknown", name, False, "no such probe", "info")]
    for item in found:
        print(hp.MARK + json.dumps(item), flush=True)
    return found


def _install_routes():
    import starlette.applications as sa
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def report(request):
        return JSONResponse({"findings": hp.FINDINGS, "build": hp.build_report(), "pid": os.getpid()})

    async def run(request):
        body = await request.body()
        targets = json.loads(body) if body else hp.load_targets(PROJECT)
        try:
            # In the event loop itself: an address-space limit may leave no room for a thread.
            found = _on_demand(request.path_params["name"], targets, dict(request.query_params))
        except Exception:  # noqa: BLE001 - the test shows why
            import traceback

            return JSONResponse({"error": traceback.format_exc()}, status_code=500)
        return JSONResponse({"findings": found})

    if getattr(sa.Starlette, "_hostile_routes", False):
        return
    original = sa.Starlette.__init__

    def init(self, *args, routes=None, **kwargs):
        ours = [Route("/hostile/report", report), Route("/hostile/run/{name}", run, methods=["GET", "POST"])]
        original(self, *args, routes=ours + list(routes or []), **kwargs)

    sa.Starlette.__init__ = init
    sa.Starlette._hostile_routes = True


_install_routes()


class C(BaseConstants):  # noqa: F405
    NAME_IN_URL = "hostile"
    PLAYERS_PER_GROUP = None
    NUM_ROUNDS = 1


class Subsession(BaseSubsession):  # noqa: F405
    pass


class Group(BaseGroup):  # noqa: F405
    pass


class Player(BasePlayer):  # noqa: F405
    pass


class MyPage(Page):  # noqa: F405
    pass


page_sequence = [MyPage]
'''

TEMPLATE = '''\
{{ block title }}Hostile{{ endblock }}
{{ block content }}
<p>nothing to see here</p>
{{ next_button }}
{{ endblock }}
'''


def requirements(sdist_url: str) -> str:
    return f"{OTREE_REQUIREMENT}\npsycopg2-binary\nhostile-probe @ {sdist_url}\n"


def project(targets: dict, sdist_url: str, version: str = "v1") -> dict[str, str]:
    """path -> content of the hostile oTree project (its targets at the top)."""
    return {
        "settings.py": SETTINGS.replace("VERSION_MARK", f"version {version}"),
        "requirements.txt": requirements(sdist_url),
        "Procfile": "web: otree prodserver1of2\nworker: otree prodserver2of2\n",
        "hostile_targets.json": json.dumps(targets, indent=1),
        "_static/global/empty.css": "",
        "hostile/__init__.py": APP,
        "hostile/MyPage.html": TEMPLATE,
    }


def sdist(targets: dict) -> bytes:
    """The hostile-probe source distribution (setup.py, the probes, the targets)."""
    files = {
        "setup.py": SETUP_PY,
        "PKG-INFO": "Metadata-Version: 2.1\nName: hostile-probe\nVersion: 1.0\n",
        "hostile_probe/__init__.py": PROBE_SOURCE.read_text(),
        "hostile_probe/hostile_targets.json": json.dumps(targets, indent=1),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"hostile_probe-1.0/{rel}")
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def settings_report(rooms: list[dict]) -> dict:
    """What the settings reader reported through the rooms: {summary, limits, violations}."""
    by_name = {room["name"]: room.get("display_name", "") for room in rooms or []}
    return {"summary": by_name.get("hostile_summary", ""), "limits": by_name.get("hostile_limits", ""),
            "violations": [text for name, text in sorted(by_name.items()) if name.startswith("violation_")]}
