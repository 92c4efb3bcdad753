"""What bot runs spent, and the caps they stop at: per run (`BotRun.budget_usd`), per
experiment (`BotExperiment.budget_usd`) and per experimenter and calendar month (UTC;
`User.bot_monthly_budget_usd`, else LAB_BOT_MONTHLY_BUDGET_USD).

Spending is the sum of `ModelCall.cost_usd` (tokens x the run's prices, copied when the run
was created; answers from the replay cache cost nothing), so a month counts the calls made
in it, whichever month their run started in."""

from __future__ import annotations

from datetime import timezone as dt_timezone

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from bots.models import BotExperiment, BotRun, ModelCall


def call_cost(prompt_tokens: int, completion_tokens: int, price_input: float, price_output: float) -> float:
    return (prompt_tokens * price_input + completion_tokens * price_output) / 1e6


def _sum(queryset) -> float:
    return float(queryset.aggregate(total=Sum("cost_usd"))["total"] or 0.0)


def run_spent(run: BotRun) -> float:
    return _sum(ModelCall.objects.filter(run_id=run.pk))


def experiment_spent(experiment: BotExperiment) -> float:
    return _sum(ModelCall.objects.filter(run__experiment_id=experiment.pk))


def month_start(now=None):
    now = (now or timezone.now()).astimezone(dt_timezone.utc)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def month_spent(user_id: int | None, now=None) -> float:
    if user_id is None:
        return 0.0
    return _sum(ModelCall.objects.filter(run__created_by_id=user_id, created_at__gte=month_start(now)))


def monthly_cap(user) -> float | None:
    """The user's monthly cap in USD (None: no cap)."""
    if user is None:
        return None
    if user.bot_monthly_budget_usd is not None:
        return user.bot_monthly_budget_usd
    return settings.LAB_BOT_MONTHLY_BUDGET_USD


def exhausted(run: BotRun, now=None) -> str:
    """Why `run` may not spend more ("" when it may): the first cap reached of its own, its
    experiment's and its starter's monthly one. Random-policy runs spend nothing."""
    if run.budget_usd is not None:
        spent = run_spent(run)
        if spent >= run.budget_usd:
            return f"the run's budget of ${run.budget_usd:g} was reached (${spent:.4f} spent)"
    if run.experiment_id is not None and run.experiment.budget_usd is not None:
        spent = experiment_spent(run.experiment)
        if spent >= run.experiment.budget_usd:
            return f"the experiment's budget of ${run.experiment.budget_usd:g} was reached (${spent:.4f} spent)"
    cap = monthly_cap(run.created_by)
    if cap is not None:
        spent = month_spent(run.created_by_id, now)
        if spent >= cap:
            return (f"{run.created_by.username}'s monthly bot budget of ${cap:g} was reached "
                    f"(${spent:.4f} spent this month)")
    return ""
