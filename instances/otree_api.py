"""The instance's oTree app as the manager reads it: its REST API and REST exports, with
the instance's REST key (oTree 5.4+: `otree-rest-key`), at the app's own address on the
host (the runtime's `app_url`, not the public proxy).

The app runs the experimenter's code: whatever it answers is untrusted. Nothing here
follows a redirect, every read has a time limit and a size limit, and the errors carry
only a short, single-line excerpt of what it said.
"""

from __future__ import annotations

import json
from typing import Any

import requests

from instances.runtime import RuntimeError_, get_runtime

REST_KEY_HEADER = "otree-rest-key"
TIMEOUT = 20  # seconds per request (connect and each read)
JSON_LIMIT = 8 * 2**20  # bytes of a JSON answer (the session list, one session)
CHUNK = 64 * 1024


class OTreeUnavailable(Exception):
    """The app could not be asked or answered something else than expected; the message
    says what, for a user."""


def _excerpt(data: bytes) -> str:
    text = " ".join(data[:400].decode("utf-8", errors="replace").split())
    return text[:200]


def app_url(instance) -> str:
    """Where the instance's app answers on this machine (OTreeUnavailable when it does not run)."""
    try:
        url = get_runtime(instance).state(instance.name).app_url
    except RuntimeError_ as exc:
        raise OTreeUnavailable(f"the runtime of {instance.name} does not answer: {exc}") from None
    if not url:
        raise OTreeUnavailable(f"the oTree app of {instance.name} is not running")
    return url.rstrip("/")


def stream(instance, path: str, *, params: dict | None = None, sink, limit: int, base_url: str = "",
           timeout: float = TIMEOUT) -> int:
    """GET `path` of the app with the REST key, writing the body into `sink(bytes)`; returns
    its size. OTreeUnavailable when the app does not answer 200 or the body exceeds `limit`."""
    base = base_url or app_url(instance)
    try:
        with requests.get(f"{base}{path}", params=params, headers={REST_KEY_HEADER: instance.rest_key},
                          timeout=timeout, allow_redirects=False, stream=True) as resp:
            if resp.status_code != 200:
                said = _excerpt(resp.raw.read(400, decode_content=True) or b"")
                raise OTreeUnavailable(f"the oTree app answered {path} with HTTP {resp.status_code}"
                                       + (f": {said}" if said else ""))
            size = 0
            for chunk in resp.iter_content(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise OTreeUnavailable(f"the oTree app's answer to {path} is larger than "
                                           f"{limit // 2**20} MiB")
                sink(chunk)
            return size
    except requests.RequestException as exc:
        raise OTreeUnavailable(f"the oTree app did not answer {path} ({type(exc).__name__})") from None


def get_bytes(instance, path: str, *, params: dict | None = None, limit: int = JSON_LIMIT, base_url: str = "",
              timeout: float = TIMEOUT) -> bytes:
    buf = bytearray()
    stream(instance, path, params=params, sink=buf.extend, limit=limit, base_url=base_url, timeout=timeout)
    return bytes(buf)


def get_json(instance, path: str, *, params: dict | None = None, limit: int = JSON_LIMIT, base_url: str = "",
             timeout: float = TIMEOUT) -> Any:
    data = get_bytes(instance, path, params=params, limit=limit, base_url=base_url, timeout=timeout)
    try:
        return json.loads(data)
    except ValueError:
        raise OTreeUnavailable(f"the oTree app answered {path} with something else than JSON: "
                               f"{_excerpt(data)}") from None
