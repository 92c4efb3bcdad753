"""Rows to specs: what the backends are asked to run (`runtime.base.InstanceSpec` and
`AppSpec`), derived from the database. Backend-neutral: a release is named by its
reference (`Release.image`: whatever the backend's `build_release` returned) and started
as the project's oTree app (no command: each backend knows how, from
`instances.otree_project`)."""

from __future__ import annotations

import copy
from decimal import Decimal

from instances.models import Instance, Release
from instances.otree_project import APP_PORT
from instances.runtime.base import AppSpec, InstanceSpec


def app_of(release: Release) -> dict:
    """What runs for `release`: {image, port, release} (no command: the project's oTree app)."""
    return {"image": release.image, "port": APP_PORT, "release": release.pk}


def current_app(instance: Instance) -> dict | None:
    """What the app runs: `app_of()` the live release, or None before the first deploy."""
    live = Release.objects.filter(instance=instance, status=Release.Status.LIVE).exclude(image="").first()
    return app_of(live) if live is not None else None


def app_spec(instance: Instance, app: dict | None) -> AppSpec | None:
    """The AppSpec of `app` (an `app_of()` dict, or a test's own with its "command" and
    "user"); None without an app."""
    if app is None:
        return None
    return AppSpec(image=app["image"], command=app.get("command"), port=app.get("port", APP_PORT),
                   env=instance.otree_env(), release_id=str(app.get("release", "")), user=app.get("user"))


def instance_spec(instance: Instance, app: AppSpec | None = None) -> InstanceSpec:
    return InstanceSpec(
        name=instance.name, db_name=instance.db_name, db_user=instance.db_user, db_password=instance.db_password,
        memory_mb=instance.memory_mb, cpus=float(instance.cpus), app=app,
    )


def with_settings(instance: Instance, values: dict) -> Instance:
    """A copy of `instance` (never saved) with the app settings `values` (an
    `Instance.app_settings()` dict) in place of its own: what the app ran with before."""
    view = copy.copy(instance)
    for key in Instance.APP_SETTINGS:
        if key in values:
            setattr(view, key, Decimal(values[key]) if key == "cpus" else values[key])
    return view
