"""A real oTree 6 app for the bot-run tests and the benchmark, deployed the way an
instance deploys: the project (tests/bots_projects.py) is pushed into the instance's bare
repository and `instances.releases.deploy` builds its image (pip installs oTree), starts
it on Docker beside its own PostgreSQL and Redis and health-checks it.

Built once per test session (or benchmark run) and shared; the database rows that point
at it are recreated per test (`attach`) because transactional tests empty the tables.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from instances.git.repos import repo_path
from instances.models import Instance, Release
from instances.runtime import get_runtime
from tests import bots_projects, otree_projects


@dataclass
class DeployedOTree:
    name: str
    rest_key: str
    admin_password: str
    db_password: str
    image: str
    app_url: str  # the app's loopback URL


def deploy(owner, name: str = "bots-game", config_vars: dict[str, str] | None = None) -> DeployedOTree:
    """Deploy the bots project as instance `name` of `owner` (with these config vars, e.g.
    ESCAPE_TO); raise with the build log's end when it does not go live."""
    from instances import releases

    instance = Instance.objects.create(name=name, owner=owner, config_vars=config_vars or {})
    bare = otree_projects.init_bare(repo_path(name))
    checkout = otree_projects.Checkout(Path(tempfile.mkdtemp(prefix="bots-work-")), bare)
    commit = checkout.push(bots_projects.bots_project(), "the bots test project")
    release = Release.objects.create(instance=instance, number=1, commit=commit, status=Release.Status.QUEUED)
    release = releases.deploy(release.pk)
    if release.status != Release.Status.LIVE:
        raise RuntimeError(f"the bots test project did not deploy: {release.status_reason}\n{release.log[-3000:]}")
    instance.refresh_from_db()
    return DeployedOTree(name=name, rest_key=instance.rest_key, admin_password=instance.admin_password,
                         db_password=instance.db_password, image=release.image,
                         app_url=get_runtime().state(name).app_url)


def attach(deployed: DeployedOTree, owner, public_port: int | None = None) -> Instance:
    """Rows for an already running deployment (same name and secrets), with a live release."""
    instance = Instance.objects.create(
        name=deployed.name, owner=owner, rest_key=deployed.rest_key, admin_password=deployed.admin_password,
        db_password=deployed.db_password, status=Instance.Status.RUNNING, runtime="docker", public_port=public_port)
    Release.objects.create(instance=instance, number=1, commit="b" * 40, status=Release.Status.LIVE,
                           image=deployed.image, session_configs=bots_projects.SESSION_CONFIGS,
                           rooms=bots_projects.ROOMS, language_code="en")
    return instance


def remove(name: str) -> None:
    runtime = get_runtime()
    runtime.remove(name)
    for image in runtime.api.images(filters={"label": [f"org.otree-lab.manager={runtime.manager_id}",
                                                       f"org.otree-lab.instance={name}"]}):
        runtime.api.remove_image(image["Id"], force=True)
