"""An instance's status: the one place that writes it and tells the browsers.

`set_status()` is the only writer of `Instance.status` (the reconciler, the releases, the
services call it; `tests/manager/test_layers.py` holds every other module to that), and the
`instance` event and the groups it goes to are built here only. Imports nothing of
`instances` but its models, so every layer above may use it.
"""

from __future__ import annotations

from instances.models import Instance
from manager.realtime.services import send_to_group, user_group
from manager.texts import storable

ALL_GROUP = "instances.all"  # every instance's status, for the lab managers' dashboard
REASON_MAX = 500  # characters of status_reason


def instance_group(instance_pk: int) -> str:
    """The group of one instance's open pages (topic `instance:<name>`)."""
    return f"instance.{instance_pk}"


def set_status(instance: Instance, status: str, reason: str = "", *, notify: bool = True, **fields) -> Instance:
    """Write the instance's status, its reason and any other `fields` (the reconciler's
    `runtime`, `node` and `node_name`: where it runs, as the pages show it) in one UPDATE, reload
    `instance` and (unless `notify=False`: the caller pushes once its transaction is
    done) tell every open page of it. The reason may quote a program (a crashed app's last
    lines): made storable."""
    Instance.objects.filter(pk=instance.pk).update(status=status, status_reason=storable(reason[:REASON_MAX]),
                                                   **fields)
    instance.refresh_from_db()
    if notify:
        push_state(instance)
    return instance


def state_event(instance: Instance) -> dict:
    """The `instance` event: its current status, as its pages and the dashboards show it."""
    return {"type": "instance", "name": instance.name, "status": instance.status,
            "status_label": instance.get_status_display(), "status_color": instance.status_color,
            "reason": instance.status_reason}


def deleted_event(name: str) -> dict:
    """The `instance` event once the instance is gone."""
    return {"type": "instance", "name": name, "status": "deleted", "status_label": "deleted",
            "status_color": "secondary", "reason": ""}


def push_state(instance: Instance) -> None:
    """Tell every open page of this instance (and the dashboards) its current status."""
    push_event(instance.pk, instance.owner_id, state_event(instance))


def push_event(instance_pk: int, owner_id: int, event: dict) -> None:
    """Send `event` to the instance's pages, the lab managers' dashboard and its owner's."""
    send_to_group(instance_group(instance_pk), event)
    send_to_group(ALL_GROUP, event)
    send_to_group(user_group(owner_id), event)
