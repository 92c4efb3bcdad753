#!/usr/bin/env python
"""How long the SSH key parser takes to refuse very long garbage (a pasted file, a key
repeated, no spaces): the worst of several rounds per input. The tests check only that
each is refused (tests/manager/test_sshkeys.py); the time is measured here, where a slow machine
cannot fail the suite. Budget: 2 s per input (exit status 1 above it).

    .venv/bin/python bench/ssh_key_parse.py [--rounds 5] [--budget 2]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django.core.exceptions import ValidationError  # noqa: E402

from manager.accounts.sshkeys import parse_public_key  # noqa: E402

INPUTS = {
    "1 MB of A": "A" * 1_000_000,
    "ed25519 + 1 MB": "ssh-ed25519 " + "A" * 1_000_000,
    "rsa + 1 MB of /": "ssh-rsa " + "////" * 250_000,
    "two 500 kB words": "x" * 500_000 + " " + "y" * 500_000,
    "200k non-ASCII": "\u00e9" * 200_000,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=2.0)
    args = parser.parse_args()
    worst_of_all = 0.0
    for label, text in INPUTS.items():
        times = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            try:
                parse_public_key(text)
            except ValidationError:
                pass
            else:
                print(f"{label}: ACCEPTED (a bug: tests/manager/test_sshkeys.py fails too)")
                return 1
            times.append(time.perf_counter() - started)
        worst_of_all = max(worst_of_all, max(times))
        print(f"{label:>18}: worst {max(times) * 1000:8.1f} ms, best {min(times) * 1000:8.1f} ms")
    print(f"worst {worst_of_all:.3f} s (budget {args.budget} s)")
    return 0 if worst_of_all <= args.budget else 1


if __name__ == "__main__":
    sys.exit(main())
