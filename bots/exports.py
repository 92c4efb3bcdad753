"""Downloads of a bot run: the answers as CSV (one row per answered field), the full
conversations as JSON, and a summary (model, parameters, timings, tokens, errors).
None of them contains the provider's API key."""

from __future__ import annotations

import csv
import io

from bots import budget, manifest
from bots.live import bots_of
from bots.models import Answer, BotRun

CSV_COLUMNS = ["session", "participant", "app", "round", "page", "field", "answer", "reason", "cached"]


def responses_csv(run: BotRun) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    rows = (Answer.objects.filter(run=run, status=Answer.Status.ACCEPTED).select_related("bot")
            .order_by("bot__index", "page_index", "id"))
    for a in rows:
        writer.writerow([run.session_code, a.bot.participant_code, a.app, a.round_number, a.page, a.field, a.value,
                         a.reason, "true" if a.cached else "false"])
    return buffer.getvalue()


def conversations(run: BotRun) -> dict:
    bots = []
    for bot in run.bots.prefetch_related("calls"):
        bots.append({
            "bot": bot.index, "participant": bot.participant_code, "status": bot.status, "reason": bot.reason,
            "memory": bot.memory,
            "calls": [{"time": c.created_at.isoformat(), "page_index": c.page_index, "page": c.page, "kind": c.kind,
                       "attempt": c.attempt, "messages": c.prompt, "response": c.response, "error": c.error,
                       "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                       "latency_ms": c.latency_ms, "cached": c.cached, "returned_model": c.returned_model,
                       "system_fingerprint": c.system_fingerprint, "cost_usd": c.cost_usd}
                      for c in bot.calls.all()],
        })
    return {"run": run.number, "instance": run.instance.name, "session": run.session_code, "bots": bots}


def summary(run: BotRun) -> dict:
    bots = bots_of(run)
    calls = run.calls.all()
    errors = [{"bot": b.index, "status": b.status, "reason": b.reason} for b in bots if b.reason]
    failed_calls = calls.exclude(error="")
    duration = run.duration
    return {
        "run": run.number, "instance": run.instance.name, "status": run.status, "status_reason": run.status_reason,
        "session_config": run.session_config, "session": run.session_code,
        "participants": run.num_participants, "bots": run.num_bots,
        "human_seats": [s["code"] for s in run.human_seats],
        "policy": "random" if run.is_random else "model",
        "provider": run.provider_name or None, "model": run.model,
        "parameters": {"temperature": run.temperature, "memory": run.memory, "instructions": run.instructions,
                       "rate_limit_per_minute": run.rate_limit, "concurrency": run.concurrency,
                       "time_limit_minutes": run.time_limit_minutes},
        "prices_usd_per_million_tokens": {"input": run.price_input, "output": run.price_output},
        "started_by": run.created_by.username if run.created_by else None,
        "created_at": run.created_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "duration_seconds": round(duration.total_seconds(), 3) if duration else None,
        "worker_deliveries": run.deliveries,
        "tokens": {"prompt": sum(b.prompt_tokens for b in bots), "completion": sum(b.completion_tokens for b in bots)},
        "estimated_cost_usd": round(sum(b.cost for b in bots), 6),
        "spent_usd": round(budget.run_spent(run), 6), "budget_usd": run.budget_usd,
        "model_calls": calls.filter(cached=False).count(), "failed_model_calls": failed_calls.count(),
        "cached_answers": calls.filter(cached=True).count(),
        "answers": Answer.objects.filter(run=run, status=Answer.Status.ACCEPTED).count(),
        "rejected_answers": Answer.objects.filter(run=run, status=Answer.Status.REJECTED).count(),
        "bots_by_status": {s: sum(b.status == s for b in bots) for s in sorted({b.status for b in bots})},
        "errors": errors,
        "call_errors": list(failed_calls.values_list("error", flat=True)[:100]),
        "manifest": manifest.for_export(run),
    }
