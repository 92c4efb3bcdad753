"""Driving a bot run: the oTree session, then every bot as an asyncio task in one worker.

`execute(run_id)` is what the Celery task runs (under the run's Redis lock). It is
level-triggered: whatever happened before — a first start, a worker killed mid-run, a
redelivered message — it reads the run from the database and goes on from there:

- no session yet: find the session by the run's label (a crash after oTree created it) or
  create it through the instance's REST API, then the Bot rows;
- every bot that has not finished opens its participant link, which oTree answers with
  the page the participant is on, and plays from there. Answers are recorded before they
  are sent (pending) and settled when oTree answered; a resumed bot re-sends its pending
  answers instead of asking the model again, and oTree never takes a page twice (a form
  sent to a page the participant has left is redirected to the current one).

All bots of a run share one HTTP client for oTree, one model client, the run's
concurrency limit (an asyncio semaphore) and its rate limit (in Redis, shared by all
workers). The database is written through one thread (Django's ORM is synchronous).

The instance's app is the tenant's code, and this runs in the manager: every request goes
to the instance's own origin (scheme, host and port of its app URL) and nowhere else.
Redirects are followed here, one by one, and one that leaves the origin — like any URL
outside it that a page names (a wait page's socket) — stops that bot with the reason
("the instance redirected to http://127.0.0.1:8000/…, outside the instance; the bot
stopped"), before anything is fetched from there. Answers are read up to MAX_BODY bytes.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass

import httpx2
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import close_old_connections, transaction
from django.db.models import F
from django.utils import timezone

from bots import budget, cache, manifest, policy, preflight, seats
from bots.llm import Attempt, LLMClient, ModelError
from bots.live import bots_of, run_event
from bots.models import Answer, Bot, BotRun, ModelCall
from bots.page import Page, parse
from bots.realtime import run_group
from bots.ratelimit import RateLimiter, provider_key, run_key
from bots.services import WOKE, finish, run_ended, set_run, stop_text

log = logging.getLogger(__name__)

MAX_CORRECTIONS = 3  # corrective prompts per page after unusable model output
MAX_REJECTIONS = 3  # re-answers per page after oTree's validation refused the answers
MAX_STEPS = 5000  # page loads per bot
WAIT_POLL = (0.05, 1.0)  # without its socket, a wait page is checked again after 0.05 s, growing to 1 s
WAIT_SOCKET = 30.0  # seconds on a wait page's socket before the page is loaded again
HTTP_ATTEMPTS = 5  # per request to oTree (connection errors, 502/503/504)
HTTP_TIMEOUT = 30.0
PUSH_INTERVAL = 0.3  # seconds between live updates of the run page
HEARTBEAT_INTERVAL = 2.0
STOP_GRACE = 3.0  # seconds bots get to reach a safe point after "stop"
PAGE_TIMES_LIMIT = 50 * 2**20  # bytes of oTree's page-times export read for exact round numbers
MAX_BODY = 5 * 2**20  # bytes of one answer of the instance (a page, a REST answer)
MAX_REDIRECTS = 10
REDIRECTS = (301, 302, 303, 307, 308)

db = sync_to_async  # thread_sensitive: every ORM call runs in the one database thread


class GiveUp(Exception):
    """A bot cannot go on; the message is its reason."""


class RunFailed(Exception):
    """The run cannot start; the message is its reason."""


# --- oTree over HTTP --------------------------------------------------------------------------

@dataclass
class Reply:
    """One answer of the instance: read whole, but at most MAX_BODY bytes."""

    status_code: int
    headers: httpx2.Headers
    url: httpx2.URL
    content: bytes
    encoding: str = "utf-8"

    @property
    def text(self) -> str:
        return self.content.decode(self.encoding or "utf-8", errors="replace")

    def json(self):
        return json.loads(self.content)


def origin(url: httpx2.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in; ws is http."""
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    return scheme, (url.host or "").lower(), url.port or {"http": 80, "https": 443}.get(scheme)


def shown(url) -> str:
    text = str(url)
    return text if len(text) <= 200 else text[:199] + "…"


class OTree:
    """The instance's oTree app: its REST API (with the REST key) and participant pages,
    at its own origin only."""

    def __init__(self, base_url: str, rest_key: str, http: httpx2.AsyncClient | None = None):
        self.base_url = base_url.rstrip("/")
        self.base = httpx2.URL(self.base_url + "/")
        self.origin = origin(self.base)
        self.rest_key = rest_key
        self.http = http or httpx2.AsyncClient(
            base_url=self.base_url, follow_redirects=False, timeout=HTTP_TIMEOUT,
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=64))

    async def close(self):
        await self.http.aclose()

    def inside(self, url, *, via: str = "names") -> httpx2.URL:
        """`url` (absolute, or relative to the app) if it is at the instance's origin; else
        GiveUp: the bot goes nowhere else."""
        target = self.base.join(str(url))
        if origin(target) != self.origin or target.scheme not in ("http", "https", "ws", "wss"):
            verb = "redirected to" if via == "redirect" else "names"
            raise GiveUp(f"the instance {verb} {shown(target)}, outside the instance; the bot stopped")
        return target

    async def request(self, method: str, url: str, **kwargs) -> Reply:
        """`method url`, following redirects within the instance's origin only (a redirect
        elsewhere: GiveUp before anything is fetched there)."""
        target = self.inside(url)
        for _hop in range(MAX_REDIRECTS + 1):
            response = await self._send(method, target, **kwargs)
            location = response.headers.get("location")
            if response.status_code not in REDIRECTS or location is None:
                return response
            target = self.inside(target.join(location), via="redirect")
            if response.status_code in (301, 302, 303) and method != "HEAD":
                method = "GET"  # as browsers do: the form is not sent again
                kwargs = {k: v for k, v in kwargs.items() if k not in ("data", "json", "content", "files")}
        raise GiveUp(f"the instance redirected more than {MAX_REDIRECTS} times in a row")

    async def _send(self, method: str, url: httpx2.URL, **kwargs) -> Reply:
        """One request, retried on connection errors and 502/503/504 (the app restarting)."""
        for attempt in range(1, HTTP_ATTEMPTS + 1):
            try:
                response = await self._read(method, url, **kwargs)
                if response.status_code not in (502, 503, 504) or attempt == HTTP_ATTEMPTS:
                    return response
            except httpx2.TransportError as exc:
                if attempt == HTTP_ATTEMPTS:
                    raise GiveUp(f"the oTree app does not answer ({type(exc).__name__} on {method} "
                                 f"{url.path})") from None
            await asyncio.sleep(min(8.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    async def _read(self, method: str, url: httpx2.URL, **kwargs) -> Reply:
        async with self.http.stream(method, url, **kwargs) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY:
                    raise GiveUp(f"the instance answered {url.path} with more than {MAX_BODY // 2**20} MB")
            return Reply(response.status_code, response.headers, response.url, bytes(body),
                         response.encoding or "utf-8")

    def websocket_url(self, path: str) -> httpx2.URL:
        """A wait page's socket (as the client opens it: http/https), if it is at the
        instance's origin; else GiveUp."""
        target = self.inside(path)
        return target.copy_with(scheme={"ws": "http", "wss": "https"}.get(target.scheme, target.scheme))

    async def rest(self, method: str, path: str, body: dict | None = None) -> Reply:
        try:
            response = await self.request(method, path, json=body, headers={"otree-rest-key": self.rest_key})
        except GiveUp as exc:
            raise RunFailed(str(exc)) from None
        if response.status_code == 403:
            raise RunFailed(f"oTree refused the REST key: {response.text.strip()[:200]}")
        return response

    async def find_session(self, label: str) -> str | None:
        response = await self.rest("GET", "/api/sessions")
        if response.status_code != 200:
            return None
        return next((s["code"] for s in response.json() if s.get("label") == label), None)

    async def create_session(self, config: str, num_participants: int, label: str, room: str | None = None) -> str:
        body = {"session_config_name": config, "num_participants": num_participants, "label": label}
        if room is not None:  # a lobby room's session: its participants arrive through the room
            body["room_name"] = room
        response = await self.rest("POST", "/api/sessions", body)
        if response.status_code != 200:
            raise RunFailed(f"oTree did not create the session: {response.text.strip()[:300]}")
        return response.json()["code"]

    async def participants(self, code: str) -> list[dict]:
        response = await self.rest("GET", f"/api/sessions/{code}")
        if response.status_code != 200:
            raise RunFailed(f"oTree did not list the session's participants (HTTP {response.status_code})")
        return sorted(response.json()["participants"], key=lambda p: p["id_in_session"])

    async def page_rounds(self, code: str) -> dict[int, tuple[str, int]]:
        """page index -> (app, round number) of the session's completed pages, from oTree's
        page-times export (the same for every participant of a session)."""
        found: dict[int, tuple[str, int]] = {}
        read = 0
        async with self.http.stream("GET", "/api/export_page_times",
                                    headers={"otree-rest-key": self.rest_key}) as response:
            if response.status_code != 200:
                return found
            buffer = ""
            header = None
            async for chunk in response.aiter_text():
                read += len(chunk)
                if read > PAGE_TIMES_LIMIT:
                    break
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for row in csv.reader(io.StringIO("\n".join(lines))):
                    if header is None:
                        header = row
                        continue
                    item = dict(zip(header, row))
                    if item.get("session_code") == code and item.get("page_index", "").isdigit():
                        found[int(item["page_index"])] = (item.get("app_name", ""), int(item.get("round_number") or 1))
        return found


# --- the run's shared state --------------------------------------------------------------------

@dataclass
class Live:
    """Changes to push to the run page, coalesced."""

    dirty: set
    run_changed: bool = False


class RunContext:
    def __init__(self, run: BotRun, otree: OTree, llm: LLMClient | None):
        self.run = run
        self.otree = otree
        self.llm = llm
        self.semaphore = asyncio.Semaphore(max(1, run.concurrency))
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self.players: dict[int, BotPlayer] = {}
        self.live = Live(dirty=set())
        self.rng = random.Random()
        self.sockets_broken = 0  # wait-page sockets that failed: after 3, bots poll
        self.room: str | None = None  # a lobby room's run: the bots enter through this oTree room
        self.board_pushed = 0.0
        self.spent = 0.0  # USD this run spent (its calls so far; kept up to date by every call)
        self.codes: dict[str, str] = {}  # the run's participant and session codes -> placeholders (cache keys)
        self.returned_models: list[str] = list((run.manifest or {}).get("returned_models", []))
        self.fingerprints: list[str] = list((run.manifest or {}).get("system_fingerprints", []))

    def halt(self, reason: str) -> None:
        """Stop the run (like a stop request) with `reason`; play_all ends it."""
        if not self.stop_reason:
            self.stop_reason = reason
        self.stop.set()

    def over_budget(self) -> str:
        """The run's own cap, from what it spent so far (no query; the experiment's and the
        monthly caps are checked against the database at every heartbeat)."""
        cap = self.run.budget_usd
        if cap is not None and self.spent >= cap:
            return f"the run's budget of ${cap:g} was reached (${self.spent:.4f} spent)"
        return ""

    async def saw(self, attempt: Attempt) -> None:
        """Record a model id or fingerprint the provider answered with, the first time."""
        new_model = attempt.returned_model and attempt.returned_model not in self.returned_models
        new_print = attempt.system_fingerprint and attempt.system_fingerprint not in self.fingerprints
        if not (new_model or new_print):
            return
        if new_model:
            self.returned_models.append(attempt.returned_model)
        if new_print:
            self.fingerprints.append(attempt.system_fingerprint)
        await db(note_models)(self.run, self.returned_models, self.fingerprints)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the run is stopped."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    def changed(self, bot: Bot) -> None:
        self.live.dirty.add(bot.pk)

    def snapshot(self, bot_ids=None) -> dict:
        """The live page's event: the bots in `bot_ids` (all when None) and the run's totals."""
        bots = [p.bot for p in self.players.values()]
        return run_event(self.run, [b for b in bots if bot_ids is None or b.pk in bot_ids], bots)

    async def push(self, full: bool = False) -> None:
        if not full and not self.live.dirty and not self.live.run_changed:
            return
        dirty, self.live.dirty = self.live.dirty, set()
        self.live.run_changed = False
        event = self.snapshot(None if full else dirty)
        if self.room and (full or time.monotonic() - self.board_pushed >= 1.0):  # the seat board shows the bots
            self.board_pushed = time.monotonic()
            await db(seats.push_board)(self.run)
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            await layer.group_send(run_group(self.run.pk), {"type": "push", "event": event})
        except Exception:  # noqa: BLE001 - the state is in the database; the page catches up on reload
            log.warning("live update of bot run %s failed", self.run.pk, exc_info=True)


# --- one bot --------------------------------------------------------------------------------------

def infer_round(state: dict, app: str, page_name: str, index: int) -> int:
    """The round of page `index`, as far as this bot can tell: oTree numbers an app's pages
    round after round, so the distance between two visits of one page is a multiple of the
    pages per round (the gcd of those distances). The exact numbers are filled in from
    oTree's page-times export when the run ends."""
    a = state.setdefault("apps", {}).setdefault(app, {"base": index, "period": 0, "last": {}})
    last = a["last"].get(page_name)
    if last is not None and index > last:
        a["period"] = math.gcd(a["period"], index - last)
    a["last"][page_name] = index
    if a["period"]:
        return 1 + max(0, index - a["base"]) // a["period"]
    return 1


class BotPlayer:
    def __init__(self, ctx: RunContext, bot: Bot):
        self.ctx = ctx
        self.bot = bot
        self.run = ctx.run
        self.submitting = False  # a form is on its way: not cancelled when stopping
        self.previous: dict | None = None  # the answers oTree rejected last
        self.from_cache = False  # the last decision came from the replay cache
        bot.run = ctx.run  # the same object: prices for the cost

    # --- state, saved and pushed
    async def save(self, **fields) -> None:
        for key, value in fields.items():
            setattr(self.bot, key, value)
        values = {k: getattr(self.bot, k) for k in (
            "status", "reason", "app", "page", "page_index", "round_number", "answers", "retries",
            "prompt_tokens", "completion_tokens", "memory", "history", "state")}
        await db(Bot.objects.filter(pk=self.bot.pk).update)(**values, updated_at=timezone.now())
        self.ctx.changed(self.bot)

    async def play(self) -> None:
        try:
            await self._play()
        except GiveUp as exc:
            await self.save(status=Bot.Status.GAVE_UP, reason=str(exc)[:500])
        except ModelError as exc:
            await self.save(status=Bot.Status.GAVE_UP, reason=f"the model did not answer: {exc}"[:500])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bot's bug never stops the others
            log.exception("bot %s of run %s failed", self.bot.index, self.run.pk)
            await self.save(status=Bot.Status.GAVE_UP, reason=f"internal error ({type(exc).__name__})")

    async def _get(self, url: str) -> Page:
        return self._page(await self.ctx.otree.request("GET", url))

    async def _post(self, url: str, data: dict) -> Page:
        self.submitting = True
        try:
            return self._page(await self.ctx.otree.request("POST", url, data=data))
        finally:
            self.submitting = False

    def _page(self, response: Reply) -> Page:
        if self.run.purpose == BotRun.Purpose.PREFLIGHT:
            self.html = response.text  # bots/preflight.py reads the page's scripts and inputs
        return parse(response.text, url=str(response.url), path=response.url.path, status_code=response.status_code,
                     headers=response.headers)

    async def _play(self) -> None:
        if self.ctx.room and not self.bot.participant_code:  # a lobby seat: in through the room, like a human
            page = await self._get(seats.entry_path(self.ctx.room, self.bot.label))
            code = seats.participant_code(page.path)
            if code:
                await db(seats.arrived)(self.run, self.bot, code,
                                        await self.ctx.otree.participants(self.run.session_code))
        else:
            page = await self._get(f"/InitializeParticipant/{self.bot.participant_code}")
        poll = WAIT_POLL[0]
        last_index = None
        for _step in range(MAX_STEPS):
            if self.ctx.stop.is_set():
                if page.is_end or (page.name and page.index != last_index):  # oTree took a form just before
                    accepted = await db(settle)(self.bot, before_index=10**9 if page.is_end else page.index)
                    await self.save(answers=self.bot.answers + accepted)
                return
            if page.is_end:
                accepted = await db(settle)(self.bot, before_index=10**9)
                await self.save(status=Bot.Status.FINISHED, page="(finished)", answers=self.bot.answers + accepted)
                return
            if not page.name:
                raise GiveUp(f"oTree answered {page.path} with HTTP {page.status_code}, not a participant page"
                             + (f": {page.text[:200]}" if page.text else ""))
            if page.index != last_index:
                poll = WAIT_POLL[0]
                last_index = page.index
                # A form sent earlier that oTree took (the participant moved on): settle it.
                accepted = await db(settle)(self.bot, before_index=page.index)
                await self.save(status=Bot.Status.WAIT_PAGE if page.is_wait else Bot.Status.PLAYING, app=page.app,
                                page=page.name, page_index=page.index, answers=self.bot.answers + accepted,
                                round_number=infer_round(self.bot.state, page.app, page.name, page.index))
                if self.run.purpose == BotRun.Purpose.PREFLIGHT:
                    await preflight.observe(self, page, self.html)
            if page.is_wait:
                if not await self.wait_for_ready(page):
                    await self.ctx.sleep(poll)
                    poll = min(WAIT_POLL[1], poll * 1.5)
                page = await self._get(page.url)
            elif not page.fields:
                self.remember(page)
                shown_page, page = page, await self._post(page.url, dict(page.hidden))
                if page.index == shown_page.index and page.redisplayed_with_errors:  # a field it does not show
                    raise GiveUp(f"oTree refused {page.name} without answers (a field the page does not show?): "
                                 + "; ".join(page.all_errors or ["no message"])[:300])
            else:
                page = await self.answer(page)
        raise GiveUp(f"stopped after {MAX_STEPS} pages without reaching the end")

    async def wait_for_ready(self, page: Page) -> bool:
        """Wait on oTree's own wait-page socket until it says "ready" (at most WAIT_SOCKET
        seconds, then the page is loaded again) or the run stops: no polling while
        others (humans, say) take their time. False when the page has no socket or it
        cannot be opened (the caller polls instead)."""
        if not page.socket_path or self.ctx.sockets_broken >= 3:
            return False
        url = self.ctx.otree.websocket_url(page.socket_path)  # a socket elsewhere: GiveUp
        try:
            async with self.ctx.otree.http.websocket(str(url)) as ws:
                receive = asyncio.ensure_future(ws.receive_json())
                stop = asyncio.ensure_future(self.ctx.stop.wait())
                try:
                    await asyncio.wait({receive, stop}, timeout=WAIT_SOCKET, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (receive, stop):
                        task.cancel()
                    await asyncio.gather(receive, stop, return_exceptions=True)
            return True
        except Exception:  # noqa: BLE001 - any socket failure: poll instead
            self.ctx.sockets_broken += 1
            log.info("wait-page socket of run %s failed; polling", self.run.pk, exc_info=True)
            return False

    def remember(self, page: Page) -> None:
        """Pages without fields (instructions, results) go into the next prompt."""
        seen = self.bot.state.setdefault("seen", [])
        seen.append(f"({page.app}, {page.name}) {page.text}"[:3000])
        del seen[:-10]

    async def answer(self, page: Page) -> Page:
        """Fill in and submit `page`; returns the page oTree shows next."""
        choices = resumed(page, await db(pending_rows)(self.bot, page.index))  # sent before a crash: the same again
        rejected: list[str] | None = None
        rejections = 0
        while True:
            if choices is None:
                self.from_cache = False
                choices = await self.decide(page, rejected)
                if self.ctx.stop.is_set():
                    return page
                await db(record_pending)(self.bot, page, choices, self.from_cache)
            result = await self._post(page.url, policy.form_data(page, choices))
            if result.index == page.index and result.name == page.name and result.redisplayed_with_errors:
                await db(settle)(self.bot, before_index=page.index + 1, status=Answer.Status.REJECTED)
                rejections += 1
                rejected = result.all_errors or ["oTree did not accept the answers (no message)"]
                if rejections > MAX_REJECTIONS:
                    raise GiveUp(f"oTree rejected the answers on {page.name} {rejections} times: "
                                 + "; ".join(rejected)[:300])
                await self.save(retries=self.bot.retries + 1)
                self.previous = {c.field: c.value for c in choices}
                choices = None
                page = result
                continue
            return result

    async def decide(self, page: Page, rejected: list[str] | None) -> list[policy.Choice]:
        if self.ctx.llm is None:
            return policy.random_choices(page, self.ctx.rng)
        with_memory = self.run.memory == BotRun.Memory.SUMMARY
        seen = list(self.bot.state.get("seen", []))
        user = policy.page_message(page, seen=seen, memory=self.bot.memory if with_memory else None,
                                   rejected=rejected, previous=self.previous)
        messages = [{"role": "system", "content": policy.system_prompt(self.run.instructions, with_memory)}]
        if not with_memory:
            messages += self.bot.history
        messages.append({"role": "user", "content": user})
        schema = policy.schema(page, with_memory)
        kind = ModelCall.Kind.RESUBMIT if rejected else ModelCall.Kind.ANSWER
        corrections = 0
        while True:
            attempt = await self.ask(page, kind, list(messages), schema)
            if attempt is None:  # stopped (on request, at the time limit or at a budget)
                return []
            choices, memory, problems = policy.parse_output(attempt.text, page, with_memory)
            if not problems:
                break
            corrections += 1
            if corrections > MAX_CORRECTIONS:
                raise GiveUp(f"the model's reply on {page.name} stayed unusable after {MAX_CORRECTIONS} "
                             f"corrections: {problems[0]}"[:500])
            messages = messages + [{"role": "assistant", "content": attempt.text},
                                   {"role": "user", "content": policy.correction_message(problems)}]
            kind = ModelCall.Kind.CORRECTION
            self.bot.retries += 1
        self.bot.state["seen"] = []
        if with_memory:
            self.bot.memory = memory
        else:
            self.bot.history = self.bot.history + [{"role": "user", "content": user},
                                                   {"role": "assistant", "content": attempt.text}]
        self.from_cache = attempt.cached
        await self.save(status=Bot.Status.PLAYING)
        return choices

    async def ask(self, page: Page, kind: str, messages: list[dict], schema: dict) -> Attempt | None:
        """The model's reply to `messages`: from the replay cache when the run uses it and
        has it (no request, no rate-limit slot, no cost), else from the model — unless a
        budget is reached (the run stops) or the run is stopping (None)."""
        ctx = self.ctx
        cache_key = occurrence = None
        if self.run.use_cache:
            cache_key = cache.key(ctx.llm.request_parameters(schema), self.bot.index, messages, ctx.codes)
            counts = self.bot.state.setdefault("cache", {})
            occurrence = counts[cache_key] = counts.get(cache_key, 0) + 1
            hit = await db(cache.lookup)(cache_key, occurrence)
            if hit is not None:
                attempt = Attempt(number=1, text=hit.response, prompt_tokens=hit.prompt_tokens,
                                  completion_tokens=hit.completion_tokens, returned_model=hit.returned_model,
                                  system_fingerprint=hit.system_fingerprint, cached=True)
                await self.record(page, kind, messages, attempt)
                return attempt
        reason = ctx.over_budget()
        if reason:
            ctx.halt(reason)
            return None

        async def on_attempt(attempt: Attempt) -> None:
            await self.record(page, kind, messages, attempt)

        async with ctx.semaphore:
            if ctx.stop.is_set():
                return None
            await self.save(status=Bot.Status.THINKING)
            attempt = await ctx.llm.complete(messages, schema=schema, on_attempt=on_attempt)
        if cache_key is not None and attempt.text and not attempt.error:
            await db(cache.store)(cache_key, occurrence, run=self.run, attempt=attempt)
        return attempt

    async def record(self, page: Page, kind: str, messages: list[dict], attempt: Attempt) -> None:
        """One model call (or cached answer): recorded with its cost, counted for the budget."""
        run = self.run
        cost = 0.0 if attempt.cached else budget.call_cost(attempt.prompt_tokens, attempt.completion_tokens,
                                                           run.price_input, run.price_output)
        await db(record_call)(self.bot, page, kind, messages, attempt, cost)
        self.ctx.spent += cost
        if not attempt.cached:  # the bot's tokens are what it was charged for
            self.bot.prompt_tokens += attempt.prompt_tokens
            self.bot.completion_tokens += attempt.completion_tokens
        if attempt.number > 1:
            self.bot.retries += 1
        self.ctx.changed(self.bot)
        await self.ctx.saw(attempt)


# --- database steps (run in the database thread) ----------------------------------------------

def pending_rows(bot: Bot, page_index: int) -> list[tuple[str, str, str]]:
    return list(Answer.objects.filter(bot=bot, page_index=page_index, status=Answer.Status.PENDING)
                .values_list("field", "value", "reason"))


def resumed(page: Page, rows: list[tuple[str, str, str]]) -> list[policy.Choice] | None:
    """The answers recorded for `page` before a crash, if they still fit its fields."""
    choices = []
    for name, value, reason in rows:
        f = page.field(name)
        choice = policy.choose(f, value, reason)[0] if f is not None else None
        if choice is None:
            return None
        choices.append(choice)
    return choices or None


def record_pending(bot: Bot, page: Page, choices: list[policy.Choice], cached: bool = False) -> None:
    Answer.objects.bulk_create([
        Answer(run_id=bot.run_id, bot=bot, app=page.app, round_number=bot.round_number or 1, page=page.name,
               page_index=page.index, field=c.field, value=c.value, reason=c.reason, cached=cached)
        for c in choices])


def settle(bot: Bot, *, before_index: int, status: str = Answer.Status.ACCEPTED) -> int:
    """Pending answers of pages before `before_index` get `status`; returns how many fields."""
    return Answer.objects.filter(bot=bot, status=Answer.Status.PENDING, page_index__lt=before_index).update(
        status=status)


def record_call(bot: Bot, page: Page, kind: str, messages: list, attempt: Attempt, cost: float = 0.0) -> None:
    ModelCall.objects.create(run_id=bot.run_id, bot=bot, page_index=page.index, page=page.name, kind=kind,
                             attempt=attempt.number, prompt=messages, response=attempt.text, error=attempt.error,
                             prompt_tokens=attempt.prompt_tokens, completion_tokens=attempt.completion_tokens,
                             latency_ms=attempt.latency_ms, cached=attempt.cached,
                             returned_model=attempt.returned_model, system_fingerprint=attempt.system_fingerprint,
                             cost_usd=cost)


def note_models(run: BotRun, models: list[str], fingerprints: list[str]) -> None:
    """The model ids and fingerprints the provider answered with, in the run and its manifest."""
    data = dict(run.manifest or {})
    data["returned_models"], data["system_fingerprints"] = list(models), list(fingerprints)
    set_run(run, manifest=data, returned_model=models[-1] if models else run.returned_model,
            system_fingerprint=fingerprints[-1] if fingerprints else run.system_fingerprint)


def record_manifest(run: BotRun) -> None:
    """The manifest, once the run's session exists (a resumed run keeps the one it has)."""
    if not run.manifest:
        set_run(run, manifest=manifest.build(run))


def close_manifest(run: BotRun) -> None:
    run.refresh_from_db(fields=["manifest", "finished_at", "status"])
    if run.manifest and run.finished_at:
        set_run(run, manifest={**run.manifest, "ended_at": run.finished_at.isoformat()})


def budget_reason(run: BotRun) -> str:
    """budget.exhausted with the caps as they are now (a lab manager may change them)."""
    if run.created_by_id:
        run.created_by.refresh_from_db(fields=["bot_monthly_budget_usd"])
    if run.experiment_id:
        run.experiment.refresh_from_db(fields=["budget_usd"])
    return budget.exhausted(run)


def cache_codes(run: BotRun) -> dict[str, str]:
    """The run's codes (session, participants) and the placeholders cache keys use instead."""
    codes = {run.session_code: "<session>"} if run.session_code else {}
    for bot in run.bots.all():
        codes[bot.participant_code] = f"<participant {bot.id_in_session}>"
    for seat in run.human_seats or []:
        codes[seat.get("code", "")] = f"<participant {seat.get('id_in_session')}>"
    codes.pop("", None)
    return codes


def load_run(run_id: int) -> BotRun | None:
    return BotRun.objects.select_related("instance", "provider", "created_by").filter(pk=run_id).first()


def app_access(run: BotRun) -> tuple[str, str]:
    """(loopback URL of the instance's app, its REST key)."""
    from instances import sleep
    from instances.runtime import RuntimeError_, get_runtime

    if type(run.instance).objects.filter(pk=run.instance_id, asleep=True).exists():  # (its page says why it woke)
        woken = sleep.wake_quietly(run.instance.name, f"a bot run (#{run.number})")
        if woken is not None:
            run.instance = woken
        set_run(run, status_reason=WOKE)
    try:
        url = get_runtime(run.instance).state(run.instance.name).app_url
    except RuntimeError_ as exc:
        raise RunFailed(f"the instance's runtime does not answer: {exc}") from None
    if not url:
        raise RunFailed("the instance's app is not running (deploy it, or start the instance)")
    return url, run.instance.rest_key


def begin(run_id: int) -> BotRun | None:
    """Claim the run for this worker; None when there is nothing to do."""
    run = BotRun.objects.filter(pk=run_id, status__in=BotRun.ACTIVE).first()
    if run is None:
        return None
    fields = {"deliveries": F("deliveries") + 1, "heartbeat_at": timezone.now()}
    if run.status == BotRun.Status.QUEUED:
        fields["status"] = BotRun.Status.STARTING
    BotRun.objects.filter(pk=run.pk).update(**fields)
    return load_run(run_id)


def save_session(run: BotRun, code: str, participants: list[dict]) -> None:
    with transaction.atomic():
        bots = participants[: run.num_bots]
        for i, p in enumerate(bots, start=1):
            Bot.objects.get_or_create(run=run, index=i, defaults={"participant_code": p["code"],
                                                                   "id_in_session": p["id_in_session"]})
        humans = [{"id_in_session": p["id_in_session"], "code": p["code"]} for p in participants[run.num_bots:]]
        set_run(run, session_code=code, human_seats=humans)


def fix_rounds(run: BotRun, rounds: dict[int, tuple[str, int]]) -> None:
    """Exact round numbers (from oTree's page times) for the recorded answers and bots."""
    for index, (_app, number) in rounds.items():
        Answer.objects.filter(run=run, page_index=index).exclude(round_number=number).update(round_number=number)
        Bot.objects.filter(run=run, page_index=index).exclude(round_number=number).update(round_number=number)


# --- the run ----------------------------------------------------------------------------------------

def _llm_for(run: BotRun, limiter: RateLimiter) -> LLMClient | None:
    if run.is_random:
        return None
    provider = run.provider
    if provider is None:
        raise RunFailed(f"the provider {run.provider_name!r} of this run no longer exists")
    if not provider.enabled:
        raise RunFailed(f"the provider {provider.name} is disabled")
    return LLMClient(base_url=provider.base_url, api_key=provider.api_key, model=run.model,
                     temperature=run.temperature, response_format=provider.response_format,
                     timeout=provider.timeout_seconds, limiter=limiter, seed=run.seed)


async def execute(run_id: int, *, budget: float | None = None) -> None:
    """Play run `run_id` until its bots are done, it is stopped, or its time is up.
    `budget`: seconds this worker may spend (the task's time limit, less a margin)."""
    try:
        await _execute(run_id, budget)
    finally:
        await db(close_old_connections)()


async def _execute(run_id: int, time_budget: float | None) -> None:
    run = await db(begin)(run_id)
    if run is None:
        return
    if run.stop_requested:
        await db(finish)(run, stop_text(run))
        await push_final(run)
        return
    if not run.is_random:  # a cap already reached: no session, no call
        reason = await db(budget_reason)(run)
        if reason:
            await db(finish)(run, reason)
            await push_final(run)
            return
    otree = None
    limiter = RateLimiter([(run_key(run.pk), run.rate_limit)]
                          + ([(provider_key(run.provider_id), run.provider.requests_per_minute)]
                             if run.provider_id and run.provider else []))
    llm = None
    try:
        url, rest_key = await db(app_access)(run)
        otree = OTree(url, rest_key)
        llm = _llm_for(run, limiter)
        room = await db(seats.room_name)(run) if run.room_id else None
        if run.room_id and room is None:
            raise RunFailed("the lobby room of this run no longer exists")
        if not run.session_code:
            code = await otree.find_session(run.session_label)
            if code is None:
                code = await otree.create_session(run.session_config, run.num_participants, run.session_label, room)
            if room:
                await db(seats.save_room_session)(run, code)
            else:
                await db(save_session)(run, code, await otree.participants(code))
        if room:  # the session is in the room: the ready humans go in now, beside the bots
            await db(seats.open_gate)(run)
        if run.status != BotRun.Status.RUNNING:
            await db(set_run)(run, status=BotRun.Status.RUNNING, started_at=run.started_at or timezone.now())
        await db(record_manifest)(run)
        ctx = RunContext(run, otree, llm)
        ctx.room = room
        ctx.spent = await db(budget.run_spent)(run)
        ctx.codes = await db(cache_codes)(run)
        await play_all(ctx, time_budget)
        if room:  # which participants the humans got, by their labels
            try:
                await db(seats.arrived)(run, None, "", await otree.participants(run.session_code))
            except (RunFailed, httpx2.HTTPError, ValueError):
                log.warning("no participants of bot run %s's session", run.pk, exc_info=True)
        try:
            rounds = await otree.page_rounds(run.session_code)
            await db(fix_rounds)(run, rounds)
        except (httpx2.HTTPError, GiveUp, ValueError):
            log.warning("no exact round numbers for bot run %s", run.pk, exc_info=True)
        await db(finish)(run, ctx.stop_reason)
    except RunFailed as exc:
        await db(set_run)(run, status=BotRun.Status.FAILED, status_reason=str(exc)[:500], finished_at=timezone.now())
    finally:
        for closing in (otree, llm, limiter):
            if closing is not None:
                await closing.close()
    await db(close_manifest)(run)
    await push_final(run)


async def push_final(run: BotRun) -> None:
    await db(run.refresh_from_db)()
    if run.room_id:
        await db(seats.push_board)(run)
    await db(run_ended)(run)  # an experiment's next runs
    bots = await db(bots_of)(run)
    layer = get_channel_layer()
    if layer is not None:
        try:
            await layer.group_send(run_group(run.pk), {"type": "push", "event": run_event(run, bots, bots)})
        except Exception:  # noqa: BLE001
            log.warning("final live update of bot run %s failed", run.pk, exc_info=True)


async def play_all(ctx: RunContext, time_budget: float | None) -> None:
    run = ctx.run
    for bot in await db(bots_of)(run):
        ctx.players[bot.pk] = BotPlayer(ctx, bot)
    tasks = {asyncio.ensure_future(p.play()): p for p in ctx.players.values() if p.bot.status not in Bot.DONE}
    deadline = time.monotonic() + time_budget if time_budget else None
    run_deadline = run.deadline
    await ctx.push(full=True)
    last_beat = 0.0
    halted = False
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=PUSH_INTERVAL)
        await ctx.push()
        now = time.monotonic()
        if now - last_beat >= HEARTBEAT_INTERVAL or not pending:
            last_beat = now
            stop_requested = await db(heartbeat)(run)
            if not ctx.stop.is_set():
                if stop_requested:
                    ctx.stop_reason = "stopped on request"
                elif timezone.now() >= run_deadline or (deadline and now >= deadline):
                    ctx.stop_reason = f"the time limit of {run.time_limit_minutes} min was reached"
                elif ctx.llm is not None and pending:  # the experiment's and the monthly cap (other runs spend too)
                    ctx.stop_reason = ctx.over_budget() or await db(budget_reason)(run)
        if ctx.stop_reason and not halted:  # from above, or a bot that met a budget
            halted = True
            ctx.stop.set()
            await db(set_run)(run, status=BotRun.Status.STOPPING, status_reason=ctx.stop_reason[:500])
            ctx.live.run_changed = True
            if pending:
                pending = await stop_bots(ctx, pending, tasks)
    await ctx.push()


async def stop_bots(ctx: RunContext, pending: set, tasks: dict) -> set:
    """Let the bots reach a safe point (STOP_GRACE); then cancel those still asking the model
    or sleeping. A bot sending a form finishes sending it (bounded by the HTTP timeout)."""
    done, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
    for task in pending:
        if not tasks[task].submitting:
            task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=HTTP_TIMEOUT + 5)
    return set()


def heartbeat(run: BotRun) -> bool:
    """Mark the run alive; returns whether someone asked it to stop."""
    BotRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
    return BotRun.objects.filter(pk=run.pk, stop_requested=True).exists()
