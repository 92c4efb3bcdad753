"""Every rule about providers and bot runs: who may do what, what is valid, what is
recorded. Views, the API and tasks call these; nothing else writes bot data."""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from bots import budget
from bots.live import bots_of, run_event
from bots.models import RANDOM_POLICY, Bot, BotRun, Provider
from bots.realtime import run_group
from instances.models import Instance
from instances.selectors import can_see, next_number
from manager import locks, throttle
from manager.accounts.services import NotAllowed
from manager.audit.services import record
from manager.jobs import services as jobs
from manager.realtime.services import send_to_group
from manager.texts import check_text

log = logging.getLogger(__name__)

LIMITS = {
    "num_participants": (1, 500),
    "num_bots": (1, 200),
    "rate_limit": (1, 6000),
    "concurrency": (1, 200),
    "time_limit_minutes": (1, 24 * 60),
}
TEMPERATURE_RANGE = (0, 2)
MAX_INSTRUCTIONS = 4000
STALE_SECONDS = 60  # a running run whose heartbeat is older than this lost its worker
QUEUED_PATIENCE = timedelta(minutes=2)  # a queued run not picked up by then is enqueued again
MAX_DELIVERIES = 20  # a run whose worker died this often is failed
MAX_BUDGET = 100000.0  # USD, a run's cap at most
MAX_SEED = 2**63 - 1


# --- providers ------------------------------------------------------------------------------

def parse_models(text: str) -> list[dict]:
    """"gpt-4o-mini 0.15 0.60" per line (name, USD per million input and output tokens;
    prices optional) -> [{name, input_per_million, output_per_million}]."""
    found, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        name, prices = parts[0], parts[1:]
        if len(name) > 100 or len(prices) > 2:
            errors.append(f"line {number}: write the model name and at most two prices")
            continue
        try:
            values = [float(p) for p in prices] + [0.0] * (2 - len(prices))
        except ValueError:
            errors.append(f"line {number}: prices must be numbers (USD per million tokens)")
            continue
        if any(v < 0 for v in values):
            errors.append(f"line {number}: prices cannot be negative")
            continue
        if name == RANDOM_POLICY:
            errors.append(f"line {number}: {RANDOM_POLICY!r} is the built-in offline policy, not a model name")
            continue
        found.append({"name": name, "input_per_million": values[0], "output_per_million": values[1]})
    if errors:
        raise ValidationError({"models": errors})
    if not found:
        raise ValidationError({"models": ["name at least one model the provider offers"]})
    if len({m["name"] for m in found}) != len(found):
        raise ValidationError({"models": ["a model is listed twice"]})
    return found


def models_text(provider: Provider) -> str:
    return "\n".join(f"{m['name']} {m.get('input_per_million', 0):g} {m.get('output_per_million', 0):g}"
                     for m in provider.offered_models)


def save_provider(actor, provider: Provider | None, *, name: str, base_url: str, api_key: str | None,
                  models: str, response_format: str, timeout_seconds: int, requests_per_minute: int,
                  enabled: bool, request=None) -> Provider:
    """Create (provider None) or change a provider. `api_key` None or "" keeps the stored key
    on a change; the key is never returned or recorded."""
    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may configure model providers.")
    check_text(name, field="name", label="The name", single_line=True)
    check_text(base_url, field="base_url", label="The base URL", single_line=True)
    if api_key:  # sent in an HTTP header of every model request
        check_text(api_key, field="api_key", max_length=500, label="The API key", single_line=True)
    check_text(models, field="models", max_length=10000, label="The list of models")
    creating = provider is None
    provider = provider or Provider(created_by=actor)
    provider.name = name.strip()
    provider.base_url = base_url.strip().rstrip("/")
    provider.offered_models = parse_models(models)
    provider.response_format = response_format
    provider.timeout_seconds = timeout_seconds
    provider.requests_per_minute = requests_per_minute
    provider.enabled = enabled
    if api_key:
        provider.api_key = api_key.strip()
    provider.full_clean(exclude=["api_key"])
    provider.save()
    record(actor, "bots.provider_create" if creating else "bots.provider_update", provider,
           f"{'added' if creating else 'changed'} the model provider {provider.name} ({provider.base_url})"
           + (" with a new API key" if api_key and not creating else ""), request)
    return provider


def delete_provider(actor, provider: Provider, request=None) -> None:
    if not actor.is_superuser:
        raise NotAllowed("Only lab managers may configure model providers.")
    record(actor, "bots.provider_delete", provider, f"deleted the model provider {provider.name}", request)
    provider.delete()  # runs keep its name (provider_name); running ones fail at their next start


def model_options(user=None) -> list[tuple[str, str]]:
    """(value, label) for the "model" choice: "<provider id>:<model>" per enabled provider's
    model, and the offline random policy."""
    options = [(RANDOM_POLICY, "random — the offline random policy (no model, no cost)")]
    for provider in Provider.objects.filter(enabled=True):
        for m in provider.offered_models:
            options.append((f"{provider.pk}:{m['name']}", f"{provider.name} · {m['name']}"))
    return options


def resolve_model(choice: str, provider_name: str | None = None) -> tuple[Provider | None, str]:
    """("<provider id>:<model>" | "random") or (model, provider name) -> (provider, model)."""
    check_text(choice or "", field="model", max_length=200, label="The model", single_line=True)
    if provider_name is not None:
        check_text(provider_name, field="provider", max_length=60, label="The provider", single_line=True)
    choice = (choice or "").strip()
    if choice == RANDOM_POLICY and not provider_name:
        return None, RANDOM_POLICY
    if provider_name is not None:
        provider = Provider.objects.filter(name=provider_name).first()
        model = choice
    else:
        pid, _, model = choice.partition(":")
        provider = Provider.objects.filter(pk=int(pid)).first() if pid.isdigit() else None
    if provider is None:
        known = ", ".join(Provider.objects.filter(enabled=True).values_list("name", flat=True)) or "none configured"
        raise ValidationError({"provider": [f"there is no such model provider (providers: {known})"]})
    if not provider.enabled:
        raise ValidationError({"provider": [f"the provider {provider.name} is disabled"]})
    if model not in provider.model_names:
        raise ValidationError({"model": [f"{provider.name} offers no model {model!r} "
                                         f"(models: {', '.join(provider.model_names)})"]})
    return provider, model


# --- runs -----------------------------------------------------------------------------------

def _check(actor, instance: Instance) -> None:
    if not can_see(actor, instance):
        raise NotAllowed("Only the owner or a lab manager may run bots on this instance.")


def create_run(actor, instance: Instance, *, session_config: str, num_participants: int, num_bots: int,
               provider: Provider | None, model: str, temperature: float = 1.0, instructions: str = "",
               memory: str = BotRun.Memory.SUMMARY, rate_limit: int = 60, concurrency: int = 10,
               time_limit_minutes: int = 60, budget_usd: float | None = None, use_cache: bool = False,
               seed: int | None = None, source: BotRun | None = None, request=None) -> BotRun:
    """Record a run (queued) and enqueue its worker task once the transaction commits.
    `budget_usd`: the run's cap (None: none); `use_cache`: the replay cache; `seed`: sent to
    the provider; `source`: the run this one runs again."""
    _check(actor, instance)
    check_text(session_config, field="session_config", max_length=100, label="The session config", single_line=True)
    check_text(model, field="model", max_length=100, label="The model", single_line=True)
    check_text(instructions or "", field="instructions", max_length=MAX_INSTRUCTIONS, label="The instruction text")
    errors: dict[str, list[str]] = {}
    live = instance.live_release
    if live is None:
        raise ValidationError({"session_config": ["the instance has no live release: deploy your project first"]})
    names = [c.get("name") for c in live.session_configs or []]
    if session_config not in names:
        errors["session_config"] = [f"no session config {session_config!r} in the live release "
                                    f"(configs: {', '.join(names) or 'none'})"]
    values = {"num_participants": num_participants, "num_bots": num_bots, "rate_limit": rate_limit,
              "concurrency": concurrency, "time_limit_minutes": time_limit_minutes}
    for key, value in values.items():
        low, high = LIMITS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            errors[key] = [f"must be a whole number from {low} to {high}"]
    if "num_bots" not in errors and "num_participants" not in errors and num_bots > num_participants:
        errors["num_bots"] = [f"at most the number of participants ({num_participants})"]
    low, high = TEMPERATURE_RANGE
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not low <= temperature <= high:
        errors["temperature"] = [f"must be a number from {low} to {high}"]
    if memory not in BotRun.Memory.values:
        errors["memory"] = [f"must be one of {', '.join(BotRun.Memory.values)}"]
    if budget_usd is not None and (not isinstance(budget_usd, (int, float)) or isinstance(budget_usd, bool)
                                   or not 0 < budget_usd <= MAX_BUDGET or budget_usd != budget_usd):
        errors["budget_usd"] = [f"must be a positive number of US dollars (at most {MAX_BUDGET:g}), or empty"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
        errors["seed"] = [f"must be a whole number from 0 to {MAX_SEED}, or empty"]
    if errors:
        raise ValidationError(errors)
    if provider is not None:  # the offline policy costs nothing
        spent_reason = monthly_refusal(actor)
        if spent_reason:
            raise ValidationError({"budget_usd": [spent_reason]})
    price_in, price_out = provider.price(model) if provider else (0.0, 0.0)
    with throttle.take("bot_run", actor, instance):  # a run not recorded gives its slot back
        return _record_run(actor, instance, request, session_config=session_config,
                           num_participants=num_participants, num_bots=num_bots, provider=provider, model=model,
                           temperature=temperature, instructions=instructions, memory=memory,
                           rate_limit=rate_limit, concurrency=concurrency, time_limit_minutes=time_limit_minutes,
                           price_in=price_in, price_out=price_out,
                           extra={"budget_usd": float(budget_usd) if budget_usd is not None else None,
                                  "use_cache": bool(use_cache), "seed": seed, "source": source})


def _record_run(actor, instance, request, *, session_config, num_participants, num_bots, provider, model,
                temperature, instructions, memory, rate_limit, concurrency, time_limit_minutes, price_in,
                price_out, extra=None) -> BotRun:
    extra = extra or {}
    for _attempt in range(5):
        try:
            with transaction.atomic():
                number = next_number(instance, BotRun)
                run = BotRun.objects.create(
                    instance=instance, number=number, created_by=actor, session_config=session_config,
                    num_participants=num_participants, num_bots=num_bots, provider=provider,
                    provider_name=provider.name if provider else "", model=model, temperature=float(temperature),
                    instructions=instructions or "", memory=memory, rate_limit=rate_limit, concurrency=concurrency,
                    time_limit_minutes=time_limit_minutes, price_input=price_in, price_output=price_out,
                    session_label=f"lab-bots-{instance.name}-{number}-{secrets.token_hex(4)}", **extra)
                source = extra.get("source")
                record(actor, "bots.run_start", instance,
                       f"started bot run #{number} on {instance.name}: {session_config}, {num_bots} of "
                       f"{num_participants} participants as bots, {run.provider_name or 'random policy'} "
                       f"{model if provider else ''}".strip()
                       + (f" (running #{source.number} again)" if source is not None else ""), request)
                enqueue(run)
            return run
        except IntegrityError:  # two runs numbered at once: take the next number
            continue
    raise ValidationError("could not number the run; try again")


def monthly_refusal(user) -> str:
    """Why `user` may not start a model run now ("" when they may): their monthly cap is spent."""
    cap = budget.monthly_cap(user)
    if cap is None:
        return ""
    spent = budget.month_spent(user.pk)
    if spent < cap:
        return ""
    return (f"{user.username}'s monthly bot budget of ${cap:g} is spent (${spent:.4f} this month); "
            "a lab manager can raise it on the account's page")


def rerun(actor, run: BotRun, *, use_cache: bool | None = None, request=None) -> BotRun:
    """A new run with `run`'s parameters, seed, instructions, provider, model and budget (a
    standalone run: its manifest says which run it runs again). `use_cache` None keeps the
    source's setting."""
    _check(actor, run.instance)
    if run.purpose != BotRun.Purpose.PLAY:
        raise ValidationError("only bot runs can be run again (a preflight is started from its own page)")
    if run.is_random:
        provider, model = None, RANDOM_POLICY
    else:
        if run.provider is None:
            raise ValidationError({"provider": [f"the provider {run.provider_name!r} of run #{run.number} no "
                                                "longer exists"]})
        provider, model = resolve_model(run.model, provider_name=run.provider.name)
    new = create_run(actor, run.instance, session_config=run.session_config, num_participants=run.num_participants,
                     num_bots=run.num_bots, provider=provider, model=model, temperature=run.temperature,
                     instructions=run.instructions, memory=run.memory, rate_limit=run.rate_limit,
                     concurrency=run.concurrency, time_limit_minutes=run.time_limit_minutes,
                     budget_usd=run.budget_usd, use_cache=run.use_cache if use_cache is None else bool(use_cache),
                     seed=run.seed, source=run, request=request)
    if run.factors:
        BotRun.objects.filter(pk=new.pk).update(factors=run.factors)
        new.factors = run.factors
    return new


def task_limits(run: BotRun) -> tuple[int, int]:
    """(soft, hard) Celery time limits of the run's task: what is left of its time limit."""
    left = (run.deadline - timezone.now()).total_seconds() if run.started_at else run.time_limit_minutes * 60
    soft = int(max(60, left + 90))  # the engine stops itself at the deadline; this is the backstop
    return soft, soft + 60


def enqueue(run: BotRun) -> None:
    run_bots = jobs.task("bots.run")
    soft, hard = task_limits(run)
    run_id = run.pk
    transaction.on_commit(lambda: run_bots.apply_async(args=[run_id], soft_time_limit=soft, time_limit=hard))


def stop_run(actor, run: BotRun, request=None) -> BotRun:
    """Ask the run to stop: its worker stops every bot at its next safe point. A run no
    worker holds (queued, or its worker died) is stopped here at once."""
    _check(actor, run.instance)
    if not run.is_active:
        return run
    BotRun.objects.filter(pk=run.pk).update(stop_requested=True)
    run.refresh_from_db()
    record(actor, "bots.run_stop", run.instance, f"stopped bot run #{run.number} on {run.instance.name}", request)
    if not _held(run):
        _finish_unheld(run)
        run.refresh_from_db()
    return run


# --- ending a run (its worker, or the web process when no worker holds it) ------------------

def set_run(run: BotRun, **fields) -> None:
    for key, value in fields.items():
        setattr(run, key, value)
    BotRun.objects.filter(pk=run.pk).update(**fields)


def stop_text(run: BotRun) -> str:
    if run.stop_requested:
        return "stopped on request"
    return f"the time limit of {run.time_limit_minutes} min was reached"


WOKE = "the instance was asleep: woken for this run"  # (engine.app_access) kept in the run's final reason


def _with_woke(run: BotRun, reason: str) -> str:
    return f"{WOKE}; {reason}" if run.status_reason.startswith(WOKE) and not reason.startswith(WOKE) else reason


def finish(run: BotRun, stopped_reason: str) -> None:
    bots = list(run.bots.all())
    now = timezone.now()
    stopped_reason = _with_woke(run, stopped_reason) if stopped_reason else stopped_reason
    if stopped_reason:
        Bot.objects.filter(run=run).exclude(status__in=Bot.DONE).update(status=Bot.Status.STOPPED,
                                                                       reason=stopped_reason[:500])
        set_run(run, status=BotRun.Status.STOPPED, status_reason=stopped_reason[:500], finished_at=now)
        return
    gave_up = [b for b in bots if b.status == Bot.Status.GAVE_UP]
    finished = sum(b.status == Bot.Status.FINISHED for b in bots)
    reason = f"{finished} of {len(bots)} bots finished"
    if gave_up:
        reason += f"; {len(gave_up)} gave up (bot {gave_up[0].index}: {gave_up[0].reason})"
    set_run(run, status=BotRun.Status.FINISHED, status_reason=_with_woke(run, reason)[:500], finished_at=now)


def _held(run: BotRun) -> bool:
    return locks.held(f"botrun:{run.pk}")


def _finish_unheld(run: BotRun) -> None:
    with transaction.atomic():
        run = BotRun.objects.select_for_update().get(pk=run.pk)
        if run.is_active:
            finish(run, stop_text(run))
    push_run(run)


def push_run(run: BotRun) -> None:
    """Send the run's whole state to its open pages (from synchronous code)."""
    run.refresh_from_db()
    bots = bots_of(run)
    send_to_group(run_group(run.pk), run_event(run, bots, bots))
    run_ended(run)


_run_end_hooks: list = []  # bots.experiments registers its scheduler pass here (it imports this module)


def on_run_end(hook) -> None:
    _run_end_hooks.append(hook)


def run_ended(run: BotRun) -> None:
    """A run of an experiment ended: its scheduler releases the next runs. Never raises:
    a failed pass is redone by the minute sweep."""
    if run.experiment_id is None or run.is_active:
        return
    for hook in _run_end_hooks:
        try:
            hook(run)
        except Exception:  # noqa: BLE001
            log.exception("after the end of bot run %s", run.pk)


def sweep(now=None) -> dict:
    """Level-triggered repair (Celery beat, every minute): a run whose worker died (stale
    heartbeat, lock gone) or whose message was lost (queued too long) is enqueued again and
    resumes where its bots are; a stop request without a worker ends the run; a run past its
    time limit, or whose worker died too often, ends with the reason."""
    now = now or timezone.now()
    result = {"resumed": [], "ended": []}
    for run in BotRun.objects.filter(status__in=BotRun.ACTIVE).select_related("instance"):
        if _held(run):
            continue
        beat = run.heartbeat_at or run.created_at
        stale = beat < now - timedelta(seconds=STALE_SECONDS)
        if run.status == BotRun.Status.QUEUED and beat > now - QUEUED_PATIENCE:
            continue
        if run.status != BotRun.Status.QUEUED and not stale:
            continue
        if run.stop_requested or (run.started_at and run.deadline < now):
            _finish_unheld(run)
            result["ended"].append(run.pk)
        elif run.deliveries >= MAX_DELIVERIES:
            BotRun.objects.filter(pk=run.pk).update(
                status=BotRun.Status.FAILED, finished_at=now,
                status_reason=f"its worker stopped {run.deliveries} times without finishing; see the worker log")
            push_run(run)
            result["ended"].append(run.pk)
        else:
            with transaction.atomic():
                BotRun.objects.filter(pk=run.pk).update(heartbeat_at=now)  # not enqueued twice by the next sweep
                enqueue(run)
            result["resumed"].append(run.pk)
    return result


def get_run(user, name: str, number: int) -> BotRun:
    """Run `number` of instance `name`, if the user may see the instance (else Http404)."""
    from django.http import Http404

    from instances.selectors import get_visible_instance

    instance = get_visible_instance(user, name)
    run = instance.bot_runs.select_related("instance", "instance__owner", "created_by", "provider").filter(
        number=number).first()
    if run is None:
        raise Http404(f"{name} has no bot run #{number}.")
    return run

