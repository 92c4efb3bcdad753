"""What a text may hold before it reaches a process, a file or the database.

One check for every text the services accept (names, titles, passwords, config vars,
instructions …), so the web form and the JSON API refuse the same input with the same
words:

- no NUL character: PostgreSQL's text cannot hold one, and a process's environment or
  command line ends a string at it ("embedded null byte");
- valid Unicode that encodes as UTF-8 strictly: a lone surrogate (U+D800–U+DFFF, which a
  JSON `"\\ud800"` escape can produce) can be stored nowhere and passed to no program;
- single-line texts (names, titles, passwords) hold no control characters (line breaks,
  tabs, escape sequences): a form's text input cannot send them, and they would garble
  logs and terminals;
- a length limit in characters (what the database column holds).

Each refusal is a `ValidationError({field: [message]})`: shown on the form's field by
`ServiceForm`, and as `422 {"detail": "field: message"}` by the API.

Text the manager did not accept but received (a program's output: a build log, a failed
deploy's or a crashed app's reason, a job's message) is not refused: `storable()` makes
it fit for the database.
"""

from __future__ import annotations

import unicodedata

from django.core.exceptions import ValidationError


def character_name(char: str) -> str:
    """'U+000A' (and the character's Unicode name where it has one): for messages."""
    code = f"U+{ord(char):04X}"
    name = unicodedata.name(char, "")
    return f"{code} {name}" if name else code


def problem(value: str, *, max_length: int | None = None, single_line: bool = False) -> str | None:
    """What makes `value` unfit (a phrase to follow "the text …"), or None."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains an invalid character (a lone surrogate, U+{ord(value[exc.start]):04X})"
    if single_line:
        for char in value:
            if unicodedata.category(char) == "Cc" or char in "\u2028\u2029":
                what = "a line break" if char in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029" else "a control character"
                return f"contains {what} ({character_name(char)}), which is not allowed here"
    if max_length is not None and len(value) > max_length:
        return f"is too long ({len(value)} characters, at most {max_length})"
    return None


def storable(text: str) -> str:
    """`text` as every database can store it: each NUL becomes U+FFFD, the mark a byte
    that is not UTF-8 gets when a program's output is decoded (PostgreSQL's text and jsonb
    cannot hold a NUL; SQLite can)."""
    return text.replace("\x00", "\ufffd")


def check_text(value, *, field: str, max_length: int | None = None, label: str = "The text",
               single_line: bool = False) -> str:
    """`value` if it is text that fits; else ValidationError({field: ["<label> <problem>."]})."""
    if not isinstance(value, str):
        raise ValidationError({field: [f"{label} must be text."]})
    found = problem(value, max_length=max_length, single_line=single_line)
    if found:
        raise ValidationError({field: [f"{label} {found}."]})
    return value
