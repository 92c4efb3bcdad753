"""Rate limits for destructive or costly actions: restart, database reset, backup now,
starting a bot run, downloading an instance's data, creating an access token.

Each action has a budget per instance and per user, read from a setting in the format of
LAB_LOGIN_RATE_LIMIT: comma-separated `COUNT/PERIOD/SCOPE`, PERIOD `s`, `m`, `h` or `d`
with an optional number (`10m`, `h`), SCOPE `instance` or `user`; empty or `off` = no
limit. E.g. `LAB_THROTTLE_RESET=3/10m/instance,10/h/user`.

- The services call `take(action, actor, instance)` (a context manager) after their own
  checks and before they create any row or job: an action over a budget raises
  `Throttled(detail, retry_after)` and nothing is done (API: 429 with `Retry-After`;
  pages: the same text as an error, HTTP 429).
- Only accepted actions count: a refused action (throttled, invalid, not allowed) uses no
  budget, and an action that fails inside the `with` block gives its slot back.
- Per-instance budgets apply to everyone, lab managers included (they protect the
  instance's data); per-user budgets do not apply to lab managers, who operate many
  instances at once.

The counts live in Redis (the manager's own), one sorted set of acceptance times per
budget, checked and updated in one atomic script on Redis' clock: at most COUNT actions are
accepted within any PERIOD, whichever web or API process takes them. When Redis does not
answer, the action is let through (and logged): the limits guard against floods, they must
not take the manager down with Redis.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)

SCOPES = ("instance", "user")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ITEM_RE = re.compile(r"^(\d+)/(\d*)([smhd])/(instance|user)$")


@dataclass(frozen=True)
class Limit:
    count: int
    seconds: int
    scope: str  # "instance" or "user"


@dataclass(frozen=True)
class Action:
    setting: str
    default: str
    of_instance: str  # "database resets of {name}"
    by_user: str  # "database resets by you"
    scopes: tuple[str, ...] = SCOPES


ACTIONS = {
    "restart": Action("LAB_THROTTLE_RESTART", "20/10m/instance,60/10m/user",
                      "restarts of {name}", "restarts by you"),
    "reset": Action("LAB_THROTTLE_RESET", "3/10m/instance,10/h/user",
                    "database resets of {name}", "database resets by you"),
    "backup": Action("LAB_THROTTLE_BACKUP", "6/h/instance,20/h/user",
                     "backups of {name}", "backups by you"),
    "bot_run": Action("LAB_THROTTLE_BOT_RUN", "20/h/instance,40/h/user",
                      "bot runs started on {name}", "bot runs started by you"),
    "export": Action("LAB_THROTTLE_EXPORT", "10/10m/instance,30/h/user",
                     "data downloads of {name}", "data downloads by you"),
    "token": Action("LAB_THROTTLE_TOKEN", "10/h/user", "", "access tokens created for your account",
                    scopes=("user",)),
}


class Throttled(Exception):
    """An action over one of its budgets; nothing was done. `detail` says which budget and
    when to try again; `retry_after` is in whole seconds (at least 1)."""

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


def refused_page(response, throttled: Throttled):
    """A page that answers a throttled action (nothing was done): HTTP 429 with Retry-After."""
    response.status_code = 429
    response["Retry-After"] = str(throttled.retry_after)
    return response


# --- settings -------------------------------------------------------------------------

def parse(text: str, *, name: str = "limit", scopes: tuple[str, ...] = SCOPES) -> list[Limit]:
    """'3/10m/instance,10/h/user' → [Limit(3, 600, 'instance'), Limit(10, 3600, 'user')].
    ValueError names the setting and the item it cannot read."""
    text = (text or "").strip()
    if text.lower() in ("", "off", "none"):
        return []
    limits = []
    for item in (part.strip() for part in text.split(",")):
        match = ITEM_RE.match(item.replace(" ", ""))
        if not match:
            raise ValueError(f"{name}: cannot read {item!r}; write COUNT/PERIOD/SCOPE such as 3/10m/instance "
                             f"(PERIOD s, m, h or d with an optional number; SCOPE {' or '.join(scopes)})")
        count, number, unit, scope = match.groups()
        if scope not in scopes:
            raise ValueError(f"{name}: {item!r} — the scope must be {' or '.join(scopes)}")
        seconds = int(number or 1) * UNITS[unit]
        if int(count) < 1 or seconds < 1:
            raise ValueError(f"{name}: {item!r} — the count and the period must be at least 1 (or write off)")
        limits.append(Limit(int(count), seconds, scope))
    return limits


def check_settings(values: dict[str, str]) -> None:
    """Read every LAB_THROTTLE_* value (settings.py calls this at start-up)."""
    for action in ACTIONS.values():
        parse(values.get(action.setting, action.default), name=action.setting, scopes=action.scopes)


def limits_of(action: str) -> list[Limit]:
    from django.conf import settings

    spec = ACTIONS[action]
    return parse(getattr(settings, spec.setting), name=spec.setting, scopes=spec.scopes)


# --- texts ----------------------------------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def period_text(seconds: int) -> str:
    """600 → '10 minutes', 3600 → 'hour', 86400 → 'day' (as in 'at most 3 per …')."""
    for unit, word in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if seconds % unit == 0:
            n = seconds // unit
            return word if n == 1 else _plural(n, word)
    return _plural(seconds, "second")


def wait_text(seconds: int) -> str:
    """How long until the next try, rounded up: '40 seconds', '7 minutes', '1 hour 5 minutes'."""
    seconds = max(1, int(seconds))
    if seconds < 60:
        return _plural(seconds, "second")
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return _plural(minutes, "minute")
    hours, minutes = divmod(minutes, 60)
    return _plural(hours, "hour") + (f" {_plural(minutes, 'minute')}" if minutes else "")


def detail(action: str, limit: Limit, retry_after: int, instance_name: str = "") -> str:
    spec = ACTIONS[action]
    what = spec.of_instance.format(name=instance_name) if limit.scope == "instance" else spec.by_user
    across = " across your instances" if limit.scope == "user" and "instance" in spec.scopes else ""
    return (f"Too many {what}: at most {limit.count} per {period_text(limit.seconds)}{across}. "
            f"Try again in {wait_text(retry_after)}.")


# --- Redis ----------------------------------------------------------------------------

# KEYS: one sorted set per budget. ARGV[1]: this action's member; then per key its count
# and its window in microseconds. Either every budget has room and the action is added to
# all of them ({0, 0}), or nothing changes and the answer is {index of the budget that
# frees last, microseconds until it does}.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local worst, wait = 0, 0
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local held = redis.call('ZCARD', key)
  if held >= count then
    local freeing = redis.call('ZRANGE', key, held - count, held - count, 'WITHSCORES')
    local w = tonumber(freeing[2]) + window - now
    if w > wait or worst == 0 then worst, wait = i, w end
  end
end
if worst > 0 then return {worst, wait} end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 * i + 1]) / 1000) + 1000)
end
return {0, 0}
"""

_client = None
_script = None


def _redis():
    global _client, _script
    if _client is None:
        import redis
        from django.conf import settings

        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
        _script = _client.register_script(TAKE)
    return _client, _script


def key(action: str, scope: str, ident) -> str:
    """One budget's sorted set (named by this manager, should several share one Redis)."""
    from django.conf import settings

    return f"lab:throttle:{settings.LAB_MANAGER_ID}:{action}:{scope}:{ident}"


def _budgets(action: str, actor, instance) -> list[tuple[str, Limit]]:
    budgets = []
    for limit in limits_of(action):
        if limit.scope == "instance":
            if instance is not None:
                budgets.append((key(action, "instance", instance.pk), limit))
        elif actor is not None and getattr(actor, "pk", None) is not None and not actor.is_superuser:
            budgets.append((key(action, "user", actor.pk), limit))
    return budgets


@contextlib.contextmanager
def take(action: str, actor, instance=None):
    """Count one `action` by `actor` (on `instance`) against its budgets, or raise
    Throttled without counting it. The block does the action; should it raise, the slot is
    given back."""
    budgets = _budgets(action, actor, instance)
    member = uuid.uuid4().hex
    taken = False
    if budgets:
        try:
            client, script = _redis()
            args = [member]
            for _, limit in budgets:
                args += [limit.count, limit.seconds * 1_000_000]
            index, wait_us = (int(x) for x in script(keys=[k for k, _ in budgets], args=args, client=client))
        except Exception:  # noqa: BLE001 - see the module docstring: Redis down lets the action through
            log.warning("rate limit of %s not checked: Redis did not answer", action, exc_info=True)
        else:
            if index:
                limit = budgets[index - 1][1]
                retry_after = max(1, math.ceil(wait_us / 1_000_000))
                raise Throttled(detail(action, limit, retry_after, getattr(instance, "name", "")), retry_after)
            taken = True
    try:
        yield
    except BaseException:
        if taken:
            _give_back([k for k, _ in budgets], member)
        raise


def _give_back(keys: list[str], member: str) -> None:
    try:
        client, _ = _redis()
        pipe = client.pipeline()
        for k in keys:
            pipe.zrem(k, member)
        pipe.execute()
    except Exception:  # noqa: BLE001 - the slot then ages out with its window
        log.warning("could not give back a rate-limit slot", exc_info=True)
