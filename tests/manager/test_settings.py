"""Settings are read one way (issue 13, point 4): every LAB_* variable (and REDIS_URL,
DATABASE_URL) is read from the environment and validated once, in manager/settings.py, with
one default; everywhere else reads `settings.X`. A malformed value stops start-up with a
message naming the variable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.labserver_helpers import BASE_DIR, child_env, free_port, new_data_dir

CODE_DIRS = ("manager", "instances", "lobby", "bots")
ENV_NAMES = ("LAB_", "REDIS_URL", "DATABASE_URL")
ENV_HELPERS = {"env_str", "env_int", "env_bool", "env_list", "env_duration"}

# Where reading the environment directly is right, and why.
ALLOWED = {
    "manager/settings.py": "the one place settings are read",
    "manager/env.py": "the typed readers settings.py uses",
    "manager/datadir.py": "LAB_DATA_DIR: settings.py asks it for the data dir before any setting exists",
    "instances/git/hook_client.py": "LAB_PUSH_TOKEN is no setting: the push's token, inherited by the git hook",
    "instances/node_guard.py": "LAB_NODE_GUARD is no setting: the policy the swarm runtime gives the firewall "
                               "service on another node (no Django there)",
}


def _manage_check(**env: str) -> subprocess.CompletedProcess:
    data_dir = new_data_dir()
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=BASE_DIR,
                          env=child_env(data_dir, free_port(), **env), capture_output=True, text=True, timeout=120)


def test_a_well_formed_environment_passes_the_check():
    """The control of the test below: the same command with good values starts."""
    result = _manage_check(LAB_PORT="8123", LAB_EGRESS="deny", LAB_RUNTIME="process", LAB_KEEP_RELEASES="3",
                           LAB_BACKUP_INTERVAL="12h", LAB_BACKUP_COPY_DIR="/mnt/lab-share", LAB_BACKUP_KEEP_WEEKLY="0")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize("name, value", [
    ("LAB_PORT", "abc"),
    ("LAB_EGRESS", "maybe"),
    ("LAB_DEBUG", "perhaps"),
    ("LAB_KEEP_RELEASES", "five"),
    ("LAB_LOCK_TTL", "30s"),
    ("LAB_PROCESS_ISOLATION", "some"),
    ("LAB_RUNTIME", "kubernetes"),  # no such backend file: refused at start-up, in one place
    ("LAB_SWARM_REGISTRY", "http://registry"),  # host[:port][/path], no scheme
    ("LAB_SWARM_SUBNETS", "10.216.0.0/99"),
    ("LAB_SWARM_SUBNETS", "10.216.0.0/28"),  # smaller than one overlay network (/27)
    ("LAB_SWARM_SUBNETS", "10.213.4.0/24"),  # inside LAB_DOCKER_SUBNETS' default
    ("LAB_PROXY_TRUSTED_IPS", "10.0.0.0/33"),
    ("LAB_THROTTLE_RESTART", "lots"),
    ("LAB_BACKUP_INTERVAL", "1 day"),  # a number and a unit s, m, h or d
    ("LAB_BACKUP_KEEP_DAILY", "-1"),
    ("LAB_BACKUP_COPY_DIR", "backups/copy"),  # not an absolute path
    ("LAB_BACKUP_CHECK_SECONDS", "0"),
    ("LAB_WAKE_HOLD_SECONDS", "0"),
    ("LAB_WAKE_HOLD_SECONDS", "600"),  # longer than daphne keeps a silent connection
    ("LAB_SESSION_LIVE_MINUTES", "ten"),
    ("LAB_SESSION_LIVE_MINUTES", "0"),
    ("LAB_SESSION_LIVE_MINUTES", "nan"),
    ("LAB_INSTALLER", "conda"),
    ("LAB_UV_CACHE_MB", "10"),
])
def test_a_malformed_environment_value_stops_start_up_naming_the_variable(name, value):
    result = _manage_check(**{name: value})
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and name in result.stderr, result.stderr  # one line, no traceback
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "System check identified" not in result.stdout


def _is_settings(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "settings" or (
        isinstance(node, ast.Attribute) and node.attr == "settings")


def _env_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(ENV_NAMES):
        return node.value
    return None


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" or (
        isinstance(node, ast.Name) and node.id == "environ")


def settings_reads_outside_settings(path: Path, shown: str) -> list[str]:
    """The lines of one module that read a setting other than as `settings.X`."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        where = f"{shown}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            # getattr(settings, "X", default): a second default beside settings.py's
            if name == "getattr" and len(node.args) == 3 and _is_settings(node.args[0]):
                found.append(f"{where} getattr(settings, ..., default)")
            # os.environ.get("LAB_..."), os.getenv("LAB_..."), env_str("LAB_...")
            if node.args and _env_name(node.args[0]) and (
                    name == "getenv" or name in ENV_HELPERS
                    or (name in {"get", "pop", "setdefault"} and _is_environ(func.value))):
                found.append(f"{where} {name}({node.args[0].value!r})")
            # a local helper: setting("LAB_...", default)
            if name.lstrip("_") == "setting" and len(node.args) >= 2 and _env_name(node.args[0]):
                found.append(f"{where} {name}({node.args[0].value!r}, default)")
        elif isinstance(node, ast.Subscript) and _is_environ(node.value) and _env_name(node.slice):
            found.append(f"{where} environ[{node.slice.value!r}]")
    return sorted(found, key=lambda line: int(line.split(":")[1].split()[0]))


def test_the_scan_finds_each_way_of_reading_a_setting_around_settings(tmp_path):
    """The control of the test below: every pattern it refuses is found."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom django.conf import settings\nfrom manager.env import env_int\n"
        "a = getattr(settings, 'LAB_X', 1)\nb = os.environ.get('LAB_Y', '')\nc = os.environ['REDIS_URL']\n"
        "d = os.getenv('DATABASE_URL')\ne = env_int('LAB_Z', 3)\nf = _setting('LAB_W', '')\n"
        "ok = settings.LAB_X\nok2 = os.environ.get('HOME')\nok3 = getattr(settings, 'LAB_X')\n")
    found = settings_reads_outside_settings(sample, "sample.py")
    assert [line.split(":")[1].split()[0] for line in found] == ["4", "5", "6", "7", "8", "9"], found


def test_no_module_reads_a_setting_around_settings_py():
    found = []
    for directory in CODE_DIRS:
        for path in sorted((Path(BASE_DIR) / directory).rglob("*.py")):
            relative = str(path.relative_to(BASE_DIR))
            if relative in ALLOWED or "/migrations/" in relative:
                continue
            found += settings_reads_outside_settings(path, relative)
    assert found == [], "read these as settings.X (the one default is in manager/settings.py):\n" + "\n".join(found)
