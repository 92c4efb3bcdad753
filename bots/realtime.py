"""Realtime topic of a bot run: `botrun:<id>` for the owner of its instance and lab
managers. The run's worker pushes `botrun` events to the group (bots.engine)."""

from bots.models import BotRun
from instances.selectors import visible_instances
from manager.realtime import topics


def _run_topic(user, key):
    if not key.isdigit():
        return None
    run = BotRun.objects.filter(pk=int(key), instance__in=visible_instances(user)).first()
    return f"botrun.{run.pk}" if run else None


topics.register("botrun", _run_topic)
