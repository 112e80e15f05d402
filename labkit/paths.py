"""Where labkit keeps things on a machine.

Two roots, both overridable so that tests, graders and shared machines can keep
them apart:

* the **cache** (``$LABKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/labkit``): things
  that can be rebuilt, such as the control-plane binaries, one folder per version;
* the **state** (``$LABKIT_STATE_DIR``, else ``$XDG_STATE_HOME/labkit``): each
  sandbox's certificates, etcd data and logs, one folder per sandbox name.
"""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def cache_root() -> Path:
    override = os.environ.get("LABKIT_CACHE_DIR")
    return Path(override) if override else _xdg("XDG_CACHE_HOME", ".cache") / "labkit"


def state_root() -> Path:
    override = os.environ.get("LABKIT_STATE_DIR")
    return Path(override) if override else _xdg("XDG_STATE_HOME", ".local/state") / "labkit"
