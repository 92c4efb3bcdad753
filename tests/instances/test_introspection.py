"""What a project's settings.py may claim: the real settings reader (otree_project.INTROSPECT) run
on hostile settings.py files, and the manager's checks of its output (instances.facts).

settings.py runs before the reader prints, in the same process: it can print forged
result lines, floods, wrong types, room names that break URLs, labels by the million.
The manager takes only what fits, says what it dropped, and reads a bounded amount.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from instances import facts
from instances.otree_project import INTROSPECT, BuildFailed, parse_introspection


def read_settings(tmp_path, source: str, files: dict[str, str] | None = None, folder: str = "project") -> str:
    """Run the real settings reader on a project with this settings.py; its output."""
    project = tmp_path / folder
    project.mkdir()
    (project / "settings.py").write_text(textwrap.dedent(source))
    for name, text in (files or {}).items():
        (project / name).write_text(text)
    result = subprocess.run([sys.executable, "-I", "-c", INTROSPECT, str(project)], capture_output=True, timeout=60,
                            cwd=project)
    return (result.stdout + result.stderr).decode(errors="replace")


def test_an_ordinary_project_reads_as_before(tmp_path):
    out = read_settings(tmp_path, """
        SESSION_CONFIGS = [dict(name="public_goods", display_name="Public goods", num_demo_participants=3,
                                app_sequence=["public_goods", "survey"])]
        ROOMS = [dict(name="econ_lab", display_name="Economics lab", participant_label_file="labels.txt"),
                 dict(name="online")]
        LANGUAGE_CODE = "de"
        """, {"labels.txt": "A1\nA2\n\nA3\n"})
    found = parse_introspection(out)
    assert found == {
        "session_configs": [{"name": "public_goods", "display_name": "Public goods", "num_demo_participants": 3,
                             "app_sequence": ["public_goods", "survey"]}],
        "rooms": [{"name": "econ_lab", "display_name": "Economics lab", "participant_labels": ["A1", "A2", "A3"],
                   "problem": ""},
                  {"name": "online", "display_name": "online", "participant_labels": [], "problem": ""}],
        "language_code": "de", "warnings": []}


def test_room_names_that_cannot_be_url_segments_are_skipped_with_a_warning(tmp_path):
    out = read_settings(tmp_path, """
        ROOMS = [dict(name="lab/1"), dict(name="lab\\\\2"), dict(name=".."), dict(name="ok-room"),
                 dict(name="bell\\x07"), dict(name=" padded "), dict(name="x" * 150), dict(name="ok-room")]
        """)
    found = parse_introspection(out)
    assert [r["name"] for r in found["rooms"]] == ["ok-room"]
    text = "\n".join(found["warnings"])
    assert "room lab/1 skipped: a room name cannot contain / or \\ (oTree serves a room at /room/<name>/); " \
           "rename it in settings.py" in text
    assert "room lab\\2 skipped" in text and "room .. skipped" in text and "room bell? skipped" in text
    assert "room  padded  skipped" in text and "at most 100 characters" in text
    assert "room ok-room is defined twice; the first one is used" in text


def test_labels_are_capped_per_room_and_in_all(tmp_path):
    many = "".join(f"S{n}\n" for n in range(3000))
    out = read_settings(tmp_path, """
        ROOMS = [dict(name=f"room{n}", participant_label_file="labels.txt") for n in range(7)]
        """, {"labels.txt": many + "x" * 500 + "\n"})
    found = parse_introspection(out)
    counts = [len(r["participant_labels"]) for r in found["rooms"]]
    assert counts == [facts.MAX_ROOM_LABELS] * 5 + [0, 0]
    assert found["rooms"][0]["participant_labels"][:2] == ["S0", "S1"]
    text = "\n".join(found["warnings"])
    assert "room room0: the lobby takes the first 1000 of its participant labels (at most 1000 per room); " \
           "oTree itself still accepts all of them" in text
    assert "room room5: the lobby takes the first 0" in text and "(at most 5000 in all rooms together)" in text
    assert len(out) < 200_000  # the reader itself sends only what can be taken


def test_a_forged_result_line_is_checked_like_any_other(tmp_path):
    """settings.py prints its own result line and then stops the reader: the manager gets
    only that line, and takes only what fits."""
    forged = {"session_configs": [{"name": "x" * 10_000}, "junk", {"name": "ok", "num_demo_participants": True,
                                                                   "app_sequence": "not a list"}],
              "rooms": [{"name": "a/../../b", "participant_labels": ["\x00evil", "fine", "fine", 7]},
                        {"name": "r", "participant_labels": "nope", "display_name": ["x"]}, 42],
              "language_code": "<script>", "extra": "ignored"}
    out = read_settings(tmp_path, f"""
        import json, os
        print("@@JSON@@" + json.dumps({forged!r}))
        os._exit(0)
        """)
    found = parse_introspection(out)
    assert found["session_configs"] == [{"name": "ok", "display_name": "ok", "num_demo_participants": None,
                                         "app_sequence": []}]
    assert found["rooms"] == [{"name": "r", "display_name": "r", "participant_labels": [], "problem": ""}]
    assert found["language_code"] == "" and "extra" not in found
    text = "\n".join(found["warnings"])
    assert "session config xxxxxxxx" in text and "a session config that is not a dict was skipped" in text
    assert "room a/../../b skipped" in text and "a room that is not a dict was skipped" in text
    assert "LANGUAGE_CODE <script> is not a language code" in text


def test_the_last_result_line_counts_and_output_is_read_bounded(tmp_path):
    out = read_settings(tmp_path, """
        print("@@JSON@@" + '{"rooms": [{"name": "forged"}]}')
        print("@@ERROR@@ not really")
        ROOMS = [dict(name="real")]
        """)
    assert [r["name"] for r in parse_introspection(out)["rooms"]] == ["real"]
    # A flood before the result: the manager reads MAX_OUTPUT characters, then stops.
    flood = read_settings(tmp_path, """
        import sys
        sys.stdout.write("x" * (6 * 1024 * 1024))
        ROOMS = [dict(name="real")]
        """, folder="flood")
    with pytest.raises(BuildFailed, match="settings.py printed more than 4 MB while it was read"):
        parse_introspection(flood)
    # ... also from a stream, which is read no further than that.
    consumed = []

    def chunks():
        for _ in range(10_000):
            consumed.append(1)
            yield b"y" * 65536

    with pytest.raises(BuildFailed, match="printed more than 4 MB"):
        parse_introspection(chunks())
    assert len(consumed) <= facts.MAX_OUTPUT // 65536 + 1


def test_an_import_error_and_garbage_are_clear_failures(tmp_path):
    with pytest.raises(BuildFailed, match=r"settings.py cannot be imported: ZeroDivisionError: division by zero"):
        parse_introspection(read_settings(tmp_path, "X = 1 / 0\n"))
    with pytest.raises(BuildFailed, match="reading settings.py failed: the settings reader's result is not valid JSON"):
        parse_introspection("@@JSON@@{not json")
    with pytest.raises(BuildFailed, match="reading settings.py failed: the settings reader printed no result"):
        parse_introspection("Killed\n")
    with pytest.raises(BuildFailed, match="is not an object"):
        parse_introspection("@@JSON@@" + json.dumps([1, 2]))
