"""What the run page shows live: the `botrun` event (bots and totals), built in the run's
worker and, for whole-page refreshes, in the web process (no model client needed here)."""

from bots.models import Bot, BotRun


def bots_of(run: BotRun) -> list[Bot]:
    """The run's bots, each pointing at `run` (their cost reads its prices: no query per bot)."""
    bots = list(run.bots.all())
    for bot in bots:
        bot.run = run
    return bots


def bot_snapshot(bot: Bot) -> dict:
    return {
        "index": bot.index, "participant": bot.participant_code, "status": bot.status,
        "status_label": bot.get_status_display(), "reason": bot.reason, "app": bot.app, "page": bot.page,
        "round": bot.round_number, "answers": bot.answers, "retries": bot.retries,
        "tokens": bot.prompt_tokens + bot.completion_tokens, "cost": round(bot.cost, 6),
    }


def run_event(run: BotRun, changed: list[Bot], all_bots: list[Bot]) -> dict:
    """The `botrun` event the run page understands (also rendered into the page itself)."""
    tokens = sum(b.prompt_tokens + b.completion_tokens for b in all_bots)
    return {
        "type": "botrun", "run": run.pk, "status": run.status, "status_label": run.get_status_display(),
        "status_color": run.status_color, "reason": run.status_reason,
        "totals": {"bots": len(all_bots), "done": sum(b.status in Bot.DONE for b in all_bots),
                   "answers": sum(b.answers for b in all_bots), "retries": sum(b.retries for b in all_bots),
                   "tokens": tokens, "cost": round(sum(b.cost for b in all_bots), 6)},
        "bots": [bot_snapshot(b) for b in changed],
    }
