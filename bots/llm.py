"""The model client: the `openai` SDK pointed at a provider's OpenAI-compatible base URL
(OpenAI, OpenRouter, Gemini's and Mistral's compatible endpoints, vLLM, Ollama,
llama.cpp, …).

The SDK's own retries are off; `complete()` retries transient failures itself — HTTP 429,
5xx, timeouts, connection errors — with exponential backoff and full jitter (honouring a
Retry-After header up to the cap), bounded both in attempts and in total time. Every
attempt passes the shared rate limiter first and is reported to `on_attempt`, so failed
attempts are recorded too. Permanent errors (a refused key, an unknown model, a bad
request) are not retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx2
import openai

from bots.ratelimit import RateLimiter

MAX_ATTEMPTS = 6  # per request (1 + 5 retries)
MAX_TOTAL_SECONDS = 180.0  # per request, all attempts and waits together
BACKOFF_BASE = 1.0  # seconds; the n-th retry waits up to BACKOFF_BASE * 2**(n-1)
BACKOFF_CAP = 30.0
MAX_TOKENS = 1024


class ModelError(Exception):
    """The model could not answer; the message says why (shown as the bot's reason)."""


@dataclass
class Attempt:
    number: int
    text: str = ""
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    returned_model: str = ""  # the `model` the provider answered with
    system_fingerprint: str = ""
    cached: bool = False  # from the replay cache: no request was made


def _retry_after(exc: openai.APIStatusError) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        message = getattr(exc, "message", "") or str(exc)
        return f"HTTP {exc.status_code}: {' '.join(str(message).split())[:300]}"
    if isinstance(exc, openai.APITimeoutError):
        return "the request timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"cannot connect to the provider ({type(cause).__name__ if cause else 'connection error'})"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def transient(exc: BaseException) -> bool:
    """Worth another attempt: timeouts, connection errors, 408/409/425/429 and 5xx."""
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code in (408, 409, 425, 429)
                                                       or exc.status_code >= 500)


class LLMClient:
    """One per run: the SDK client (one connection pool) shared by the run's bots."""

    def __init__(self, *, base_url: str, api_key: str, model: str, temperature: float, response_format: str,
                 timeout: float, limiter: RateLimiter, seed: int | None = None):
        self.base_url = base_url
        self.model = model
        self.temperature = temperature
        self.seed = seed
        self.response_format = response_format
        self.limiter = limiter
        self.http = httpx2.AsyncClient(timeout=timeout, limits=httpx2.Limits(max_connections=100,
                                                                             max_keepalive_connections=20))
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=0,
                                         timeout=timeout, http_client=self.http)

    async def close(self) -> None:
        await self.client.close()

    def _format(self, schema: dict | None):
        if self.response_format == "json_schema" and schema is not None:
            return {"type": "json_schema", "json_schema": {"name": "page_answers", "strict": True, "schema": schema}}
        if self.response_format == "json_object":
            return {"type": "json_object"}
        return openai.NOT_GIVEN

    def request_parameters(self, schema: dict | None) -> dict:
        """What, besides the messages, decides the model's reply (the replay cache's key)."""
        response_format = self._format(schema)
        return {"base_url": self.base_url, "model": self.model, "temperature": self.temperature, "seed": self.seed,
                "response_format": None if response_format is openai.NOT_GIVEN else response_format,
                "max_tokens": MAX_TOKENS}

    async def complete(self, messages: list[dict], *, schema: dict | None = None, on_attempt=None) -> Attempt:
        """The model's reply to `messages`; ModelError after the retries are used up or on a
        permanent error. `on_attempt(attempt)` is awaited after every attempt."""
        started = time.monotonic()
        number = 0
        while True:
            number += 1
            await self.limiter.wait()
            attempt = Attempt(number=number)
            t0 = time.monotonic()
            try:
                response = await self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature,
                    response_format=self._format(schema), max_tokens=MAX_TOKENS,
                    seed=self.seed if self.seed is not None else openai.NOT_GIVEN)
                attempt.latency_ms = int((time.monotonic() - t0) * 1000)
                attempt.returned_model = str(getattr(response, "model", "") or "")[:200]
                attempt.system_fingerprint = str(getattr(response, "system_fingerprint", "") or "")[:200]
                choice = response.choices[0] if response.choices else None
                attempt.text = (choice.message.content or "") if choice is not None else ""
                if response.usage is not None:
                    attempt.prompt_tokens = response.usage.prompt_tokens or 0
                    attempt.completion_tokens = response.usage.completion_tokens or 0
                if on_attempt:
                    await on_attempt(attempt)
                return attempt
            except openai.OpenAIError as exc:
                attempt.latency_ms = int((time.monotonic() - t0) * 1000)
                attempt.error = describe(exc)
                if on_attempt:
                    await on_attempt(attempt)
                if not transient(exc):
                    raise ModelError(f"the provider refused the request ({attempt.error})") from None
                elapsed = time.monotonic() - started
                if number >= MAX_ATTEMPTS:
                    raise ModelError(f"gave up after {number} attempts ({attempt.error})") from None
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (number - 1)))
                hinted = _retry_after(exc) if isinstance(exc, openai.APIStatusError) else None
                if hinted is not None:
                    delay = max(delay, min(hinted, BACKOFF_CAP))
                if elapsed + delay >= MAX_TOTAL_SECONDS:
                    raise ModelError(f"gave up after {number} attempts in {elapsed:.0f} s ({attempt.error})") from None
                await asyncio.sleep(delay)
