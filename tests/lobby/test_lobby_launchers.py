"""Kiosk launchers with hostile participant labels: no label can ever run a command.

The macOS launchers run in real POSIX shells (dash and bash) and the Linux launchers
through GLib's real .desktop launcher (`gio launch`), each with a fake browser on PATH
that records its arguments: the arguments must be exactly the intended ones, and nothing
else may run. cmd.exe is not available here: its two parsing phases that matter
(percent expansion, then the split at unquoted operators) are modelled in
`batch_phases` below, after Microsoft's documented batch-file rules.
"""

import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from lobby import launchers
from lobby.launchers import BROWSERS, UnsafeArgument
from tests.conftest import need
from tests.waits import wait_until

HOSTILE_LABELS = [
    'a"&calc&', 'a & calc.exe', "x|calc", "a>b<c", "^&^|", "!COMSPEC!", "%COMSPEC%", "%1", "%", "100%",
    "'; touch PWNED; '", "$(touch PWNED)", "`touch PWNED`", "${IFS}touch${IFS}PWNED", "a\\b", '\\"', "a'b\"c",
    "line1\nExec=touch PWNED", "cr\rlf", "tab\there", "%f %u %F %U %k %c %i", " leading space", "Zoë 7",
    "x/y", "../../etc/passwd", "--renderer-cmd-prefix=touch PWNED", "-", "* ? [a] ~ # ;",
]
URL_BASE = "http://lab.example:8000/lobby/study/lab/"


def url_for(label):
    from urllib.parse import quote

    return URL_BASE + quote(label, safe="") + "/"


def expected_args(browser, profile, label):
    return [*launchers.COMMON_FLAGS, *browser.extra, f"--user-data-dir={profile}", url_for(label)]


def label_of(url):
    assert url.startswith(URL_BASE) and url.endswith("/")
    return unquote(url[len(URL_BASE):-1])


# --- cmd.exe ------------------------------------------------------------------------------------------

WINDOWS_ENV = {"PROGRAMFILES": r"C:\Program Files", "PROGRAMFILES(X86)": r"C:\Program Files (x86)",
               "LOCALAPPDATA": r"C:\Users\lab\AppData\Local", "BROWSER": r"C:\Program Files\Browser\chrome.exe"}


def batch_phases(line, env):
    """One line of a batch file through cmd.exe's phase 1 (percent expansion: `%%` is a
    percent, `%1` a batch parameter, `%NAME%` a variable, undefined ones vanish, a lone
    `%` is dropped) and phase 2 (outside double quotes `& | < > ^` are operators; quotes
    toggle). Returns (arguments with their quotes removed, operators found outside quotes)."""
    out, i = [], 0
    while i < len(line):
        ch = line[i]
        if ch == "%":
            nxt = line[i + 1:i + 2]
            if nxt == "%":
                out.append("%")
                i += 2
                continue
            if nxt.isdigit() or nxt == "*":
                i += 2  # a batch parameter: empty here
                continue
            end = line.find("%", i + 1)
            if end == -1:
                i += 1
                continue
            out.append(env.get(line[i + 1:end].upper(), ""))
            i = end + 1
            continue
        out.append(ch)
        i += 1
    expanded = "".join(out)
    args, current, quoted, operators, started = [], [], False, [], False
    for ch in expanded:
        if ch == '"':
            quoted, started = not quoted, True
        elif not quoted and ch in "&|<>^":
            operators.append(ch)
        elif not quoted and ch in " \t":
            if started:
                args.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        args.append("".join(current))
    return args, operators


@pytest.mark.parametrize("browser", BROWSERS, ids=lambda b: b.key)
@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_windows_launcher_runs_only_the_browser_with_the_lobby_url(browser, label):
    text = launchers.windows_cmd(browser, label, url_for(label))
    lines = text.split("\r\n")
    assert lines[0] == "@echo off" and "setlocal DisableDelayedExpansion" in lines  # "!" stays a plain character
    for line in lines:
        args, operators = batch_phases(line, WINDOWS_ENV)
        assert not operators, f"unquoted cmd.exe operator in {line!r}"
    # No cmd.exe metacharacter of the label survives anywhere in the file.
    assert not set("&|<>^!") & set(text)
    [start] = [line for line in lines if line.startswith("start ")]
    args, _ = batch_phases(start, WINDOWS_ENV)
    profile = WINDOWS_ENV["LOCALAPPDATA"] + rf"\oTreeLabKiosk\{browser.key}"
    assert args == ["start", "", WINDOWS_ENV["BROWSER"], *expected_args(browser, profile, label)]
    assert label_of(args[-1]) == label


def test_cmd_quote_doubles_percent_and_refuses_what_cmd_cannot_quote():
    assert launchers.cmd_quote("100%") == '"100%%"'
    assert launchers.cmd_quote("a&b|c<d>e^f!g") == '"a&b|c<d>e^f!g"'  # literal inside quotes
    assert launchers.cmd_quote("C:\\dir\\") == '"C:\\dir\\\\"'  # a trailing backslash cannot escape the quote
    for bad, why in (('a"b', "double quote"), ("a\nb", "control character"), ("a\rb", "control character"),
                     ("a\x00b", "control character")):
        with pytest.raises(UnsafeArgument, match=why):
            launchers.cmd_quote(bad)


# --- POSIX shell (macOS .command) ---------------------------------------------------------------------

def fake_program(folder: Path, name: str, record: Path) -> None:
    """An executable `name` that writes its arguments, NUL-separated, to `record`."""
    script = folder / name
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do printf \'%s\\0\' "$a"; done > "{record}"\n')
    script.chmod(0o755)


def recorded(record: Path, timeout: float = 10.0) -> list[str]:
    wait_until(lambda: record.exists() and record.read_bytes().endswith(b"\0"), timeout, 0.05,
               "the fake browser started")
    return record.read_bytes().decode().split("\0")[:-1]


@pytest.mark.parametrize("shell", ["dash", "bash"])
@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_macos_launcher_in_a_real_shell_passes_exactly_the_lobby_url(tmp_path, shell, label):
    need(shutil.which(shell) is not None, shell)
    bindir, work = tmp_path / "bin", tmp_path / "work"
    bindir.mkdir()
    work.mkdir()
    record = tmp_path / "args"
    fake_program(bindir, "open", record)
    for browser in BROWSERS:
        script = work / "launch.command"
        script.write_text(launchers.macos_command(browser, label, url_for(label)))
        record.unlink(missing_ok=True)
        result = subprocess.run([shell, str(script)], cwd=work, env={"PATH": f"{bindir}:/usr/bin:/bin"},
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        profile = f"/tmp/otree-lab-kiosk-{browser.key}"
        assert recorded(record) == ["-n", "-a", browser.macos_app, "--args", *expected_args(browser, profile, label)]
        assert sorted(p.name for p in work.iterdir()) == ["launch.command"]  # nothing else ran (no PWNED)


def test_sh_quote():
    assert launchers.sh_quote("it's") == "'it'\"'\"'s'"
    assert launchers.sh_quote("plain") == "'plain'"
    with pytest.raises(UnsafeArgument, match="control character"):
        launchers.sh_quote("a\nb")


# --- .desktop (Linux) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_linux_launcher_through_glib_passes_exactly_the_lobby_url(tmp_path, label):
    need(shutil.which("gio") is not None, "gio (GLib's .desktop launcher, package libglib2.0-bin)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "args"
    for browser in BROWSERS:
        fake_program(bindir, browser.linux_command, record)
        entry = tmp_path / f"seat-{browser.key}.desktop"
        text = launchers.linux_desktop(browser, label, url_for(label))
        entry.write_text(text)
        # One entry, each key once: a newline in the label cannot add a key (e.g. a second Exec).
        keys = [line.split("=", 1)[0] for line in text.splitlines()[1:]]
        assert keys == ["Type", "Version", "Name", "Comment", "Exec", "Terminal", "StartupNotify"]
        record.unlink(missing_ok=True)
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "XDG_DATA_DIRS": str(tmp_path)}
        result = subprocess.run(["gio", "launch", str(entry)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        profile = f"/tmp/otree-lab-kiosk-{browser.key}"
        assert recorded(record) == expected_args(browser, profile, label)
        assert not (tmp_path / "PWNED").exists()


def test_desktop_name_is_an_escaped_single_line():
    browser = BROWSERS[1]
    text = launchers.linux_desktop(browser, "a\\b\nExec=evil\tx", url_for("x"))
    [name] = [line for line in text.splitlines() if line.startswith("Name=")]
    assert name == "Name=oTree Lab kiosk: seat a\\\\b\\nExec=evil\\tx (Chromium)"
    assert launchers.exec_quote('a"b`c$d\\e%f') == '"a\\"b\\`c\\$d\\\\e%%f"'


# --- URL, file names, the zip -------------------------------------------------------------------------

def test_an_unsafe_public_url_is_refused_with_the_reason():
    for url in ('http://lab"&calc&/lobby/x/', "http://lab:8000/lobby/x/a b/", "javascript:alert(1)"):
        with pytest.raises(UnsafeArgument, match="not URL-safe; check LAB_PUBLIC_URL"):
            launchers.windows_cmd(BROWSERS[0], "seat01", url)


def test_file_names_are_safe_and_distinct():
    names = {launchers.safe_name(label) for label in HOSTILE_LABELS}
    assert len(names) == len(HOSTILE_LABELS)
    for name in names:
        assert not name.startswith(".") and "/" not in name and "\\" not in name
        assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)
    assert launchers.safe_name("seat01") == "seat01"


def test_view_explains_when_launchers_cannot_be_made(settings, client, ann):
    from tests.lobby_helpers import lobby_instance

    lobby_instance(ann)
    client.force_login(ann)
    settings.LAB_PUBLIC_URL = 'http://lab"&calc&:8000'
    response = client.get("/instances/ann-study/lobby/launchers.zip")
    assert response.status_code == 409
    assert "Cannot make launchers" in response.content.decode() and "LAB_PUBLIC_URL" in response.content.decode()


def test_unzipped_launchers_keep_their_exec_bit():
    import io
    import zipfile

    archive = zipfile.ZipFile(launchers.launchers_zip("study", [("lab", ['a"&calc&'], URL_BASE)]))
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if info.filename.endswith((".command", ".desktop")):
            assert mode & 0o777 == 0o755, info.filename  # unzip restores it: double-click works
        else:
            assert mode & 0o111 == 0, info.filename
    assert "study-kiosk-launchers/README.txt" in archive.namelist()
