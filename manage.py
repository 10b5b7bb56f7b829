#!/usr/bin/env python
"""Django's command-line utility for Tollgate."""
import os
import sys
from pathlib import Path


def _local_run_settings() -> None:
    """In a new shell beside `make run` (README: `python manage.py issue_key ...`), use what the local run
    uses: DEBUG and the secrets it keeps in var/local.env. Never when the environment sets its own."""
    local = Path(os.environ.get("TOLLGATE_VAR_DIR", Path(__file__).resolve().parent / "var")) / "local.env"
    if "SECRET_KEY" in os.environ or "DEBUG" in os.environ or not local.exists():
        return
    os.environ["DEBUG"] = "true"
    for line in local.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep:
            os.environ.setdefault(name.strip(), value.strip())


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")
    _local_run_settings()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
