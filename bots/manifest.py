"""A run's manifest: what a reviewer needs to know what was run and to run it again —
the product's version, the provider (never its key), the model asked for and the model
ids that answered, every parameter, the seed, the prompt templates in full, the oTree
release and session config, the session, the times, the replay cache, the budgets and,
for a run of an experiment, its factors.

`build(run)` is recorded when the run's oTree session exists (bots/engine.py); the
engine adds the returned model ids and fingerprints as they arrive and the end time when
the run ends. `for_export(run)` is what summary.json and manifest.json carry."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from bots import budget, llm, policy
from bots.models import BotRun
from bots.page import Field, Page
from manager.version import full_version


def public_url(url: str) -> str:
    """`url` without credentials: no user:password@, no query string, no fragment."""
    try:
        parts = urlsplit(url or "")
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return ""


def templates(run: BotRun) -> dict:
    """The prompts as bots/policy.py builds them for this run, with placeholders where a
    page's content goes."""
    with_memory = run.memory == BotRun.Memory.SUMMARY
    page = Page(url="", path="", status_code=200, app="<app>", name="<page>", text="<the page's text>",
                fields=[Field(name="<field>", kind="<type>", label="<label>", required=True)])
    return {
        "version": policy.TEMPLATE_VERSION,
        "system": policy.system_prompt(run.instructions, with_memory),
        "page_message": policy.page_message(page, seen=["(<app>, <page>) <text of a page read since the last "
                                                        "answer>"],
                                            memory="<the bot's notes>" if with_memory else None),
        "correction_message": policy.correction_message(["<what was wrong>"]),
    }


def build(run: BotRun) -> dict:
    provider = run.provider
    release = run.instance.live_release
    config = next((c for c in (release.session_configs if release else []) or []
                   if c.get("name") == run.session_config), None)
    experiment = run.experiment
    return {
        "manifest_version": 1,
        "product_version": full_version(),
        "run": run.number, "instance": run.instance.name,
        "policy": "random" if run.is_random else "model",
        "provider": None if run.is_random else {
            "name": run.provider_name, "base_url": public_url(provider.base_url) if provider else ""},
        "model": run.model,
        "returned_models": [], "system_fingerprints": [],
        "parameters": {
            "temperature": run.temperature, "max_tokens": llm.MAX_TOKENS,
            "response_format": provider.response_format if provider else None,
            "memory": run.memory, "instructions": run.instructions,
            "rate_limit_per_minute": run.rate_limit, "concurrency": run.concurrency,
            "time_limit_minutes": run.time_limit_minutes,
            "num_participants": run.num_participants, "num_bots": run.num_bots,
        },
        "seed": run.seed,
        "prompts": templates(run),
        "otree": {"release": release.number if release else None, "commit": release.commit if release else None,
                  "session_config": config},
        "session_config": run.session_config,
        "session": run.session_code,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "ended_at": None,
        "use_cache": run.use_cache,
        "budgets_usd": {"run": run.budget_usd, "experiment": experiment.budget_usd if experiment else None,
                        "monthly": budget.monthly_cap(run.created_by)},
        "prices_usd_per_million_tokens": {"input": run.price_input, "output": run.price_output},
        "experiment": experiment.number if experiment else None,
        "factors": run.factors or {}, "repetition": run.repetition if experiment else None,
        "rerun_of": {"run": run.source.number, "session": run.source.session_code} if run.source_id else None,
    }


def for_export(run: BotRun) -> dict:
    """The recorded manifest with what is known now (the run's end, the models that
    answered); a run that never got its session has what its parameters say."""
    data = dict(run.manifest or build(run))
    data["status"] = run.status
    data["ended_at"] = run.finished_at.isoformat() if run.finished_at else None
    data["started_at"] = data.get("started_at") or (run.started_at.isoformat() if run.started_at else None)
    if run.returned_model and run.returned_model not in data.get("returned_models", []):
        data["returned_models"] = [*data.get("returned_models", []), run.returned_model]
    if run.system_fingerprint and run.system_fingerprint not in data.get("system_fingerprints", []):
        data["system_fingerprints"] = [*data.get("system_fingerprints", []), run.system_fingerprint]
    return data
