"""Pacing model requests across every worker: a rate limiter in Redis.

Each limit is a key holding the "theoretical arrival time" of the next request (GCRA:
generic cell rate algorithm). A request reserves the next free slot of every limit that
applies to it (the run's own limit and, when the lab set one, its provider's) in one
atomic script on Redis' own clock, and sleeps until that slot. Requests are therefore
spaced `60 / rate` seconds apart, whichever worker or process sends them, and a burst
never exceeds the configured rate.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from django.conf import settings

# KEYS: one per limit; ARGV: the interval (microseconds) of each key, in the same order.
# Returns the microseconds to wait before sending.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local start = now
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat > start then start = tat end
end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i])
  local keep = math.ceil((start + interval - now) / 1000) + 60000
  redis.call('SET', key, string.format('%d', start + interval), 'PX', keep)
end
return start - now
"""


def run_key(run_id: int) -> str:
    return f"lab:bots:rate:run:{run_id}"


def provider_key(provider_id: int) -> str:
    return f"lab:bots:rate:provider:{provider_id}"


class RateLimiter:
    """`await limiter.wait()` before each request. `limits`: [(key, requests per minute)];
    limits of 0 or less are ignored (no limit)."""

    def __init__(self, limits: list[tuple[str, int]], client: aioredis.Redis | None = None):
        self.limits = [(key, per_minute) for key, per_minute in limits if per_minute and per_minute > 0]
        self.client = client
        self._script = None

    async def _redis(self) -> aioredis.Redis:
        if self.client is None:
            self.client = aioredis.Redis.from_url(settings.REDIS_URL)
        if self._script is None:
            self._script = self.client.register_script(RESERVE)
        return self.client

    async def reserve(self) -> float:
        """Reserve the next slot; returns the seconds until it."""
        if not self.limits:
            return 0.0
        await self._redis()
        keys = [key for key, _ in self.limits]
        intervals = [int(60_000_000 / per_minute) for _, per_minute in self.limits]
        wait_us = await self._script(keys=keys, args=intervals)
        return max(0, int(wait_us)) / 1_000_000

    async def wait(self) -> float:
        delay = await self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)
        return delay

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
            self._script = None
