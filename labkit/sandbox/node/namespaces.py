"""What Linux namespaces this machine grants the node agent, and how the agent is started to get them.

Containers get their own mount, UTS and network namespaces (launch.py). Making
them needs root, or root inside a user namespace: so an unprivileged user's
agent runs under ``unshare --user --map-root-user`` (as rootless container tools
do), where it is root over the namespaces it creates and nothing else. Where even
that is refused, containers run without namespaces, and pods say so in a Warning.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import threading
from typing import Any, Callable, TypeVar

from labkit.sandbox.node import launch


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def in_network(pid: int | None, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)`` in the network namespace of process ``pid`` (here if None); its result.

    It runs in a thread of its own, which enters the namespace and ends with the call: a thread cannot
    always come back (as root in a user namespace it may enter namespaces it owns, but not return to this
    machine's), and a thread left in a pod's network would send the agent's API calls there. What the call
    makes there stays there: a socket belongs to the network it was made in, a process to its parent's.
    """
    if pid is None:
        return call(*args, **kwargs)
    outcome: dict[str, Any] = {}

    def enter_and_call() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"cannot enter the network namespace of process {pid}")
            finally:
                os.close(fd)
            outcome["result"] = call(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_call, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@functools.cache
def available() -> bool:
    """Whether this process may give containers their own namespaces."""
    try:
        done = subprocess.run(launch.command({"mode": "check"}), capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def agent_argv(state_root: str) -> list[str]:
    """The node agent's command: in a user namespace of its own when not run as root (and one is granted).

    There the user is root, and the user's subordinate ids (``/etc/subuid``, mapped by ``newuidmap`` from
    Debian's uidmap) are its other users, as rootless container tools map them: so a container's root can
    give a file to another user (``tar`` extracting ``kubectl cp``'s archive does). Without them only root
    exists in there, and such a ``chown`` fails."""
    argv = [sys.executable, "-m", "labkit.sandbox.node.agent", state_root]
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 or unshare is None:
        return argv
    for mapping in (["--map-root-user", "--map-auto"], ["--map-root-user"]):
        wrapped = [unshare, "--user", *mapping, "--"]
        try:
            if subprocess.run([*wrapped, "true"], capture_output=True, timeout=10).returncode == 0:
                return [*wrapped, *argv]
        except (OSError, subprocess.TimeoutExpired):
            continue
    return argv
