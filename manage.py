#!/usr/bin/env python
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "manager.settings")
    from django.core.management import execute_from_command_line

    from manager.env import ConfigError

    try:
        execute_from_command_line(sys.argv)
    except ConfigError as exc:
        # A set-up the manager refuses (settings.py): the sentence, not a traceback.
        sys.exit(f"error: {exc}")
