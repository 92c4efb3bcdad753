"""Sleeping instances: an idle instance's app is stopped and wakes on the next request.

Desired state: `Instance.asleep`. `put_to_sleep()` sets it (the reconciler then stops the
app, and with LAB_SLEEP_DATABASES its PostgreSQL and Redis, and writes status `sleeping`);
`wake()` clears it, reconciles at once (everything started, the app answering HTTP) and
points the proxy at the app again. Both record when and why (`slept_at`/`sleep_reason`,
`woke_at`/`wake_reason`), which the instance page shows.

Who wakes an instance: the proxy (a request to its URL: HTTP or websocket, a participant,
the experimenter, the lobby's room links), the lobby and bot runs before they talk to the
app, a deploy, a restart, a backup of its data.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from instances.models import Instance

log = logging.getLogger(__name__)


def sleep_after(instance: Instance) -> int:
    """Minutes without a request after which `instance` sleeps (0 = never)."""
    if instance.sleep_after_minutes is not None:
        return instance.sleep_after_minutes
    return settings.LAB_SLEEP_AFTER_MINUTES


def put_to_sleep(instance_id: int, reason: str) -> Instance | None:
    """Mark the instance asleep (with `reason`) and let the reconciler stop it. None when it
    is gone or not running."""
    from instances.reconciler import reconcile

    with transaction.atomic():
        instance = Instance.objects.select_for_update().filter(pk=instance_id).first()
        if instance is None or instance.asleep or instance.status != Instance.Status.RUNNING:
            return None
        Instance.objects.filter(pk=instance_id).update(asleep=True, slept_at=timezone.now(),
                                                       sleep_reason=reason[:200])
    log.info("instance %s falls asleep: %s", instance.name, reason)
    return reconcile(instance_id)


def wake(name: str, why: str) -> Instance | None:
    """Wake instance `name` (`why`: what woke it, shown on its page) and return it once its
    app answers (status running), or as the reconciler left it. Does nothing to an instance
    that is not asleep. Blocks while the app starts (seconds)."""
    from instances import proxy
    from instances.reconciler import reconcile

    with transaction.atomic():
        instance = Instance.objects.select_for_update().filter(name=name).first()
        if instance is None:
            return None
        if not instance.asleep:
            return instance
        Instance.objects.filter(pk=instance.pk).update(asleep=False, woke_at=timezone.now(), wake_reason=why[:200],
                                                       last_request_at=timezone.now())
    log.info("instance %s wakes: %s", name, why)
    instance = reconcile(instance.pk)
    proxy.sync_routes(name)
    return instance
