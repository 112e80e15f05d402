"""``python3 -m labkit.apps.platform ROLE``: run one of the platform's four services."""

from __future__ import annotations

import importlib
import os
import sys

from labkit.apps.platform.settings import ROLES, Settings
from labkit.apps.platform.telemetry import configure

MODULES = {"api": "api", "queue": "taskqueue", "worker": "worker", "store": "store"}
USAGE = f"usage: python3 -m labkit.apps.platform {{{','.join(ROLES)}}}  (or set $ROLE)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (sys.modules["labkit.apps.platform"].__doc__ or ""))
        return 0
    role = args[0] if args else os.environ.get("ROLE", "")
    if role not in ROLES:
        print(f"{USAGE}\nplatform: no such role {role!r}" if role else USAGE, file=sys.stderr)
        return 2
    settings = Settings.from_env(role)
    configure(role, settings.version, settings.hostname)
    module = importlib.import_module(f"labkit.apps.platform.{MODULES[role]}")
    return module.main(settings)


if __name__ == "__main__":
    sys.exit(main())
