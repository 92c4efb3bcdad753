"""A fake OpenAI-compatible model server for the bot-run tests and the benchmark: the only
mock in them (the real thing costs money). It listens on 127.0.0.1, answers
`POST /v1/chat/completions` like the OpenAI API does, and records every request.

By default it answers like a cooperative participant: it reads the fields the bot's
prompt lists (the JSON after "Fields to fill in (JSON):") and gives a valid value for each,
with a reason and, when asked for, updated notes ("memory"). Faults are scripted:

- `script(kind, ...)`: the next requests get these, in order: "429" (rate limited, with
  Retry-After: 0), "500", "timeout" (answers only after `slow_seconds`), "bad_json",
  "unknown_field", "fifty" (the guess 50, which the test game's validation refuses);
- `poison_first()`: the next new conversation, and every correction of it, gets bad JSON
  (so that bot gives up while the others go on);
- `hold(at)`: request number `at` (0-based) is not answered until `release()` (a worker
  can be killed while it waits);
- a number in `script` ("401", "404", …): that HTTP error (a refused key, an unknown model).

Its replies name the model `model_id` ("fake" unless set: not the model asked for, as
providers that route to a dated snapshot do) and carry `system_fingerprint` when one is set.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIELDS = re.compile(r"Fields to fill in \(JSON\):\n(\[.*?\])(?:\n\n|$)", re.S)
POISON = "this is not JSON, sorry"


def cooperative_answer(messages: list[dict], want_memory: bool, serial: int) -> str:
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user" and "Fields to fill in" in m["content"]),
                "")
    match = FIELDS.search(user)
    fields = json.loads(match.group(1)) if match else []
    answers = []
    for f in fields:
        kind = f["type"]
        if kind == "integer":
            low, high = f.get("min", 0), f.get("max", 100)
            value = low + (high - low) // 3 + serial % 7
            if value == 50:
                value = 51
        elif kind == "float":
            value = round((f.get("min", 0) + f.get("max", 1)) / 2, 2)
        elif kind == "choice":
            value = f["choices"][serial % len(f["choices"])]["value"]
        elif kind == "checkbox":
            value = True
        else:
            value = f"Robin {serial}"
        answers.append({"field": f["field"], "value": value, "reason": f"because {f['field']} = {value} seems sensible"})
    reply = {"answers": answers}
    if want_memory:
        reply["memory"] = f"notes after {len(answers)} answers (request {serial})"
    return json.dumps(reply)


class FakeLLM:
    def __init__(self, slow_seconds: float = 3.0, model_id: str = "fake", fingerprint: str | None = None):
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.requests: list[dict] = []
        self.faults: deque[str] = deque()
        self.slow_seconds = slow_seconds
        self.lock = threading.Lock()
        self.poison_next = False
        self.poisoned = 0
        self.held = threading.Event()  # set while a request is held
        self.hold_at: int | None = None
        self._release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status, payload, headers = fake.respond(self.path, dict(self.headers), body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                       **headers}.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (its timeout)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    # --- scripting
    def script(self, *kinds: str) -> None:
        with self.lock:
            self.faults.extend(kinds)

    def poison_first(self) -> None:
        self.poison_next = True

    def hold(self, at: int) -> None:
        self.hold_at = at

    def release(self) -> None:
        self._release.set()

    # --- answering
    def respond(self, path: str, headers: dict, body: dict) -> tuple[int, dict, dict]:
        with self.lock:
            serial = len(self.requests)
            self.requests.append({"path": path, "headers": {k.lower(): v for k, v in headers.items()}, "body": body,
                                  "time": time.monotonic(), "wall": time.time()})
            fault = self.faults.popleft() if self.faults else None
            hold = serial == self.hold_at
        if path.rstrip("/") != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}, {}
        if hold:
            self.held.set()
            self._release.wait(timeout=120)
        messages = body.get("messages", [])
        want_memory = "memory" in messages[0]["content"] if messages else False
        conversation_poisoned = any(m["role"] == "assistant" and m["content"] == POISON for m in messages)
        if self.poison_next and not any(m["role"] == "assistant" for m in messages):
            self.poison_next = False
            conversation_poisoned = True
        if conversation_poisoned:
            self.poisoned += 1
            return 200, self.completion(POISON, messages), {}
        if fault == "429":
            return 429, {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}}, {"Retry-After": "0"}
        if fault == "500":
            return 500, {"error": {"message": "The server had an error"}}, {}
        if fault and fault.isdigit():
            return int(fault), {"error": {"message": f"scripted error {fault}"}}, {}
        if fault == "timeout":
            time.sleep(self.slow_seconds)
        if fault == "bad_json":
            return 200, self.completion("Sure! My answer is thirty-three.", messages), {}
        text = cooperative_answer(messages, want_memory, serial)
        if fault == "unknown_field":
            data = json.loads(text)
            data["answers"].append({"field": "no_such_field", "value": 1, "reason": "?"})
            text = json.dumps(data)
        if fault == "fifty":
            data = json.loads(text)
            for a in data["answers"]:
                if a["field"] == "guess":
                    a["value"] = 50
            text = json.dumps(data)
        return 200, self.completion(text, messages), {}

    def completion(self, text: str, messages: list[dict]) -> dict:
        prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        extra = {"system_fingerprint": self.fingerprint} if self.fingerprint else {}
        return {
            **extra,
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4,
                      "total_tokens": prompt_tokens + len(text) // 4},
        }

    # --- what it saw
    def completions(self) -> list[dict]:
        return [r for r in self.requests if r["path"].rstrip("/") == "/v1/chat/completions"]


def main() -> None:
    """`python -m tests.fake_llm`: serve until stdin closes (the benchmark runs it apart
    from the process it measures). Prints its base URL; `POST /stats` returns the arrival
    times (time.time()) of the chat requests and resets them."""
    import sys

    with FakeLLM() as fake:
        original = fake.respond

        def respond(path, headers, body):
            if path.rstrip("/") == "/stats":
                with fake.lock:
                    times = [r["wall"] for r in fake.requests]
                    fake.requests.clear()
                return 200, {"times": times}, {}
            return original(path, headers, body)

        fake.respond = respond
        print(fake.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
