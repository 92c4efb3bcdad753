"""Kiosk launchers: per seat a file for Windows (.cmd), macOS (.command) and Linux
(.desktop), for Google Chrome, Chromium and Microsoft Edge in kiosk mode, each opening
that seat's LOBBY page (never the room: the participant still clicks "I am ready").

Participant labels come from experimenters' files and may contain anything, so a label
never reaches a launcher as it is:

1. In the URL it is percent-encoded (`urllib.parse.quote(label, safe="")`), and the whole
   URL must consist of URL-safe characters only (`SAFE_URL`), so no quote, space, `&`,
   `|`, `<`, `>`, `^`, `!`, `$`, backtick or newline can reach a command line at all.
2. Every argument is still quoted for its target, as if it were hostile:
   - cmd.exe (`cmd_quote`): inside double quotes `& | < > ^ ( )` are plain characters;
     `%` is doubled (a batch file expands `%...%` even inside quotes); `!` stays plain
     because the script turns delayed expansion off; a `"`, CR, LF or NUL cannot be
     quoted for cmd.exe at all and is refused.
   - POSIX sh (`sh_quote`): single quotes, `'` written as `'"'"'`; nothing expands inside.
   - .desktop Exec (`exec_quote`, Desktop Entry Specification 1.5): each argument in
     double quotes with `"`, backtick, `$` and `\\` backslash-escaped, `%` doubled (field
     codes), then the whole value escaped as a string value (`\\` -> `\\\\`); control
     characters are refused. `Name=` carries the label as an escaped string value
     (`desktop_string`: a newline can never start a new key).
3. File names in the zip are the label reduced to `[A-Za-z0-9._-]` plus a short hash
   when anything was changed (no path separators, no `..`, no clashes).

The zip is written into a spooled temporary file (memory up to SPOOL_BYTES, then disk)
and streamed from there: its size follows the labels of a release, which settings.py
claims (bounded by instances.facts, at most 5000 seats, nine launchers each).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import tempfile
import zipfile
from dataclasses import dataclass

SPOOL_BYTES = 4 * 1024 * 1024
SAFE_URL = re.compile(r"^https?://[A-Za-z0-9.:\[\]_~%/-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeArgument(ValueError):
    """A value that cannot be put into a launcher safely (the message says why)."""


@dataclass(frozen=True)
class Browser:
    key: str
    title: str
    windows: tuple[str, ...]  # candidate paths (fixed strings; %VAR% expanded by cmd.exe on purpose)
    macos_app: str
    linux_command: str
    extra: tuple[str, ...] = ()


COMMON_FLAGS = ("--kiosk", "--no-first-run", "--no-default-browser-check", "--disable-translate",
                "--overscroll-history-navigation=0")

BROWSERS = (
    Browser("chrome", "Google Chrome",
            (r"%ProgramFiles%\Google\Chrome\Application\chrome.exe",
             r"%ProgramFiles(x86)%\Google\Chrome\Application\chrome.exe",
             r"%LocalAppData%\Google\Chrome\Application\chrome.exe"),
            "Google Chrome", "google-chrome"),
    Browser("chromium", "Chromium",
            (r"%LocalAppData%\Chromium\Application\chrome.exe",
             r"%ProgramFiles%\Chromium\Application\chrome.exe"),
            "Chromium", "chromium"),
    Browser("edge", "Microsoft Edge",
            (r"%ProgramFiles(x86)%\Microsoft\Edge\Application\msedge.exe",
             r"%ProgramFiles%\Microsoft\Edge\Application\msedge.exe"),
            "Microsoft Edge", "microsoft-edge", ("--edge-kiosk-type=fullscreen",)),
)


def check_url(url: str) -> str:
    if not SAFE_URL.match(url):
        raise UnsafeArgument(
            f"The lobby URL {url!r} contains characters that are not URL-safe; check LAB_PUBLIC_URL "
            "(launchers accept letters, digits and . : [ ] _ ~ % / - only).")
    return url


def _no_controls(arg: str, target: str) -> None:
    if _CONTROL.search(arg):
        raise UnsafeArgument(f"{arg!r} contains a control character (e.g. a newline); it cannot be passed "
                             f"safely to {target}.")


# --- quoting, one function per target -----------------------------------------------------------

def cmd_quote(arg: str) -> str:
    """One argument of a command line in a Windows batch file."""
    _no_controls(arg, "cmd.exe")
    if '"' in arg:
        raise UnsafeArgument(f"{arg!r} contains a double quote, which cmd.exe cannot take inside quotes.")
    # Backslashes before the closing quote would escape it for the program's argv parser.
    trailing = len(arg) - len(arg.rstrip("\\"))
    return '"' + arg.replace("%", "%%") + "\\" * trailing + '"'


def sh_quote(arg: str) -> str:
    """One argument of a POSIX shell command line (always single-quoted)."""
    _no_controls(arg, "the shell")
    quoted = shlex.quote(arg)
    return quoted if quoted.startswith("'") else f"'{arg}'"


def exec_quote(arg: str) -> str:
    """One argument of a .desktop file's Exec key, before string-value escaping."""
    _no_controls(arg, "a .desktop Exec line")
    escaped = re.sub(r'(["`$\\])', r"\\\1", arg)
    return '"' + escaped.replace("%", "%%") + '"'


def desktop_string(value: str) -> str:
    """A .desktop string value: backslash escapes for \\ and whitespace controls; other
    control characters dropped (a value is one line)."""
    out = []
    for i, ch in enumerate(value):
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == " " and i == 0:
            out.append("\\s")
        elif _CONTROL.match(ch):
            continue
        else:
            out.append(ch)
    return "".join(out)


def safe_name(label: str) -> str:
    """A file name for the label: [A-Za-z0-9._-] only, never starting with a dot; a short
    hash of the label is added when anything had to change (so two labels never clash)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", label)[:60].lstrip(".") or "seat"
    if cleaned != label:
        cleaned += "-" + hashlib.sha256(label.encode()).hexdigest()[:8]
    return cleaned


# --- the three launcher kinds ---------------------------------------------------------------------

def _args(browser: Browser, profile: str, url: str) -> list[str]:
    return [*COMMON_FLAGS, *browser.extra, f"--user-data-dir={profile}", url]


def windows_cmd(browser: Browser, label: str, url: str) -> str:
    url = check_url(url)
    lines = [
        "@echo off",
        f"rem oTree Lab kiosk launcher for Windows ({browser.title}), seat {safe_name(label)}.",
        "rem Opens the seat's lobby page full-screen. Alt+F4 closes the browser.",
        "setlocal DisableDelayedExpansion",
        f'set "BROWSER={browser.windows[0]}"',
        *[f'if not exist "%BROWSER%" set "BROWSER={path}"' for path in browser.windows[1:]],
        'if not exist "%BROWSER%" goto missing',
        # %BROWSER% and the profile's %LocalAppData% are ours and meant to expand;
        # everything derived from data goes through cmd_quote.
        'start "" "%BROWSER%" ' + " ".join(
            [cmd_quote(a) for a in _args(browser, "PROFILE", url)[:-2]]
            + [rf'"--user-data-dir=%LocalAppData%\oTreeLabKiosk\{browser.key}"', cmd_quote(url)]),
        "exit /b 0",
        ":missing",
        f"echo {browser.title} was not found on this computer.",
        "pause",
        "exit /b 1",
    ]
    return "\r\n".join(lines) + "\r\n"


def macos_command(browser: Browser, label: str, url: str) -> str:
    url = check_url(url)
    args = _args(browser, f"/tmp/otree-lab-kiosk-{browser.key}", url)
    return "\n".join([
        "#!/bin/sh",
        f"# oTree Lab kiosk launcher for macOS ({browser.title}), seat {safe_name(label)}.",
        "# Opens the seat's lobby page full-screen. Cmd+Q closes the browser.",
        f"exec open -n -a {sh_quote(browser.macos_app)} --args " + " ".join(sh_quote(a) for a in args),
    ]) + "\n"


def linux_desktop(browser: Browser, label: str, url: str) -> str:
    url = check_url(url)
    args = [browser.linux_command, *_args(browser, f"/tmp/otree-lab-kiosk-{browser.key}", url)]
    return "\n".join([
        "[Desktop Entry]",
        "Type=Application",
        "Version=1.5",
        "Name=" + desktop_string(f"oTree Lab kiosk: seat {label} ({browser.title})"),
        "Comment=Opens the seat's lobby page full-screen (kiosk mode)",
        "Exec=" + desktop_string(" ".join(exec_quote(a) for a in args)),
        "Terminal=false",
        "StartupNotify=false",
    ]) + "\n"


KINDS = (("windows", ".cmd", windows_cmd, 0o644), ("macos", ".command", macos_command, 0o755),
         ("linux", ".desktop", linux_desktop, 0o755))

README = """oTree Lab kiosk launchers for {instance}
{underline}

One launcher per seat, per system and browser. Each opens the seat's lobby page
(a welcome page with an "I am ready" button) full-screen in kiosk mode, with its own
browser profile, so it runs beside a browser that is already open.

  windows/<browser>/<seat>.cmd       double-click, or put it into shell:startup
  macos/<browser>/<seat>.command     double-click (first time: right-click > Open)
  linux/<browser>/<seat>.desktop     mark as trusted ("Allow Launching"), or copy
                                     into ~/.config/autostart/ to start at login

Leave kiosk mode with Alt+F4 (Windows, Linux) or Cmd+Q (macOS).
{rooms}"""


def launchers_zip(instance_name: str, rooms: list[tuple[str, list[str], str]]):
    """The zip, as a file object at its start (a spooled temporary file: close it when
    sent): `rooms` is [(room name, seat labels, room lobby URL)]; per seat one launcher
    per kind and browser, plus one per room opening its seat picker when it has no labels."""
    from lobby.services import lobby_url

    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="lab-launchers-")
    top = safe_name(f"{instance_name}-kiosk-launchers")
    listing = []
    try:
        with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED) as archive:
            for room, labels, room_url in rooms:
                room_dir = safe_name(room)
                targets = [(label, lobby_url(instance_name, room, label)) for label in labels]
                if not labels:
                    targets = [("pick-a-seat", room_url)]
                listing.append(f"\nroom {room_dir}: " + ", ".join(safe_name(label) for label, _ in targets))
                for label, url in targets:
                    for kind, ext, make, mode in KINDS:
                        for browser in BROWSERS:
                            info = zipfile.ZipInfo(f"{top}/{room_dir}/{kind}/{browser.key}/{safe_name(label)}{ext}",
                                                   date_time=(2024, 1, 1, 0, 0, 0))
                            info.external_attr = (0o100000 | mode) << 16  # regular file, exec bit kept by unzip
                            info.compress_type = zipfile.ZIP_DEFLATED
                            archive.writestr(info, make(browser, label, url))
            text = README.format(instance=instance_name, underline="=" * (31 + len(instance_name)),
                                 rooms="".join(listing))
            archive.writestr(f"{top}/README.txt", text.replace("\n", "\r\n"))
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool
