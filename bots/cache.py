"""The replay cache (opt-in per run: `BotRun.use_cache`): a model's reply to a request,
stored once and given again for the same request instead of asking the model — so a
re-run of a published run replays its conversations without cost or drift.

The key is the SHA-256 of the canonical JSON of what decides the reply: the provider's
base URL, the model, temperature, seed, response_format, max_tokens and the messages —
plus the bot's index in the run, so every bot replays its own conversation (bots of one
run often send the same first request; without the index, which of the stored replies a
bot got would depend on which bot asked first). The participant and session codes of
the run are replaced by placeholders before hashing: oTree shows them on some pages
(its debug panel, an app's own text), and they differ between a run and its re-run.

`occurrence` counts how often the bot already asked the same key in this run (kept in
the bot's state, so a resumed bot goes on counting): the n-th identical request gets the
n-th stored reply. The first writer of a (key, occurrence) wins. The cache is shared by
the whole lab: a run hits replies stored by any run with identical requests."""

from __future__ import annotations

import hashlib
import json

from bots.models import CachedReply


def normalise(messages: list[dict], codes: dict[str, str]) -> list[dict]:
    """`messages` with every code in `codes` replaced by its placeholder."""
    if not codes:
        return messages
    ordered = sorted(codes.items(), key=lambda item: -len(item[0]))
    out = []
    for m in messages:
        content = m.get("content", "")
        if isinstance(content, str):
            for code, placeholder in ordered:
                if code:
                    content = content.replace(code, placeholder)
        out.append({**m, "content": content})
    return out


def key(parameters: dict, bot_index: int, messages: list[dict], codes: dict[str, str]) -> str:
    payload = {**parameters, "bot": bot_index, "messages": normalise(messages, codes)}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lookup(cache_key: str, occurrence: int) -> CachedReply | None:
    return CachedReply.objects.filter(key=cache_key, occurrence=occurrence).first()


def store(cache_key: str, occurrence: int, *, run, attempt) -> None:
    """Keep a successful reply (a reply already stored for this key and occurrence stays)."""
    CachedReply.objects.bulk_create([CachedReply(
        key=cache_key, occurrence=occurrence, provider_name=run.provider_name[:60], model=run.model[:100],
        response=attempt.text, returned_model=attempt.returned_model, system_fingerprint=attempt.system_fingerprint,
        prompt_tokens=attempt.prompt_tokens, completion_tokens=attempt.completion_tokens, run=run)],
        ignore_conflicts=True)
