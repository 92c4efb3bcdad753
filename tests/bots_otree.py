"""A real oTree 6 app for the bot-run tests and the benchmark, deployed the way an
instance deploys: the project (tests/bots_projects.py) is pushed into the instance's bare
repository and `instances.releases.deploy` builds its image (pip installs oTree), starts
it on Docker beside its own PostgreSQL and Redis and health-checks it.

Built once per test session (or benchmark run) and shared; the database rows that point
at it are recreated per test (`attach`) because transactional tests empty the tables.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
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
    with tempfile.TemporaryDirectory(prefix="bots-work-") as work:  # the pushed checkout: not needed after
        commit = otree_projects.Checkout(Path(work), bare).push(bots_projects.bots_project(), "the bots test project")
    release = Release.objects.create(instance=instance, number=1, commit=commit, status=Release.Status.QUEUED)
    release = releases.deploy(release.pk)
    if release.status != Release.Status.LIVE:
        raise RuntimeError(f"the bots test project did not deploy: {release.status_reason}\n{release.log[-3000:]}")
    instance.refresh_from_db()
    return DeployedOTree(name=name, rest_key=instance.rest_key, admin_password=instance.admin_password,
                         db_password=instance.db_password, image=release.image,
                         app_url=get_runtime().state(name).app_url)


@contextlib.contextmanager
def deployed_for_module(django_db_blocker, name: str, deployer: str,
                        config_vars: dict[str, str] | None = None) -> Iterator[DeployedOTree]:
    """A module-scoped deployment of the bots project as instance `name` (needs Docker and
    the images; fails in CI without them): deployed by a throw-away user `deployer` whose
    rows are gone again before the tests run (they recreate theirs with `attach`), removed
    with its containers and images at the end."""
    from django.conf import settings

    from manager.accounts.models import User
    from tests.conftest import need
    from tests.docker_helpers import engine_ok, images_present

    need(engine_ok() and images_present(settings.LAB_IMAGE_POSTGRES, settings.LAB_IMAGE_REDIS,
                                        settings.LAB_IMAGE_PYTHON),
         "a Docker engine with the images (python manage.py build_images)")
    with django_db_blocker.unblock():
        owner = User.objects.create_user(deployer, f"{deployer}@lab.test", "pw-deploy-123456")
        try:
            found = deploy(owner, name, config_vars)
        finally:
            Instance.objects.filter(name=name).delete()
            owner.delete()
    try:
        yield found
    finally:
        remove(name)


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
