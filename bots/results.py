"""Analysis-ready results of bot runs: one tidy table, one row per accepted answered field,
with the design's factors of its run and oTree's own data for the same participant.

For a set of runs (one run, or every run of a BotExperiment):

- the bot data: experiment and run numbers, the factors (`run.factors`, falling back to
  the run's own parameters: model, provider, temperature, instructions, memory,
  repetition; other factor keys as `factor_<key>`), the model id the provider returned,
  the seed, session and participant codes, bot index and participant label, app, round,
  page, field, the answer, the model's reason, whether it came from the replay cache;
- joined from oTree's wide export of the run's session (`/api/export_wide?session_code=`,
  read through the instance's REST API, instances/otree_api.py): `otree_participant_payoff`,
  `otree_player_payoff` and `otree_field_value` (the player's stored value of the row's own
  field) for the row's app and round, and `otree_player_<field>` for every player field of
  the apps the answers are in (empty where the row's app has no such field);
- `otree_note`: empty when joined, else why oTree's data is missing for the row (the app
  does not run, it did not answer, the participant is not in its export, ...). The bot
  data are always there.

Downloads (`render`): results.csv, results.parquet (typed columns: numbers as numbers,
the cached flag as a boolean; answers as text), manifests.json (each run's manifest, or
its parameters when it recorded none, with the oTree note) and results.zip with all three.

oTree's export is the tenant's code's output: read with a size limit (WIDE_LIMIT per
session) and a time limit (JOIN_SECONDS for all runs together); a table over MAX_ROWS
answers is refused with the reason (download the runs one by one).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
import zipfile
from dataclasses import dataclass, field

from django.http import Http404

from bots.models import Answer, BotExperiment, BotRun
from instances import otree_api, sleep
from manager import locks
from instances.otree_api import OTreeUnavailable

MAX_ROWS = 100_000  # accepted answers in one table (about 150 MB of memory while it is built)
WIDE_LIMIT = 50 * 2**20  # bytes of one session's wide export
JOIN_SECONDS = 120  # reading oTree's exports of all runs together
KINDS = ("results.csv", "results.parquet", "manifests.json", "results.zip")

FACTORS = ("model", "provider", "temperature", "instructions", "memory", "repetition")
BASE = ["experiment", "run", *FACTORS, "returned_model", "seed", "session", "participant", "bot", "label", "app",
        "round", "page", "field", "answer", "reason", "cached"]
JOINED = ["otree_participant_payoff", "otree_player_payoff", "otree_field_value", "otree_note"]
INTEGERS = {"experiment", "run", "repetition", "seed", "bot", "round"}
FLOATS = {"temperature", "otree_participant_payoff", "otree_player_payoff"}


class ResultsRefused(Exception):
    """No table now (HTTP 409); the message says why and what to do."""


class ResultsTooLarge(ResultsRefused):
    """More answers than MAX_ROWS."""


class ResultsBusy(ResultsRefused):
    """Another results download of the instance is being made (one at a time per instance:
    each reads oTree's exports from the tenant's app, up to JOIN_SECONDS)."""


@dataclass
class Results:
    name: str  # file name stem: <instance>-bot-experiment-3 / <instance>-bot-run-7
    columns: list[str]
    rows: list[dict]
    manifests: list[dict]
    notes: dict[int, str] = field(default_factory=dict)  # run number -> why oTree's data is missing


# --- which runs ------------------------------------------------------------------------------

def for_run(run: BotRun) -> Results:
    with _one_at_a_time(run.instance):
        return build([run], f"{run.instance.name}-bot-run-{run.number}")


def for_experiment(experiment: BotExperiment) -> Results:
    runs = list(experiment.runs.select_related("instance", "experiment", "created_by").order_by("number"))
    with _one_at_a_time(experiment.instance):
        return build(runs, f"{experiment.instance.name}-bot-experiment-{experiment.number}")


@contextlib.contextmanager
def _one_at_a_time(instance):
    """One results table per instance at a time: a slow (or hostile) app then holds at most
    one of the web server's threads per instance, not one per click."""
    try:
        with locks.lock(f"results:{instance.pk}", wait=0):
            yield
    except locks.Busy:
        raise ResultsBusy(f"a results download of {instance.name} is being made (it reads oTree's data from the "
                          "app): try again when it is done") from None


# --- oTree's side ----------------------------------------------------------------------------

def _wide(instance, base: str, code: str, deadline: float) -> dict[str, dict]:
    """participant code -> {"payoff": participant.payoff, "players": {(app, round): {field:
    value}}} from oTree's wide export of session `code` (columns `<app>.<round>.player.<field>`)."""
    data = otree_api.get_bytes(instance, "/api/export_wide", params={"session_code": code}, limit=WIDE_LIMIT,
                               base_url=base, deadline=deadline)
    text = data.decode("utf-8-sig", errors="replace")
    del data
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None) or []
    if "participant.code" not in header:
        raise OTreeUnavailable("oTree's wide export of the session has no participant.code column")
    code_at = header.index("participant.code")
    payoff_at = header.index("participant.payoff") if "participant.payoff" in header else None
    player_columns = []  # (position, (app, round), field)
    for position, name in enumerate(header):
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[2] == "player" and parts[1].isdigit():
            player_columns.append((position, (parts[0], int(parts[1])), parts[3]))
    found = {}
    for row in reader:
        if len(row) <= code_at or not row[code_at]:
            continue
        players: dict[tuple[str, int], dict[str, str]] = {}
        for position, key, name in player_columns:
            if position < len(row):
                players.setdefault(key, {})[name] = row[position]
        found[row[code_at]] = {"payoff": row[payoff_at] if payoff_at is not None and payoff_at < len(row) else "",
                               "players": players}
    return found


class OTreeSide:
    """Reads oTree's wide export one session at a time (only one is held in memory), with
    one time limit for all of them; `read(run)` -> ({participant code -> wide row} or None,
    the note when not read)."""

    def __init__(self):
        self.deadline = time.monotonic() + JOIN_SECONDS
        self.bases: dict[int, str | OTreeUnavailable] = {}

    def read(self, run: BotRun) -> tuple[dict | None, str]:
        if not run.session_code:
            return None, "oTree's data not joined: the run has no oTree session"
        instance = run.instance
        if instance.pk not in self.bases:
            try:
                sleep.wake(instance.name, "a download of bot results")  # (its database sleeps too)
                self.bases[instance.pk] = otree_api.app_url(instance)
            except OTreeUnavailable as exc:
                self.bases[instance.pk] = exc
        base = self.bases[instance.pk]
        if isinstance(base, OTreeUnavailable):
            return None, f"oTree's data could not be read: {base}"
        try:
            return _wide(instance, base, run.session_code, self.deadline), ""
        except OTreeUnavailable as exc:
            return None, f"oTree's data could not be read: {exc}"


# --- the table -------------------------------------------------------------------------------

def _factors(run: BotRun) -> dict:
    given = run.factors if isinstance(run.factors, dict) else {}
    own = {"model": run.model, "provider": run.provider_name, "temperature": run.temperature,
           "instructions": run.instructions, "memory": run.memory, "repetition": run.repetition}
    values = {k: given.get(k, own[k]) for k in FACTORS}
    extra = {f"factor_{k}": v for k, v in given.items() if k not in FACTORS}
    return {**values, **extra}


def manifest_of(run: BotRun, note: str) -> dict:
    from bots import exports

    entry = {"experiment": run.experiment.number if run.experiment_id else None, "run": run.number,
             "session": run.session_code}
    if run.manifest:
        entry["manifest"] = run.manifest
    else:
        entry["manifest"] = exports.summary(run)
        entry["manifest_note"] = "the run recorded no manifest: its parameters and summary instead"
    entry["otree_data"] = note or "joined from oTree's wide export of the session"
    return entry


def build(runs: list[BotRun], name: str) -> Results:
    total = Answer.objects.filter(run__in=runs, status=Answer.Status.ACCEPTED).count()
    if total > MAX_ROWS:
        raise ResultsTooLarge(f"{total} answers are more than one table holds ({MAX_ROWS}): download the runs' "
                              "results one by one")
    side = OTreeSide()
    notes: dict[int, str] = {}
    rows: list[dict] = []
    player_fields: list[str] = []
    seen_fields: set[str] = set()
    extra_factors: list[str] = []
    for run in runs:
        factors = _factors(run)
        for key in factors:
            if key.startswith("factor_") and key not in extra_factors:
                extra_factors.append(key)
        wide, notes[run.pk] = side.read(run)
        answers = (Answer.objects.filter(run=run, status=Answer.Status.ACCEPTED).select_related("bot")
                   .order_by("bot__index", "page_index", "id"))
        for a in answers.iterator(chunk_size=2000):
            row = {"experiment": run.experiment.number if run.experiment_id else None, "run": run.number,
                   **factors, "returned_model": run.returned_model, "seed": run.seed, "session": run.session_code,
                   "participant": a.bot.participant_code, "bot": a.bot.index, "label": a.bot.label,
                   "app": a.app, "round": a.round_number, "page": a.page, "field": a.field, "answer": a.value,
                   "reason": a.reason, "cached": a.cached}
            note = notes[run.pk]
            item = wide.get(a.bot.participant_code) if wide is not None else None
            if wide is not None and item is None:
                note = "oTree's data not joined: the participant is not in oTree's export of the session"
            if item is not None:
                row["otree_participant_payoff"] = item["payoff"]
                player = item["players"].get((a.app, a.round_number))
                if player is None:
                    note = f"oTree's export has no round {a.round_number} of {a.app} for the participant"
                else:
                    row["otree_player_payoff"] = player.get("payoff", "")
                    row["otree_field_value"] = player.get(a.field, "")
                    for key, value in player.items():
                        column = "otree_player_" + key
                        row[column] = value
                        if column not in seen_fields:
                            seen_fields.add(column)
                            player_fields.append(column)
            row["otree_note"] = note
            rows.append(row)
        wide = None  # the next session's export replaces it
    columns = BASE[:8] + extra_factors + BASE[8:] + JOINED + [
        c for c in player_fields if c not in ("otree_player_payoff",)]
    manifests = [manifest_of(run, notes[run.pk]) for run in runs]
    return Results(name=name, columns=columns, rows=rows, manifests=manifests,
                   notes={run.number: notes[run.pk] for run in runs if notes[run.pk]})


# --- files -----------------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_csv(results: Results) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(results.columns)
    for row in results.rows:
        writer.writerow([_cell(row.get(c)) for c in results.columns])
    return buffer.getvalue().encode("utf-8")


def _number(text):
    """int or float of an oTree export cell; None when empty; ValueError when not a number."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    value = float(text)
    return int(value) if value.is_integer() and "." not in str(text) and "e" not in str(text).lower() else value


def _otree_type(values: list) -> str:
    """'int', 'float' or 'string' for a joined oTree column (whatever all its cells are)."""
    kind = "string"  # no value at all: text
    for v in values:
        if v in (None, ""):
            continue
        kind = "int" if kind == "string" else kind
        try:
            number = _number(v)
        except (TypeError, ValueError):
            return "string"
        if isinstance(number, float):
            kind = "float"
    return kind


def _column(column: str, values: list):
    """(pyarrow type, values) of one column: the declared type (INTEGERS, FLOATS, `cached`),
    the joined oTree columns numeric when every value is a number; text otherwise (a value
    that does not fit the declared type makes the column text, never an error)."""
    import pyarrow as pa

    def text():
        return pa.string(), [None if v is None or (v == "" and column.startswith("otree_")) else _cell(v)
                             for v in values]

    if column == "cached":
        return pa.bool_(), [bool(v) for v in values]
    if column in INTEGERS or column in FLOATS or column.startswith("otree_player_") or column == "otree_field_value":
        found = _otree_type(values)
        if all(v in (None, "") for v in values) and (column in INTEGERS or column in FLOATS):
            found = "float" if column in FLOATS else "int"  # no value: the declared type, all null
        if found == "string" or (column in INTEGERS and found == "float"):
            return text()
        if found == "int" and column not in FLOATS:
            return pa.int64(), [_number(v) for v in values]
        return pa.float64(), [None if v in (None, "") else float(v) for v in values]
    return text()


def to_parquet(results: Results) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, fields = [], []
    for column in results.columns:
        kind, data = _column(column, [row.get(column) for row in results.rows])
        try:
            arrays.append(pa.array(data, type=kind))
        except (pa.ArrowInvalid, OverflowError):  # e.g. an integer beyond int64: as text
            kind = pa.string()
            arrays.append(pa.array([None if v is None else _cell(v) for v in data], type=kind))
        fields.append(pa.field(column, kind))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def to_manifests(results: Results) -> bytes:
    return json.dumps({"name": results.name, "runs": results.manifests}, indent=1, default=str).encode("utf-8")


def to_zip(results: Results) -> bytes:
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("results.csv", to_csv(results))
        zf.writestr("results.parquet", to_parquet(results))
        zf.writestr("manifests.json", to_manifests(results))
    return sink.getvalue()


CONTENT_TYPES = {
    "results.csv": ("text/csv; charset=utf-8", to_csv),
    "results.parquet": ("application/vnd.apache.parquet", to_parquet),
    "manifests.json": ("application/json", to_manifests),
    "results.zip": ("application/zip", to_zip),
}


def render(results: Results, kind: str) -> tuple[bytes, str, str]:
    """(content, content type, file name) of download `kind` (Http404 for another name)."""
    if kind not in CONTENT_TYPES:
        raise Http404(f"No such download: {', '.join(KINDS)}.")
    content_type, make = CONTENT_TYPES[kind]
    stem, _, ext = kind.partition(".")
    return make(results), content_type, f"{results.name}-{stem}.{ext}"
