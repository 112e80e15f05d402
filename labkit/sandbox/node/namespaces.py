"""What Linux namespaces this machine grants the node agent, and how the agent is started to get them.

Containers get their own mount, UTS and network namespaces (launch.py). Making
them needs root, or root inside a user namespace: so an unprivileged user's
agent runs under ``unshare --user --map-root-user`` (as rootless container tools
do), where it is root over the namespaces it creates and nothing else. Where even
that is refused, containers run without namespaces, and pods say so in a Warning.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

from labkit.sandbox.node import launch


@functools.cache
def available() -> bool:
    """Whether this process may give containers their own namespaces."""
    try:
        done = subprocess.run(launch.command({"mode": "check"}), capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def agent_argv(state_root: str) -> list[str]:
    """The node agent's command: in a user namespace of its own when not run as root (and one is granted)."""
    argv = [sys.executable, "-m", "labkit.sandbox.node.agent", state_root]
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 or unshare is None:
        return argv
    wrapped = [unshare, "--user", "--map-root-user", "--"]
    try:
        granted = subprocess.run([*wrapped, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        granted = False
    return [*wrapped, *argv] if granted else argv
