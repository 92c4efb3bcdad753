"""Realtime topic of a bot run: `botrun:<id>` for the owner of its instance and lab
managers. The run's worker pushes `botrun` events to the group (bots.engine)."""

from bots.live import bots_of, run_event
from bots.models import BotRun
from instances.selectors import visible_instances
from manager.realtime import topics


def run_group(run_pk: int) -> str:
    """The group of a bot run's open pages: the only place its name is spelled."""
    return f"botrun.{run_pk}"


def _visible_run(user, key):
    return BotRun.objects.filter(pk=int(key), instance__in=visible_instances(user)).first() if key.isdigit() else None


def _run_topic(user, key):
    run = _visible_run(user, key)
    return run_group(run.pk) if run else None


def _run_snapshot(user, key):
    run = _visible_run(user, key)
    if run is None:
        return None
    bots = bots_of(run)
    return run_event(run, bots, bots)


topics.register("botrun", _run_topic, _run_snapshot)
