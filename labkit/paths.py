"""Where labkit keeps things on a machine.

Two roots, both overridable so that tests, graders and shared machines can keep
them apart:

* the **cache** (``$LABKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/labkit``): things
  that can be rebuilt, such as the control-plane binaries, one folder per version;
* the **state** (``$LABKIT_STATE_DIR``, else ``$XDG_STATE_HOME/labkit``): each
  sandbox's certificates, etcd data and logs, one folder per sandbox name.

A third, the **runtime** root, holds what a node keeps only while it runs: its
pods' volumes, container scratch folders and logs. Container runtimes keep such
files in memory (``/run``, tmpfs secret volumes), and so does labkit where it can:
creating and deleting many small files on a disk costs a pod burst more than
everything else the node does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else Path.home() / fallback


def cache_root() -> Path:
    override = os.environ.get("LABKIT_CACHE_DIR")
    return Path(override) if override else _xdg("XDG_CACHE_HOME", ".cache") / "labkit"


RUNTIME_MIN_BYTES = 1 << 30  # a memory file system smaller than this (a container's 64 MiB /dev/shm) is not used


def runtime_root() -> Path | None:
    """Where sandboxes keep their pods' runtime files: ``$LABKIT_RUNTIME_DIR``, else a folder of this
    user's own in ``/dev/shm`` when that is a memory file system of at least 1 GiB; None: in each
    sandbox's state folder."""
    override = os.environ.get("LABKIT_RUNTIME_DIR")
    if override:
        return Path(override)
    shm = Path("/dev/shm")
    try:
        size = os.statvfs(shm)
    except OSError:
        return None
    if size.f_blocks * size.f_frsize < RUNTIME_MIN_BYTES or not os.access(shm, os.W_OK):
        return None
    folder = shm / f"labkit-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    # /dev/shm is everyone's: use the folder only if it is ours and private.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return folder


def state_root() -> Path:
    override = os.environ.get("LABKIT_STATE_DIR")
    return Path(override) if override else _xdg("XDG_STATE_HOME", ".local/state") / "labkit"


def sandboxes_root() -> Path:
    """Where each sandbox's state folder is, by name."""
    return state_root() / "sandboxes"
