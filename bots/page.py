"""Reading an oTree page without a browser: what a participant would see and the form
fields they could fill in.

oTree renders its pages on the server, so the HTML carries everything: the title, the
text, the inputs of the form `#form` (text, integer, float, select, radio groups,
checkboxes, and buttons with a name, which submit a choice), the labels, and the error
messages of a re-displayed form (per field and for the page). Wait pages and the
end of the session are recognised from oTree's own headers and URLs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

PAGE_PATH = re.compile(r"^/p/(?P<code>[^/]+)/(?P<app>[^/]+)/(?P<page>[^/]+)/(?P<index>\d+)/?$")
END_PATH = re.compile(r"^/OutOfRangeNotification/")
WAIT_SOCKET = re.compile(r"""makeReconnectingWebSocket\(\s*["']([^"']+)["']""")
WAIT_HEADER = "otree-wait-page"
ERRORS_HEADER = "otree-redisplay-with-errors"
MAX_TEXT = 6000  # characters of page text kept for the prompt

# Kinds of fields (what the prompt and the validator know).
TEXT, NUMBER, FLOAT, CHOICE, CHECKBOX = "text", "integer", "float", "choice", "checkbox"


@dataclass
class Field:
    name: str
    kind: str
    label: str = ""
    choices: list[tuple[str, str]] = field(default_factory=list)  # (value, label)
    widget: str = ""  # input, textarea, select, radio, buttons, checkbox
    required: bool = False
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    checkbox_value: str = "y"  # what a checked box sends
    errors: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """The field as the model sees it (JSON)."""
        data = {"field": self.name, "type": self.kind, "label": self.label}
        if self.choices:
            data["choices"] = [{"value": v, "label": lbl} for v, lbl in self.choices]
        if self.min is not None:
            data["min"] = self.min
        if self.max is not None:
            data["max"] = self.max
        if self.max_length:
            data["max_length"] = self.max_length
        if self.kind == CHECKBOX:
            data["answer_with"] = "true (checked) or false (unchecked)"
        if not self.required and self.kind != CHECKBOX:
            data["optional"] = True
        if self.errors:
            data["errors"] = self.errors
        return data


@dataclass
class Page:
    url: str
    path: str
    status_code: int
    app: str = ""
    name: str = ""
    index: int = 0
    is_wait: bool = False
    is_end: bool = False
    redisplayed_with_errors: bool = False
    title: str = ""
    text: str = ""
    fields: list[Field] = field(default_factory=list)
    hidden: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # page-level messages (error_message, "Please fix…")
    has_form: bool = False
    socket_path: str = ""  # a wait page's websocket: oTree says {"status": "ready"} there when the wait is over

    @property
    def field_errors(self) -> dict[str, list[str]]:
        return {f.name: f.errors for f in self.fields if f.errors}

    @property
    def all_errors(self) -> list[str]:
        out = list(self.errors)
        for f in self.fields:
            out.extend(f"{f.name}: {e}" for e in f.errors)
        return out

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


def _number(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else number


class _Reader(HTMLParser):
    """One pass over the HTML; collects text, inputs, labels and error blocks."""

    SKIP = {"script", "style", "noscript", "template", "head", "title"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.skip_depth = 0
        self.hidden_depth = 0  # inside an element shown only in special cases (display:none)
        self.text: list[str] = []
        self.title: list[str] = []
        self.in_title = 0
        self.in_form = 0
        self.has_form = False
        self.fields: dict[str, Field] = {}
        self.hidden: dict[str, str] = {}
        self.labels_for: dict[str, list[str]] = {}  # element id -> label text
        self.label_stack: list[tuple[str | None, list[str]]] = []
        self.ids: dict[str, str] = {}  # element id -> field name
        self.select: Field | None = None
        self.option: tuple[str, list[str]] | None = None
        self.button: tuple[str, str, list[str]] | None = None
        self.error_block: list[str] | None = None
        self.error_kind = ""
        self.error_depth = 0
        self.page_errors: list[str] = []
        self.last_field: str | None = None
        self.radio_pending: list[tuple[str, str, str]] = []  # (name, value, id)

    # --- helpers --------------------------------------------------------------------------
    def _field(self, name: str, kind: str, widget: str, attrs: dict) -> Field:
        f = self.fields.get(name)
        if f is None:
            f = self.fields[name] = Field(name=name, kind=kind, widget=widget)
        f.required = f.required or "required" in attrs
        if attrs.get("id"):
            self.ids[attrs["id"]] = name
        self.last_field = name
        return f

    # --- parser callbacks -----------------------------------------------------------------
    def handle_starttag(self, tag, attrs_list):
        attrs = {k: (v if v is not None else "") for k, v in attrs_list}
        if tag in ("input", "br", "img", "hr", "meta", "link"):
            self._void(tag, attrs)
            return
        self.stack.append((tag, attrs))
        if tag in self.SKIP:
            self.skip_depth += 1
        style = attrs.get("style", "").replace(" ", "").lower()
        if "display:none" in style or attrs.get("id") in ("hidden-form-errors-warning", "_otree-server-error"):
            self.hidden_depth += 1
            attrs["_hidden"] = "1"
        classes = attrs.get("class", "").split()
        if tag == "h2" and attrs.get("id") == "_otree-title" or (tag == "h4" and "otree-wait-page__title" in classes):
            self.in_title += 1
        if tag == "form" and attrs.get("id") == "form":
            self.in_form += 1
            self.has_form = True
        if "form-control-errors" in classes or "otree-form-errors" in classes:
            self.error_block = []
            self.error_kind = "field" if "form-control-errors" in classes else "page"
            self.error_depth = len(self.stack)
        if tag == "label":
            self.label_stack.append((attrs.get("for"), []))
        elif tag == "select" and self.in_form and attrs.get("name"):
            self.select = self._field(attrs["name"], CHOICE, "select", attrs)
        elif tag == "option" and self.select is not None:
            self.option = (attrs.get("value", ""), [])
        elif tag == "textarea" and self.in_form and attrs.get("name"):
            f = self._field(attrs["name"], TEXT, "textarea", attrs)
            f.max_length = int(attrs["maxlength"]) if attrs.get("maxlength", "").isdigit() else None
        elif tag == "button" and self.in_form:
            self.button = (attrs.get("name", ""), attrs.get("value", ""), [])
        if tag in self.BLOCK:
            self.text.append("\n")

    def _void(self, tag, attrs):
        if tag == "br":
            self.text.append("\n")
            if self.error_block is not None:
                self.error_block.append("\n")
            return
        if tag != "input" or not self.in_form:
            return
        name = attrs.get("name")
        kind = attrs.get("type", "text").lower()
        if not name:
            return
        if kind == "hidden":
            self.hidden[name] = attrs.get("value", "")
        elif kind == "radio":
            f = self._field(name, CHOICE, "radio", {k: v for k, v in attrs.items() if k != "id"})
            f.choices.append((attrs.get("value", ""), ""))
            if attrs.get("id"):
                self.radio_pending.append((name, attrs.get("value", ""), attrs["id"]))
        elif kind == "checkbox":
            f = self._field(name, CHECKBOX, "checkbox", attrs)
            f.checkbox_value = attrs.get("value") or "on"
            f.required = False  # an unchecked box is an answer too
        elif kind in ("submit", "button", "reset", "file", "image"):
            return
        else:
            if kind == "number":
                f = self._field(name, NUMBER if not _is_fraction_step(attrs) else FLOAT, "input", attrs)
            elif "inputmode" in attrs:  # oTree's FloatField/CurrencyField: text with inputmode
                f = self._field(name, FLOAT, "input", attrs)
            else:
                f = self._field(name, TEXT, "input", attrs)
                f.max_length = int(attrs["maxlength"]) if attrs.get("maxlength", "").isdigit() else None
            f.min = _number(attrs.get("min"))
            f.max = _number(attrs.get("max"))

    def handle_endtag(self, tag):
        if not self.stack:
            return
        # Pop to the matching tag (HTML in the wild does not always close what it opens).
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] == tag:
                break
        else:
            return
        while len(self.stack) > depth:
            open_tag, attrs = self.stack.pop()
            self._close(open_tag, attrs)

    def _close(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth -= 1
        if attrs.get("_hidden"):
            self.hidden_depth -= 1
        classes = attrs.get("class", "").split()
        if tag == "h2" and attrs.get("id") == "_otree-title" or (tag == "h4" and "otree-wait-page__title" in classes):
            self.in_title -= 1
        if tag == "form" and attrs.get("id") == "form":
            self.in_form -= 1
        if self.error_block is not None and len(self.stack) < self.error_depth:
            messages = [" ".join(part.split()) for part in "".join(self.error_block).split("\n")]
            messages = [m for m in messages if m]
            if self.error_kind == "field" and self.last_field:
                self.fields[self.last_field].errors.extend(messages)
            else:
                self.page_errors.extend(messages)
            self.error_block = None
        if tag == "label" and self.label_stack:
            target, parts = self.label_stack.pop()
            text = " ".join("".join(parts).split())
            if target and text:
                self.labels_for[target] = text
        elif tag == "select":
            self.select = None
        elif tag == "option" and self.option is not None and self.select is not None:
            value, parts = self.option
            if value != "":
                self.select.choices.append((value, " ".join("".join(parts).split())))
            self.option = None
        elif tag == "button" and self.button is not None:
            name, value, parts = self.button
            if name:
                f = self._field(name, CHOICE, "buttons", {})
                f.required = True
                f.choices.append((value, " ".join("".join(parts).split())))
            self.button = None
        if tag in self.BLOCK:
            self.text.append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if self.label_stack:
            self.label_stack[-1][1].append(data)
        if self.option is not None:
            self.option[1].append(data)
        if self.button is not None:
            self.button[2].append(data)
        if self.error_block is not None:
            self.error_block.append(data)
            return  # errors are reported separately, not as page text
        if self.in_title:
            self.title.append(data)
        if not self.hidden_depth and self.option is None:
            self.text.append(data)


def _is_fraction_step(attrs: dict) -> bool:
    step = attrs.get("step", "")
    return bool(step) and step != "any" and "." in step


def _text(parts: list[str]) -> str:
    lines = [" ".join(line.split()) for line in "".join(parts).split("\n")]
    text = "\n".join(line for line in lines if line and line != "Powered by oTree")
    return text[:MAX_TEXT]


def parse(html: str, *, url: str, path: str, status_code: int = 200, headers=None) -> Page:
    """The page at `path` (its HTML and response headers) as a bot reads it."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    page = Page(url=url, path=path, status_code=status_code)
    m = PAGE_PATH.match(path)
    if m:
        page.app, page.name, page.index = m.group("app"), m.group("page"), int(m.group("index"))
    page.is_end = bool(END_PATH.match(path))
    page.is_wait = headers.get(WAIT_HEADER) == "1"
    page.redisplayed_with_errors = headers.get(ERRORS_HEADER) == "1"
    reader = _Reader()
    reader.feed(html)
    reader.close()
    page.title = " ".join("".join(reader.title).split())
    page.text = _text(reader.text)
    page.has_form = reader.has_form
    page.hidden = reader.hidden
    page.errors = reader.page_errors
    for name, value, element_id in reader.radio_pending:
        f = reader.fields[name]
        f.choices = [(v, reader.labels_for.get(element_id, lbl) if v == value and not lbl else lbl)
                     for v, lbl in f.choices]
    for f in reader.fields.values():
        if f.widget == "radio":
            f.choices = [(v, lbl or v) for v, lbl in f.choices]
        if f.widget == "buttons":
            f.choices = list(dict.fromkeys(f.choices))
    for element_id, name in [*reader.ids.items(), *((f"id_{n}", n) for n in reader.fields)]:
        label = reader.labels_for.get(element_id)
        if label and not reader.fields[name].label:
            reader.fields[name].label = label
    page.fields = list(reader.fields.values())
    if page.is_wait:
        page.fields = []
        found = WAIT_SOCKET.search(html)
        page.socket_path = found.group(1) if found else ""
    return page
