"""The hook program of the instances' bare repositories (installed by `repos.prepare_repo`).

git runs it as `pre-receive` / `post-receive`; it hands the hook to the manager's hook
service (a unix socket served by the git service, `manage.py git_sshd`), which already has
Django loaded, and copies what the service prints to git (the pusher sees it as
`remote: ...`). Without the service (it is not running) it runs the same hook in a new
process, `manage.py git_hook`, which is slower to start but does the same.

Standard library only: it runs as `python -I -S hook_client.py HOOK SOCKET MANAGE_PY`.

Protocol: one JSON line {hook, git_dir, token, quarantine, stdin} to the service (`token`:
the push's one-time token, LAB_PUSH_TOKEN, which the service trades for the pusher;
`quarantine`: where git keeps the pushed objects until pre-receive accepts them); the
service answers with JSON lines {"out": text} ... and finally {"exit": code}.
"""

import json
import os
import socket
import subprocess
import sys

CONNECT_TIMEOUT = 5


def request(hook: str, stdin: bytes) -> bytes:
    return json.dumps({
        "hook": hook,
        "git_dir": os.path.abspath(os.environ.get("GIT_DIR", ".")),
        "token": os.environ.get("LAB_PUSH_TOKEN", ""),
        "quarantine": os.environ.get("GIT_QUARANTINE_PATH", ""),
        "stdin": stdin.decode("utf-8", errors="replace"),
    }).encode() + b"\n"


def in_process(hook: str, manage: str, stdin: bytes) -> int:
    """The hook without the service: Django starts in a process of its own."""
    return subprocess.run([sys.executable, manage, "git_hook", hook], input=stdin).returncode


STOPPED = {
    "pre-receive": b"The manager's git service stopped before checking this push; nothing was stored: push again.\n",
    "post-receive": b"The manager's git service stopped before this push's deploy ended; if it was recorded, it "
                    b"goes on: follow it on the instance page.\n",
}


def relay(hook: str, conn: socket.socket, out) -> int:
    """Copy the service's output to `out` until it sends the exit code."""
    conn.settimeout(None)  # a build may take minutes; the service bounds the wait
    with conn.makefile("rb") as answers:
        for line in answers:
            message = json.loads(line)
            if "exit" in message:
                return int(message["exit"])
            out.write(message.get("out", "").encode())
            out.flush()
    out.write(STOPPED.get(hook, b"The manager's git service stopped.\n"))
    out.flush()
    return 1


def main(argv: list[str]) -> int:
    hook, sock_path, manage = argv[1], argv[2], argv[3]
    stdin = sys.stdin.buffer.read()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(CONNECT_TIMEOUT)
        conn.connect(sock_path)
        conn.sendall(request(hook, stdin))
    except OSError:
        conn.close()
        return in_process(hook, manage, stdin)
    try:
        return relay(hook, conn, sys.stdout.buffer)
    except BrokenPipeError:  # the pusher pressed Ctrl-C: the deploy goes on without us
        return 1
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
