"""Bot experiments: a design (models x temperatures x instruction variants x memory modes x
repetitions) expanded into bot runs that a scheduler releases a few at a time.

- `normalise_design` checks a design (one clear error per bad field, keyed as the page and
  the API name it) and returns it in its stored form (what "Run again" repeats);
- `create_experiment` records the experiment and all its runs (WAITING) in one transaction;
- `schedule` is the level-triggered pass: it releases WAITING runs (-> QUEUED, enqueued)
  while fewer than `max_parallel` runs of the experiment are active, stops the remaining
  ones at the experiment's budget or on request, and ends the experiment when no run is
  left. It runs when a run of the experiment ends (`services.run_ended`) and every minute
  (`services.sweep`), so a lost message or a killed worker is healed by the next pass.
  Runs resume after a crash as single runs do (their recorded answers are sent again,
  never asked again);
- `stop_experiment`, `rerun_experiment`, `progress`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, Sum
from django.utils import timezone

from bots import budget, services
from bots.models import RANDOM_POLICY, Bot, BotExperiment, BotRun
from instances.models import Instance
from instances.selectors import next_number, visible_instances
from manager import locks, throttle
from manager.audit.services import record
from manager.realtime import topics
from manager.realtime.services import send_to_group
from manager.texts import check_text

log = logging.getLogger(__name__)

MAX_RUNS = 500  # runs in one design
MAX_LIST = 20  # models, temperatures, instruction variants in one design
MAX_REPETITIONS = 100
VARIANT_NAME_LENGTH = 40
CELL_KEYS = ("provider", "model", "temperature", "instructions", "memory", "repetition")
ENDED = (BotRun.Status.FINISHED, BotRun.Status.STOPPED, BotRun.Status.FAILED)
FIELDS = ("title", "session_config", "num_participants", "num_bots", "models", "temperatures", "instructions",
          "memory", "repetitions", "rate_limit", "concurrency", "time_limit_minutes", "max_parallel", "budget_usd",
          "run_budget_usd", "use_cache")
DEFAULTS = {"title": "", "temperatures": [1.0], "instructions": [{"name": "default", "text": ""}],
            "memory": [BotRun.Memory.SUMMARY.value], "repetitions": 1, "rate_limit": 60, "concurrency": 10,
            "time_limit_minutes": 60, "max_parallel": 2, "budget_usd": None, "run_budget_usd": None,
            "use_cache": False}


def experiment_group(experiment_pk: int) -> str:
    """The group of an experiment's open pages: the only place its name is spelled."""
    return f"botexperiment.{experiment_pk}"


# --- the design -------------------------------------------------------------------------------

def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalise_design(instance: Instance, data: dict) -> dict:
    """The design in its stored form, or a ValidationError naming every bad field.
    Models are resolved (a provider that exists and is enabled, a model it offers)."""
    if not isinstance(data, dict):
        raise ValidationError("the design must be an object with the fields " + ", ".join(FIELDS))
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValidationError({unknown[0]: [f"unknown field (fields: {', '.join(FIELDS)})"]})
    d = {**DEFAULTS, **{k: v for k, v in data.items() if v is not None or k in ("budget_usd", "run_budget_usd")}}
    errors: dict[str, list[str]] = {}

    def bad(key: str, message: str) -> None:
        errors.setdefault(key, []).append(message)

    title = d["title"]
    if not isinstance(title, str):
        bad("title", "must be text")
    else:
        check_text(title, field="title", max_length=200, label="The title", single_line=True)
        d["title"] = title.strip()
    config = d.get("session_config")
    live = instance.live_release
    if not isinstance(config, str) or not config.strip():
        bad("session_config", "name a session config of the live release")
    elif live is None:
        bad("session_config", "the instance has no live release: deploy your project first")
    else:
        names = [c.get("name") for c in live.session_configs or []]
        if config not in names:
            bad("session_config", f"no session config {config!r} in the live release (configs: "
                                  f"{', '.join(names) or 'none'})")
    for key in ("num_participants", "num_bots", "rate_limit", "concurrency", "time_limit_minutes"):
        low, high = services.LIMITS[key]
        if key not in d:
            bad(key, f"required: a whole number from {low} to {high}")
        elif not _whole(d[key]) or not low <= d[key] <= high:
            bad(key, f"must be a whole number from {low} to {high}")
    if "num_bots" not in errors and "num_participants" not in errors and d["num_bots"] > d["num_participants"]:
        bad("num_bots", f"at most the number of participants ({d['num_participants']})")
    if not _whole(d["repetitions"]) or not 1 <= d["repetitions"] <= MAX_REPETITIONS:
        bad("repetitions", f"must be a whole number from 1 to {MAX_REPETITIONS}")
    if not _whole(d["max_parallel"]) or not 1 <= d["max_parallel"] <= settings.LAB_BOT_RUNS:
        bad("max_parallel", f"must be a whole number from 1 to {settings.LAB_BOT_RUNS} (the runs the lab's bots "
                            "worker plays at once, LAB_BOT_RUNS)")
    for key in ("budget_usd", "run_budget_usd"):
        if d[key] is not None and (not _number(d[key]) or not 0 < d[key] <= services.MAX_BUDGET):
            bad(key, f"must be an amount in USD above 0, at most {services.MAX_BUDGET:g} (or empty: no cap)")
        elif d[key] is not None:
            d[key] = float(d[key])
    if not isinstance(d["use_cache"], bool):
        bad("use_cache", "must be true or false")

    # the factors
    models = d.get("models")
    resolved = []
    if not isinstance(models, list) or not models:
        bad("models", f'name at least one model: [{{"provider": "...", "model": "..."}}] or "{RANDOM_POLICY}"')
    elif len(models) > MAX_LIST:
        bad("models", f"at most {MAX_LIST} models")
    else:
        for i, m in enumerate(models, start=1):
            if m == RANDOM_POLICY:
                m = {"model": RANDOM_POLICY}
            if not isinstance(m, dict) or not isinstance(m.get("model"), str) or set(m) - {"provider", "model"} \
                    or not isinstance(m.get("provider", ""), (str, type(None))):
                bad("models", f'model {i}: write {{"provider": "<provider name>", "model": "<model>"}}')
                continue
            provider_name = m.get("provider") or None
            try:
                if m["model"] == RANDOM_POLICY and not provider_name:
                    provider, model = None, RANDOM_POLICY
                elif not provider_name:
                    raise ValidationError({"provider": [f'name the provider of {m["model"]!r} '
                                                        f'(or use "{RANDOM_POLICY}")']})
                else:
                    provider, model = services.resolve_model(m["model"], provider_name=provider_name)
            except ValidationError as exc:
                for message in itertools.chain.from_iterable(exc.message_dict.values()):
                    bad("models", f"model {i}: {message}")
                continue
            entry = {"provider": provider.name if provider else "", "model": model}
            if entry in resolved:
                bad("models", f"model {i}: {model} is listed twice")
                continue
            resolved.append(entry)
        d["models"] = resolved
    temps = d["temperatures"]
    low, high = services.TEMPERATURE_RANGE
    if not isinstance(temps, list) or not temps:
        bad("temperatures", f"name at least one temperature from {low} to {high}")
    elif len(temps) > MAX_LIST:
        bad("temperatures", f"at most {MAX_LIST} temperatures")
    elif not all(_number(t) and low <= t <= high for t in temps):
        bad("temperatures", f"each temperature must be a number from {low} to {high}")
    elif len(set(float(t) for t in temps)) != len(temps):
        bad("temperatures", "a temperature is listed twice")
    else:
        d["temperatures"] = [float(t) for t in temps]
    variants = d["instructions"]
    if not isinstance(variants, list) or not variants:
        bad("instructions", 'name at least one instruction variant: [{"name": "...", "text": "..."}]')
    elif len(variants) > MAX_LIST:
        bad("instructions", f"at most {MAX_LIST} instruction variants")
    else:
        clean = []
        for i, v in enumerate(variants, start=1):
            if not isinstance(v, dict) or set(v) - {"name", "text"} or not isinstance(v.get("name"), str) \
                    or not isinstance(v.get("text", ""), str):
                bad("instructions", f'variant {i}: write {{"name": "<short name>", "text": "<instructions>"}}')
                continue
            name, text = v["name"].strip(), v.get("text", "")
            if not name or len(name) > VARIANT_NAME_LENGTH or "\n" in name or "\x00" in name:
                bad("instructions", f"variant {i}: its name must be one line of 1 to {VARIANT_NAME_LENGTH} characters")
                continue
            try:
                check_text(text, field="instructions", max_length=services.MAX_INSTRUCTIONS,
                           label=f"The text of variant {name!r}")
            except ValidationError as exc:
                for message in itertools.chain.from_iterable(exc.message_dict.values()):
                    bad("instructions", message)
                continue
            if name in [c["name"] for c in clean]:
                bad("instructions", f"variant {i}: the name {name!r} is used twice")
                continue
            clean.append({"name": name, "text": text})
        d["instructions"] = clean
    memory = d["memory"]
    if not isinstance(memory, list) or not memory or not all(m in BotRun.Memory.values for m in memory):
        bad("memory", f"name at least one memory mode of {', '.join(BotRun.Memory.values)}")
    elif len(set(memory)) != len(memory):
        bad("memory", "a memory mode is listed twice")
    if errors:
        raise ValidationError(errors)
    total = len(cells(d))
    if total > MAX_RUNS:
        raise ValidationError({"repetitions": [
            f"the design makes {total} runs ({len(d['models'])} models x {len(d['temperatures'])} temperatures x "
            f"{len(d['instructions'])} instruction variants x {len(d['memory'])} memory modes x "
            f"{d['repetitions']} repetitions); at most {MAX_RUNS}"]})
    return {key: d[key] for key in FIELDS}


def cells(design: dict) -> list[dict]:
    """The design's runs, in order: each its factors (repetition innermost)."""
    return [{"provider": m["provider"], "model": m["model"], "temperature": t, "instructions": v["name"],
             "memory": mem, "repetition": r}
            for m in design["models"] for t in design["temperatures"] for v in design["instructions"]
            for mem in design["memory"] for r in range(1, design["repetitions"] + 1)]


def cell_seed(instance: Instance, number: int, index: int) -> int:
    """A deterministic seed for run `index` of experiment `number` (recorded with the run;
    a re-run keeps its source's seeds)."""
    digest = hashlib.sha256(f"{instance.pk}:{number}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# --- creating ---------------------------------------------------------------------------------

def create_experiment(actor, instance: Instance, design: dict, request=None, *, source: BotExperiment | None = None
                      ) -> BotExperiment:
    """Record the experiment and its runs (waiting), then release the first ones once the
    transaction commits."""
    services._check(actor, instance)
    design = normalise_design(instance, design)
    sources = None
    if source is not None:  # each new run repeats the source's run of the same cell (its seed too)
        sources = {tuple(r.factors.get(k) for k in CELL_KEYS): r for r in source.runs.all()}
    if any(m["provider"] for m in design["models"]):  # the offline policy costs nothing
        refusal = services.monthly_refusal(actor)
        if refusal:
            raise ValidationError({"budget_usd": [refusal]})
    providers = {}
    for m in design["models"]:
        if m["provider"]:
            providers[m["provider"]], _ = services.resolve_model(m["model"], provider_name=m["provider"])
    with throttle.take("bot_run", actor, instance):
        for _attempt in range(5):
            try:
                with transaction.atomic():
                    experiment = _record(actor, instance, design, providers, sources, source, request)
                break
            except IntegrityError:  # numbered at the same time as another: take the next number
                continue
        else:
            raise ValidationError("could not number the experiment; try again")
    pk = experiment.pk
    transaction.on_commit(lambda: schedule(pk))
    return experiment


def _record(actor, instance, design, providers, sources, source, request) -> BotExperiment:
    number = next_number(instance, BotExperiment)
    experiment = BotExperiment.objects.create(
        instance=instance, number=number, title=design["title"], created_by=actor, design=design,
        budget_usd=design["budget_usd"], run_budget_usd=design["run_budget_usd"],
        max_parallel=design["max_parallel"], use_cache=design["use_cache"], source=source,
        started_at=timezone.now())
    texts = {v["name"]: v["text"] for v in design["instructions"]}
    first = next_number(instance, BotRun)
    rows = []
    for index, cell in enumerate(cells(design)):
        provider = providers.get(cell["provider"])
        price_in, price_out = provider.price(cell["model"]) if provider else (0.0, 0.0)
        run_number = first + index
        origin = sources.get(tuple(cell[k] for k in CELL_KEYS)) if sources else None
        rows.append(BotRun(
            instance=instance, number=run_number, created_by=actor, session_config=design["session_config"],
            num_participants=design["num_participants"], num_bots=design["num_bots"], provider=provider,
            provider_name=cell["provider"], model=cell["model"], temperature=cell["temperature"],
            instructions=texts[cell["instructions"]], memory=cell["memory"], rate_limit=design["rate_limit"],
            concurrency=design["concurrency"], time_limit_minutes=design["time_limit_minutes"],
            price_input=price_in, price_output=price_out, status=BotRun.Status.WAITING,
            status_reason="waiting for its turn", experiment=experiment, factors=cell,
            repetition=cell["repetition"], budget_usd=design["run_budget_usd"], use_cache=design["use_cache"],
            seed=origin.seed if origin is not None and origin.seed is not None else cell_seed(instance, number, index),
            source=origin,
            session_label=f"lab-bots-{instance.name}-{run_number}-{secrets.token_hex(4)}"))
    BotRun.objects.bulk_create(rows)
    what = f"rerun of #{source.number}" if source else "new design"
    record(actor, "bots.experiment_start", instance,
           f"started bot experiment #{number} on {instance.name} ({what}): {len(rows)} runs of "
           f"{design['session_config']}, {design['max_parallel']} at once", request)
    return experiment


def rerun_experiment(actor, experiment: BotExperiment, request=None) -> BotExperiment:
    """A new experiment with the same design, the same factors and seeds per run."""
    return create_experiment(actor, experiment.instance, dict(experiment.design), request=request, source=experiment)


# --- the scheduler ----------------------------------------------------------------------------

def schedule(experiment_id: int) -> None:
    """One pass over the experiment (idempotent; under its lock)."""
    try:
        with locks.lock(f"botexperiment:{experiment_id}", wait=30):
            changed = _pass(experiment_id)
    except locks.Busy:  # another pass is under way; the next one (at the latest the sweep's) sees the rest
        return
    if changed:
        push(experiment_id)


def _pass(experiment_id: int) -> bool:
    experiment = BotExperiment.objects.select_related("instance").filter(pk=experiment_id).first()
    if experiment is None or not experiment.is_active:
        return False
    runs = experiment.runs
    changed = False
    reason = ""
    if experiment.stop_requested:
        reason = "the experiment was stopped"
    elif experiment.budget_usd is not None:
        spent = budget.experiment_spent(experiment)
        if spent >= experiment.budget_usd:
            reason = f"the experiment's budget of ${experiment.budget_usd:g} was reached (${spent:.4f} spent)"
    if reason:
        if runs.filter(status=BotRun.Status.WAITING).update(status=BotRun.Status.STOPPED, status_reason=reason,
                                                              finished_at=timezone.now()):
            changed = True
        if experiment.status != BotExperiment.Status.STOPPING:
            BotExperiment.objects.filter(pk=experiment.pk).update(status=BotExperiment.Status.STOPPING,
                                                                  status_reason=reason)
            changed = True
    else:
        active = runs.filter(status__in=BotRun.ACTIVE).count()
        free = experiment.max_parallel - active
        if free > 0:
            for run in runs.filter(status=BotRun.Status.WAITING).order_by("number")[:free]:
                with transaction.atomic():
                    if BotRun.objects.filter(pk=run.pk, status=BotRun.Status.WAITING).update(
                            status=BotRun.Status.QUEUED, status_reason="", heartbeat_at=timezone.now()):
                        run.status = BotRun.Status.QUEUED
                        services.enqueue(run)
                        changed = True
    if not runs.filter(status__in=BotRun.NOT_ENDED).exists():
        counts = status_counts(experiment)
        total = sum(counts.values())
        finished, stopped, failed = (counts.get(s, 0) for s in ENDED)
        summary = f"{finished} of {total} runs finished"
        if failed:
            summary += f", {failed} failed"
        if stopped:
            summary += f", {stopped} stopped"
        stopping = bool(reason) or experiment.status == BotExperiment.Status.STOPPING
        if stopping:
            summary = f"{reason or experiment.status_reason}: {summary}"
        status = BotExperiment.Status.STOPPED if stopping else (
            BotExperiment.Status.FINISHED if finished or not failed else BotExperiment.Status.FAILED)
        BotExperiment.objects.filter(pk=experiment.pk, status__in=BotExperiment.ACTIVE).update(
            status=status, status_reason=summary[:500], finished_at=timezone.now())
        changed = True
    return changed


def sweep() -> list[int]:
    """Every active experiment gets a pass (the beat's bots sweep calls this)."""
    ids = list(BotExperiment.objects.filter(status__in=BotExperiment.ACTIVE).values_list("pk", flat=True))
    for pk in ids:
        try:
            schedule(pk)
        except Exception:  # noqa: BLE001 - one broken experiment must not keep the others waiting
            log.exception("scheduler pass of bot experiment %s failed", pk)
    return ids


def stop_experiment(actor, experiment: BotExperiment, request=None) -> BotExperiment:
    """No run is released any more; waiting runs stop; playing ones stop at their next safe
    point; the experiment is stopped when the last one has ended."""
    services._check(actor, experiment.instance)
    if not experiment.is_active:
        return experiment
    BotExperiment.objects.filter(pk=experiment.pk).update(stop_requested=True)
    record(actor, "bots.experiment_stop", experiment.instance,
           f"stopped bot experiment #{experiment.number} on {experiment.instance.name}", request)
    for run in experiment.runs.filter(status__in=BotRun.ACTIVE).select_related("instance"):
        services.stop_run(actor, run, request=request)
    schedule(experiment.pk)
    experiment.refresh_from_db()
    return experiment


# --- progress ---------------------------------------------------------------------------------

def status_counts(experiment: BotExperiment) -> dict[str, int]:
    return dict(experiment.runs.order_by().values_list("status").annotate(n=Count("id")))


def progress(experiment: BotExperiment) -> dict:
    """Counts by status, tokens, cost so far, and the time left (estimated from the mean
    duration of the finished runs; None before the first one)."""
    counts = status_counts(experiment)
    total = sum(counts.values())
    tokens = Bot.objects.filter(run__experiment=experiment).aggregate(
        p=Sum("prompt_tokens"), c=Sum("completion_tokens"))
    done = experiment.runs.filter(status=BotRun.Status.FINISHED, started_at__isnull=False,
                                  finished_at__isnull=False).values_list("started_at", "finished_at")
    durations = [(end - start).total_seconds() for start, end in done]
    waiting = counts.get(BotRun.Status.WAITING, 0)
    active = sum(counts.get(s, 0) for s in BotRun.ACTIVE)
    left = None if experiment.is_active else 0
    if experiment.is_active and durations:
        mean = sum(durations) / len(durations)
        remaining = waiting + active
        left = round(mean * remaining / max(1, min(experiment.max_parallel, remaining))) if remaining else 0
    return {
        "runs": total,
        "waiting": waiting,
        "running": active,
        "finished": counts.get(BotRun.Status.FINISHED, 0),
        "stopped": counts.get(BotRun.Status.STOPPED, 0),
        "failed": counts.get(BotRun.Status.FAILED, 0),
        "tokens": int((tokens["p"] or 0) + (tokens["c"] or 0)),
        "cost_usd": round(budget.experiment_spent(experiment), 6),
        "seconds_left": left,
    }


def event(experiment: BotExperiment) -> dict:
    """The `botexperiment` event its page understands: the status, progress and each run's state."""
    experiment.refresh_from_db()
    return {"type": "botexperiment", "experiment": experiment.pk, "status": experiment.status,
            "reason": experiment.status_reason, "progress": progress(experiment),
            "runs": [{"number": n, "status": s, "status_label": BotRun.Status(s).label}
                     for n, s in experiment.runs.values_list("number", "status")]}


def push(experiment_id: int) -> None:
    experiment = BotExperiment.objects.filter(pk=experiment_id).first()
    if experiment is not None:
        send_to_group(experiment_group(experiment.pk), event(experiment))


def time_left_text(seconds: int | None) -> str:
    if seconds is None:
        return "—"
    return str(timedelta(seconds=int(seconds)))


def get_experiment(user, name: str, number: int) -> BotExperiment:
    """Experiment `number` of instance `name`, if the user may see the instance (else Http404)."""
    from django.http import Http404

    from instances.selectors import get_visible_instance

    instance = get_visible_instance(user, name)
    experiment = instance.bot_experiments.select_related("instance", "instance__owner", "created_by", "source").filter(
        number=number).first()
    if experiment is None:
        raise Http404(f"{name} has no bot experiment #{number}.")
    return experiment


# --- wiring -----------------------------------------------------------------------------------

def _visible(user, key):
    return BotExperiment.objects.filter(pk=int(key), instance__in=visible_instances(user)).first() \
        if key.isdigit() else None


def _topic(user, key):
    experiment = _visible(user, key)
    return experiment_group(experiment.pk) if experiment else None


def _snapshot(user, key):
    experiment = _visible(user, key)
    return event(experiment) if experiment else None


# `botexperiment:<id>`: an experiment's page (owner and lab managers); each pass that changed something pushes
topics.register("botexperiment", _topic, _snapshot)
# a run of an experiment ended (its worker, a failure, a stop): the next pass at once
services.on_run_end(lambda run: schedule(run.experiment_id))
