"""Small typed helpers for reading the environment (healthchecks style).

Every variable is optional; a malformed value stops start-up with a message that
names the variable, rather than being silently replaced by the default.
"""

import os


class ConfigError(RuntimeError):
    pass


def env_str(name: str, default: str = "") -> str:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true/false (1/0, yes/no), got {raw!r}")


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return list(default or [])
    return [item.strip() for item in raw.split(",") if item.strip()]


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int | None:
    """'90s', '30m', '24h', '7d' (or '0') as seconds; None when it is not one of these."""
    value = text.strip().lower()
    if value == "0":
        return 0
    if len(value) < 2 or value[-1] not in DURATION_UNITS or not value[:-1].isdigit() or not value[:-1].isascii():
        return None
    return int(value[:-1]) * DURATION_UNITS[value[-1]]


def env_duration(name: str, default: str) -> int:
    """A duration such as `24h` (units s, m, h, d; `0` = none) as seconds."""
    raw = os.environ.get(name)
    value = parse_duration(default if raw is None or raw == "" else raw)
    if value is None:
        raise ConfigError(f"{name} must be a duration: a whole number and a unit s, m, h or d (e.g. 24h, 30m, 7d), "
                          f"or 0 for none; got {raw!r}")
    return value
