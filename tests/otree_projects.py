"""Small oTree projects that tests write, commit and push into an instance's bare repo
(the way git intake receives them), using the git CLI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

OTREE_REQUIREMENT = "otree==6.0.15"

SETTINGS = '''\
from os import environ

SESSION_CONFIGS = [
    dict(name="hello_game", display_name="Hello game", app_sequence=["hello"], num_demo_participants=2),
]
SESSION_CONFIG_DEFAULTS = dict(real_world_currency_per_point=1.00, participation_fee=0.00, doc="")
PARTICIPANT_FIELDS = []
SESSION_FIELDS = []
LANGUAGE_CODE = "en"
REAL_WORLD_CURRENCY_CODE = "USD"
USE_POINTS = True
ROOMS = [
    dict(name="lab", display_name="Lab room", participant_label_file="_rooms/lab.txt"),
    dict(name="online", display_name="Online"),
]
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = environ.get("OTREE_ADMIN_PASSWORD")
DEMO_PAGE_INTRO_HTML = ""
SECRET_KEY = "not-a-secret-test-key"
'''

APP = '''\
from otree.api import *


class C(BaseConstants):
    NAME_IN_URL = "hello"
    PLAYERS_PER_GROUP = None
    NUM_ROUNDS = 1


class Subsession(BaseSubsession):
    pass


class Group(BaseGroup):
    pass


class Player(BasePlayer):
    pass


class MyPage(Page):
    pass


page_sequence = [MyPage]
'''

TEMPLATE = '''\
{{ block title }}Hello{{ endblock }}
{{ block content }}
<p>VERSION_MARK</p>
{{ next_button }}
{{ endblock }}
'''

LABELS = ["seat01", "seat02", "seat03"]


def valid_project(version: str = "v1") -> dict[str, str]:
    """path -> content of a minimal oTree 6 project with a room and participant labels."""
    return {
        "settings.py": SETTINGS,
        "requirements.txt": f"{OTREE_REQUIREMENT}\npsycopg2-binary\n",
        "Procfile": "web: otree prodserver1of2\nworker: otree prodserver2of2\n",
        "_rooms/lab.txt": "\n".join(LABELS) + "\n",
        "_static/global/empty.css": "",
        "hello/__init__.py": APP,
        "hello/MyPage.html": TEMPLATE.replace("VERSION_MARK", f"version {version}"),
    }


def broken(kind: str) -> dict[str, str]:
    files = valid_project("broken")
    if kind == "syntax":
        files["settings.py"] = SETTINGS + "\nROOMS = [dict(name='x'\nUSE_POINTS = True\n"
    elif kind == "no_otree":
        files["requirements.txt"] = "psycopg2-binary\n"
    elif kind == "no_settings":
        del files["settings.py"]
    elif kind == "missing_package":
        files["requirements.txt"] += "otree-lab-no-such-package-zz9==1.0\n"
    elif kind == "crash":
        files["hello/__init__.py"] = "raise RuntimeError('this app crashes on start')\n" + APP
    else:
        raise ValueError(kind)
    return files


GIT_ENV = {
    "GIT_AUTHOR_NAME": "Ann Experimenter", "GIT_AUTHOR_EMAIL": "ann@lab.test",
    "GIT_COMMITTER_NAME": "Ann Experimenter", "GIT_COMMITTER_EMAIL": "ann@lab.test",
    "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent",
}


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()


def init_bare(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "--quiet", "--bare", str(path)], check=True, timeout=30)
    return path


class Checkout:
    """A working copy; each `commit(files, message)` replaces the whole tree and commits it,
    `push(files, message)` also pushes to main of `bare`, returning the commit id."""

    def __init__(self, workdir: Path, bare: Path | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        _git(self.dir, "init", "--quiet", "-b", "main")
        if bare is not None:
            _git(self.dir, "remote", "add", "origin", str(bare))

    def commit(self, files: dict[str, str], message: str) -> str:
        for path in self.dir.rglob("*"):
            if path.is_file() and ".git" not in path.relative_to(self.dir).parts:
                path.unlink()
        for rel, content in files.items():
            target = self.dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        _git(self.dir, "add", "-A")
        _git(self.dir, "commit", "--quiet", "--allow-empty", "-m", message)
        return _git(self.dir, "rev-parse", "HEAD")

    def push(self, files: dict[str, str], message: str) -> str:
        commit = self.commit(files, message)
        _git(self.dir, "push", "--quiet", "origin", "HEAD:main")
        return commit

    def push_to(self, remote: str, timeout: float = 600) -> tuple[int, str]:
        """Push HEAD to main of `remote` (a URL) as an experimenter's git client does, with
        no credential prompt or helper; returns (exit code, everything git printed)."""
        result = subprocess.run(["git", "push", remote, "HEAD:main"], cwd=self.dir, capture_output=True, text=True,
                                timeout=timeout, env={"GIT_TERMINAL_PROMPT": "0", "HOME": str(self.dir),
                                                      "PATH": "/usr/bin:/bin"})
        return result.returncode, result.stdout + result.stderr
