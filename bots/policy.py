"""What a bot answers: the prompt, the JSON answer schema, checking the model's output
against the page's fields, and the offline random policy.

The model answers every page with one JSON object:

    {"answers": [{"field": "guess", "value": 33, "reason": "…"}], "memory": "…"}

`memory` (with memory = summary) is the bot's running summary: its notes replace the
previous ones and are all it remembers of earlier pages. With memory = history the whole
conversation is sent instead and `memory` is not asked for.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from bots.page import CHECKBOX, CHOICE, FLOAT, NUMBER, Field, Page

# The version of the prompts below (SYSTEM, MEMORY_KEY, page_message, correction_message),
# recorded in every run's manifest. Bump it with any change to what the model is sent —
# wording, order, the fields' JSON — so a reviewer knows which prompts a run used (and the
# replay cache, keyed on the messages themselves, no longer hits for the old ones).
TEMPLATE_VERSION = "2026-12-1"

SYSTEM = """\
You take part in an economics experiment as one of its participants. The experiment runs \
in oTree: you see one page at a time, with its text and the form fields to fill in. Read \
each page carefully and answer as a thoughtful participant would. Your answers are \
submitted as they are, so they must be valid for each field.

Reply with one JSON object and nothing else, of this form:
{"answers": [{"field": "<field name>", "value": <your answer>, "reason": "<one or two \
sentences: why>"}]MEMORY_KEY}
Give exactly one answer for every field listed. Values: a whole number for "integer" \
fields, a number for "float" fields, text for "text" fields, one of the listed choice \
values for "choice" fields, true or false for "checkbox" fields; stay within min, max \
and max_length."""

MEMORY_KEY = ', "memory": "<your notes for later pages: what you learned and what happened so far, at most \
150 words>"'

NO_FIELDS_NOTE = "There is nothing to fill in on this page."


@dataclass
class Choice:
    """One field's answer: `value` as recorded (the submitted value; "true"/"false" for a
    checkbox), `submit` as the form sends it."""

    field: str
    value: str
    submit: str | None  # None: leave out of the form (an unchecked checkbox)
    reason: str = ""


def choose(f: Field, value, reason: str = "") -> tuple[Choice | None, str]:
    """(the answer, problem) for `value` given to field `f`."""
    submit, problem = coerce(f, value)
    if problem:
        return None, problem
    recorded = ("true" if submit is not None else "false") if f.kind == CHECKBOX else submit
    return Choice(f.name, recorded, submit, reason), ""


def schema(page: Page, with_memory: bool) -> dict:
    """JSON schema of the answer object (for providers with response_format json_schema)."""
    answer = {
        "type": "object",
        "properties": {"field": {"type": "string", "enum": [f.name for f in page.fields]},
                       "value": {"type": ["string", "number", "boolean"]},
                       "reason": {"type": "string"}},
        "required": ["field", "value", "reason"],
        "additionalProperties": False,
    }
    properties = {"answers": {"type": "array", "items": answer}}
    required = ["answers"]
    if with_memory:
        properties["memory"] = {"type": "string"}
        required.append("memory")
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def system_prompt(instructions: str, with_memory: bool) -> str:
    text = SYSTEM.replace("MEMORY_KEY", MEMORY_KEY if with_memory else "")
    if instructions.strip():
        text += "\n\nInstructions from the experimenter for you:\n" + instructions.strip()
    return text


def page_message(page: Page, *, seen: list[str], memory: str | None, rejected: list[str] | None = None,
                 previous: dict | None = None) -> str:
    """The user message for `page`: what the bot remembers, the pages it read since its last
    answer, the page, its fields (as JSON) and, after a rejection, why."""
    parts = []
    if memory is not None:
        parts.append("Your notes from earlier pages:\n" + (memory.strip() or "(none yet)"))
    if seen:
        parts.append("Pages you read since your last answer:\n" + "\n---\n".join(seen))
    parts.append(f"Current page ({page.app}, {page.name}):\n{page.text or page.title}")
    parts.append("Fields to fill in (JSON):\n" + json.dumps([f.describe() for f in page.fields], ensure_ascii=False))
    if rejected:
        parts.append("The experiment rejected your previous answers "
                     f"{json.dumps(previous or {}, ensure_ascii=False)} with these messages:\n- "
                     + "\n- ".join(rejected) + "\nAnswer again, taking the messages into account.")
    return "\n\n".join(parts)


def correction_message(problems: list[str]) -> str:
    return ("Your reply could not be used:\n- " + "\n- ".join(problems)
            + "\nReply again with only the JSON object, one answer for every field.")


FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_output(text: str, page: Page, with_memory: bool) -> tuple[list[Choice], str, list[str]]:
    """(choices, memory, problems): the model's reply checked against the page's fields.
    `problems` is empty when every field got a valid answer."""
    raw = (text or "").strip()
    fenced = FENCE.match(raw)
    if fenced:
        raw = fenced.group(1)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        return [], "", [f"the reply is not valid JSON ({exc.msg} at character {exc.pos})"]
    if not isinstance(data, dict):
        return [], "", ["the reply must be a JSON object with the key \"answers\""]
    answers = data.get("answers")
    if isinstance(answers, dict):  # {"guess": 33} or {"guess": {"value": 33, "reason": …}}
        answers = [{"field": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in answers.items()]
    if not isinstance(answers, list):
        return [], "", ["\"answers\" must be a list of {\"field\", \"value\", \"reason\"} objects"]
    problems, choices, given = [], [], {}
    for item in answers:
        if not isinstance(item, dict) or "field" not in item or "value" not in item:
            problems.append("every answer needs \"field\" and \"value\"")
            continue
        given[str(item["field"])] = item
    for name in given:
        if page.field(name) is None:
            problems.append(f"there is no field {name!r} on this page (fields: {', '.join(f.name for f in page.fields)})")
    for f in page.fields:
        item = given.get(f.name)
        if item is None:
            if f.kind == CHECKBOX or not f.required:
                choices.append(choose(f, False if f.kind == CHECKBOX else "", "(no answer given)")[0])
            else:
                problems.append(f"no answer for the field {f.name!r}")
            continue
        choice, problem = choose(f, item["value"], str(item.get("reason") or "")[:2000])
        if problem:
            problems.append(f"{f.name}: {problem}")
        else:
            choices.append(choice)
    memory = data.get("memory")
    if with_memory and not isinstance(memory, str):
        problems.append("\"memory\" (your notes, a string) is missing")
    return choices, memory if isinstance(memory, str) else "", problems


TRUE = {"true", "yes", "y", "1", "on", "checked"}
FALSE = {"false", "no", "n", "0", "off", "unchecked", ""}


def coerce(f: Field, value) -> tuple[str | None, str]:
    """(what the form sends, problem): the model's value for field `f`."""
    if f.kind == CHECKBOX:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in TRUE | FALSE:
            checked = value if isinstance(value, bool) else text in TRUE
            return (f.checkbox_value if checked else None), ""
        return None, "answer true or false"
    if f.kind == CHOICE:
        text = str(value).strip()
        if isinstance(value, bool):
            text = "True" if value else "False"
        for v, label in f.choices:
            if text == v:
                return v, ""
        for v, label in f.choices:  # the label instead of the value, or another spelling
            if text.lower() in (v.lower(), label.lower()):
                return v, ""
        return None, f"{value!r} is not one of the choices {[v for v, _ in f.choices]}"
    if f.kind in (NUMBER, FLOAT):
        if isinstance(value, bool):
            return None, "a number is needed, not true/false"
        try:
            number = float(str(value).strip().replace(",", ".")) if not isinstance(value, (int, float)) else value
        except ValueError:
            return None, f"{value!r} is not a number"
        if f.kind == NUMBER:
            if not float(number).is_integer():
                return None, f"{value!r} is not a whole number"
            number = int(number)
        if f.min is not None and number < f.min:
            return None, f"{number} is below the minimum {f.min}"
        if f.max is not None and number > f.max:
            return None, f"{number} is above the maximum {f.max}"
        return str(number), ""
    text = "" if value is None else str(value)
    if not f.required and not text.strip():
        return "", ""
    if f.required and not text.strip():
        return None, "an answer is required"
    if f.max_length and len(text) > f.max_length:
        return None, f"at most {f.max_length} characters"
    return text, ""


def form_data(page: Page, choices: list[Choice]) -> dict[str, str]:
    data = dict(page.hidden)
    for c in choices:
        if c.submit is not None:
            data[c.field] = c.submit
    return data


# --- the offline random policy -----------------------------------------------------------

WORDS = ["blue", "river", "quiet", "seven", "maple", "honest", "sunny", "paper", "swift", "amber"]


def random_value(f: Field, rng: random.Random):
    if f.kind == CHECKBOX:
        return rng.random() < 0.5
    if f.kind == CHOICE:
        return rng.choice(f.choices)[0] if f.choices else ""
    if f.kind == NUMBER:
        low = int(f.min) if f.min is not None else 0
        high = int(f.max) if f.max is not None else max(low, 0) + 100
        return rng.randint(low, max(low, high))
    if f.kind == FLOAT:
        low = float(f.min) if f.min is not None else 0.0
        high = float(f.max) if f.max is not None else low + 100.0
        return round(rng.uniform(low, max(low, high)), 2)
    text = " ".join(rng.choice(WORDS) for _ in range(2))
    return text[: f.max_length] if f.max_length else text


def random_choices(page: Page, rng: random.Random) -> list[Choice]:
    """A valid random answer for every field of `page`."""
    return [choose(f, random_value(f, rng), "random choice (offline random policy)")[0] for f in page.fields]

