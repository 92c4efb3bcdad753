"""Celery tasks of bot runs: the run itself (one task drives all its bots, as asyncio
tasks) and the minute sweep that resumes runs whose worker died."""

import asyncio
import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.utils import timezone

from bots import services
from bots.models import BotRun
from manager import locks

log = logging.getLogger(__name__)

TIME_MARGIN = 60  # seconds between the engine's own deadline and the task's soft time limit


@shared_task(name="bots.run", soft_time_limit=3600, time_limit=3660, acks_late=True)
def run_bots(run_id):
    """Drive bot run `run_id` (ids only: the API key is read from the database in the
    worker). Only one worker drives a run (its lock); a second delivery waits for a dead
    holder's lock to expire, then resumes the run, or leaves it to the holder."""
    from bots import engine  # the model client (openai) is loaded only by workers that run bots

    soft_limit = (run_bots.request.timelimit or (None, None))[0] or 3600
    budget = max(30, soft_limit - TIME_MARGIN)
    try:
        with locks.lock(f"botrun:{run_id}", wait=settings.LAB_LOCK_TTL + 15):
            asyncio.run(engine.execute(run_id, budget=budget))
    except locks.Busy:
        return  # another worker drives it
    except SoftTimeLimitExceeded:
        _fail(run_id, "stopped by the worker's time limit")
    except Exception as exc:  # noqa: BLE001 - the run always ends with a reason
        log.exception("bot run %s failed", run_id)
        _fail(run_id, f"the worker failed ({type(exc).__name__}); see the worker log")


def _fail(run_id, reason: str) -> None:
    changed = BotRun.objects.filter(pk=run_id, status__in=BotRun.ACTIVE).update(
        status=BotRun.Status.FAILED, status_reason=reason, finished_at=timezone.now())
    run = BotRun.objects.filter(pk=run_id).first()
    if changed and run is not None:
        services.push_run(run)


@shared_task(name="bots.sweep", soft_time_limit=50, time_limit=60)
def sweep():
    from bots import experiments

    result = services.sweep()
    result["experiments"] = experiments.sweep()  # release, stop or end what a lost pass left
    return result
