"""Template hygiene a user would see: Django's {# ... #} comment is one line only — a
comment that spans lines is shown on the page as text."""

import re
from pathlib import Path

from django.conf import settings


def test_no_template_has_a_multi_line_comment_tag():
    roots = [Path(settings.BASE_DIR) / "templates"] + list(Path(settings.BASE_DIR).glob("*/templates"))
    offenders = []
    for root in roots:
        for path in root.rglob("*.html"):
            text = path.read_text(encoding="utf-8")
            for match in re.finditer(r"\{#(.*?)#\}", text, re.S):
                if "\n" in match.group(1):
                    offenders.append(f"{path.relative_to(settings.BASE_DIR)}:{text[:match.start()].count(chr(10)) + 1}")
            unclosed = [line for line in text.splitlines() if "{#" in line and "#}" not in line.split("{#", 1)[1]]
            offenders += [f"{path.relative_to(settings.BASE_DIR)}: {line.strip()[:60]}" for line in unclosed]
    assert offenders == [], "use {% comment %} for comments over several lines"
