"""The product's version, recorded in bot-run manifests and shown in the API's description."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

VERSION = "0.17.0"


@functools.cache
def full_version() -> str:
    """VERSION plus the manager's git commit when it runs from a checkout ("0.17.0+g1a2b3c4")."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{VERSION}+g{commit}" if commit else VERSION
