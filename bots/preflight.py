"""Preflight: before a paid run, a random-policy pass of a session config (a BotRun with
purpose PREFLIGHT, model "random", every participant a bot, played by the ordinary engine)
that records every page the bots meet and flags the pages they cannot play.

The engine calls `observe(player, page, html)` when a bot reaches a new page (only in a
preflight run); the report is written into `run.report` as the pages are met:

    {"pages": [{"app", "page", "index", "round", "bots": [1, 2], "wait": bool,
                "fields": [{"name", "kind", "widget", "required"}], "problems": [...]}],
     "problems": [{"app", "page", "index", "kind", "detail"}]}

Problems found in a page's HTML (`analyse`):
- `javascript`: a form field filled only by JavaScript — a hidden input of oTree's form
  that a script sets or that has no value (an oTree model field rendered hidden), or a
  script that adds inputs to the form;
- `live`: a live page (oTree's live.js for a `live_method`, or `liveSend(` in a script):
  bots only submit forms;
- `widget`: inputs the page reader does not understand (a slider, date, colour or file
  input, a custom element) or named inputs outside oTree's form (never sent);
- `trials`: an oTree trials page (answered by JavaScript).

and, at reading time (`report`), `stuck`: every bot that gave up, with its reason and page.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from django.db import transaction

from bots.models import Bot, BotRun

KNOWN_INPUTS = {"text", "number", "radio", "checkbox", "hidden", "submit", "button", "reset", "email", "url",
                "tel", "search", "password", ""}
CUSTOM_INPUTS = {"range", "date", "datetime-local", "time", "month", "week", "color", "file", "image"}
LIVE_SCRIPT = re.compile(r"\bliveSend\s*\(")
ADDS_INPUTS = re.compile(r"""createElement\(\s*['"]input['"]|<input\b""", re.IGNORECASE)
MAX_PROBLEMS = 200  # in one report
MAX_PAGES = 500


class _Scan(HTMLParser):
    """What a browser would run on the page: scripts, and the inputs in and outside oTree's form."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.in_form = 0
        self.in_script = False
        self.scripts: list[str] = []
        self.live = False
        self.trials = False
        self.hidden: list[tuple[str, str, str]] = []  # (name, value, id) in the form
        self.custom: list[str] = []  # descriptions
        self.outside: list[str] = []  # named inputs outside the form
        self.depth_stack: list[str] = []

    def handle_starttag(self, tag, attrs_list):
        attrs = {k: (v if v is not None else "") for k, v in attrs_list}
        if tag == "form":
            self.depth_stack.append("form#form" if attrs.get("id") == "form" else "form")
            if attrs.get("id") == "form":
                self.in_form += 1
            if attrs.get("id") == "_trials-submit-form":
                self.trials = True
        if tag == "script":
            self.in_script = True
            self.scripts.append("")
            src = attrs.get("src", "")
            if attrs.get("id") == "otree-live" or src.rstrip("/").endswith("otree/js/live.js"):
                self.live = True
            return
        if tag in ("input", "select", "textarea"):
            name = attrs.get("name", "")
            kind = attrs.get("type", "text").lower() if tag == "input" else tag
            if not self.in_form:
                if name:
                    self.outside.append(name)
                return
            if kind == "hidden" and name:
                self.hidden.append((name, attrs.get("value", ""), attrs.get("id", "")))
            elif tag == "input" and (kind in CUSTOM_INPUTS or kind not in KNOWN_INPUTS):
                self.custom.append(f"<input type={kind}{f' name={name}' if name else ''}>")
        elif "-" in tag and self.in_form:
            self.custom.append(f"<{tag}>")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag == "script":
            self.in_script = False

    def handle_endtag(self, tag):
        if tag == "script":
            self.in_script = False
        elif tag == "form" and self.depth_stack:
            if self.depth_stack.pop() == "form#form":
                self.in_form -= 1

    def handle_data(self, data):
        if self.in_script and self.scripts:
            self.scripts[-1] += data


def analyse(page, html: str) -> list[dict]:
    """The problems bots have with `page` (parsed by bots/page.py), read from its HTML."""
    if page.is_wait or page.is_end:
        return []
    scan = _Scan()
    scan.feed(html)
    scan.close()
    code = "\n".join(scan.scripts)
    problems = []
    if scan.live or LIVE_SCRIPT.search(code):
        problems.append(("live", "a live page (live_method / liveSend): it talks to the server from JavaScript; "
                                 "bots only submit forms"))
    if scan.trials:
        problems.append(("trials", "an oTree trials page: its answers are sent by JavaScript"))
    for name, value, element_id in scan.hidden:
        if name.startswith("_") or name == "csrfmiddlewaretoken":
            continue
        named = re.search(r"\b" + re.escape(name) + r"\b", code) or (element_id and element_id in code)
        if named:
            problems.append(("javascript", f"the field {name} is a hidden input that a script fills in: bots "
                                           "cannot answer it"))
        elif value == "":
            problems.append(("javascript", f"the field {name} is a hidden input without a value (filled in by "
                                           "JavaScript?): bots cannot answer it"))
    own = ("timeout_happened",)  # oTree's timer adds this input when the time is up: not the page's
    if page.has_form and any(ADDS_INPUTS.search(c) and not any(o in c for o in own) for c in scan.scripts):
        problems.append(("javascript", "a script adds inputs to the form: bots cannot see or answer them"))
    for widget in dict.fromkeys(scan.custom):
        problems.append(("widget", f"a custom widget {widget}: the bots' page reader does not understand it"))
    for name in dict.fromkeys(scan.outside):
        if page.field(name) is None:
            problems.append(("widget", f"the input {name} is outside oTree's form: bots never send it"))
    return [{"kind": kind, "detail": detail} for kind, detail in problems]


# --- recording, from the engine ------------------------------------------------------------

def _save_report(run_id: int, entry: dict) -> None:
    """Merge one page met by one bot into the run's report (a row lock: bots of the run
    write one after the other)."""
    with transaction.atomic():
        run = BotRun.objects.select_for_update().only("pk", "report").get(pk=run_id)
        report = run.report if isinstance(run.report, dict) else {}
        pages = report.setdefault("pages", [])
        problems = report.setdefault("problems", [])
        key = (entry["app"], entry["page"], entry["index"])
        found = next((p for p in pages if (p.get("app"), p.get("page"), p.get("index")) == key), None)
        if found is None:
            if len(pages) >= MAX_PAGES:
                report["truncated"] = True
                BotRun.objects.filter(pk=run_id).update(report=report)
                return
            found = {k: entry[k] for k in ("app", "page", "index", "round", "wait", "fields", "problems")}
            found["bots"] = []
            pages.append(found)
            for problem in entry["problems"]:
                if len(problems) < MAX_PROBLEMS:
                    problems.append({"app": entry["app"], "page": entry["page"], "index": entry["index"],
                                     "round": entry["round"], **problem})
        if entry["bot"] not in found["bots"]:
            found["bots"].append(entry["bot"])
        BotRun.objects.filter(pk=run_id).update(report=report)


async def observe(player, page, html: str) -> None:
    """Record `page` (just reached by `player`, a BotPlayer of a preflight run)."""
    from asgiref.sync import sync_to_async

    entry = {"bot": player.bot.index, "app": page.app, "page": page.name, "index": page.index,
             "round": player.bot.round_number or 1, "wait": page.is_wait,
             "fields": [{"name": f.name, "kind": f.kind, "widget": f.widget, "required": f.required}
                        for f in page.fields],
             "problems": analyse(page, html)}
    await sync_to_async(_save_report)(player.run.pk, entry)


# --- reading ---------------------------------------------------------------------------------

def report(run: BotRun) -> dict:
    """The run's report with the bots that got stuck (gave up) as problems; `ok` when a
    finished preflight found nothing."""
    data = run.report if isinstance(run.report, dict) else {}
    pages = list(data.get("pages", []))
    problems = list(data.get("problems", []))
    for bot in run.bots.filter(status=Bot.Status.GAVE_UP).order_by("index"):
        problems.append({"app": bot.app, "page": bot.page, "index": bot.page_index, "round": bot.round_number,
                         "kind": "stuck", "detail": f"bot {bot.index} got stuck: {bot.reason}"})
    flagged = {(p["app"], p["page"]) for p in problems}
    return {"pages": pages, "problems": problems, "flagged_pages": sorted(f"{a}/{p}" for a, p in flagged),
            "truncated": bool(data.get("truncated")),
            "ok": run.status == BotRun.Status.FINISHED and not problems}


def start(actor, instance, *, session_config: str, num_participants: int, request=None) -> BotRun:
    """A preflight of `session_config`: a random-policy run, every participant a bot. The
    run is marked before its task can start (the enqueue waits for this transaction)."""
    from bots import services
    from manager.audit.services import record

    with transaction.atomic():
        run = services.create_run(actor, instance, session_config=session_config, num_participants=num_participants,
                                  num_bots=num_participants, provider=None, model="random", request=request)
        BotRun.objects.filter(pk=run.pk).update(purpose=BotRun.Purpose.PREFLIGHT, report={"pages": [], "problems": []})
        run.purpose = BotRun.Purpose.PREFLIGHT
        run.report = {"pages": [], "problems": []}
        record(actor, "bots.preflight", instance, f"started a preflight of {session_config} on {instance.name} "
                                                  f"(bot run #{run.number})", request)
    return run
