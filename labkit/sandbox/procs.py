"""Small facts about local processes and ports, read from /proc and the socket API."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes: it holds no memory and no port.
    return _stat_field(pid, 2) != "Z"


def _stat_field(pid: int, index: int) -> str | None:
    """Field ``index + 1`` of /proc/PID/stat as proc(5) numbers them (2: state, 5: session, 21: start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 1) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[index - 2] if len(fields) > index - 2 else None


def rss_bytes(pid: int | None) -> int:
    """Resident memory of one process (0 if it is gone)."""
    if not pid:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def namespace(pid: int, kind: str) -> int | None:
    """The inode of a process's ``kind`` namespace (``net``, ``mnt`` ...), or None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on ``host:port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def mentions(args: list[str], folder: Path) -> bool:
    """True if a command line refers to ``folder`` or something inside it (not a sibling
    whose name merely starts the same, as ``sandboxes/ab`` does for ``sandboxes/a``)."""
    text = str(folder)
    return any(arg.endswith(text) or text + os.sep in arg for arg in args)


def record(pid: int, path: Path) -> None:
    """Note a container's first process (and its start time, against pid reuse) in ``path`` (``*.pid``)."""
    path.write_text(f"{pid} {_stat_field(pid, 21)}")


def running_in(folder: Path) -> list[int]:
    """Live processes of the containers recorded (``*.pid``) inside ``folder``, with everything they
    started in their sessions, and any process whose working directory is inside ``folder``."""
    leaders = set()
    # os.walk, not rglob: pods' folders come and go while this looks, and walk skips what vanished.
    records = [Path(top) / name for top, _, names in os.walk(folder) for name in names if name.endswith(".pid")]
    for entry in records:
        try:
            pid, started = entry.read_text().split()
        except (OSError, ValueError):
            continue
        if _stat_field(int(pid), 21) == started:
            leaders.add(int(pid))
    prefix = str(folder) + os.sep
    found = []
    for pid in all_pids():
        if pid == os.getpid() or not alive(pid):
            continue
        session = _stat_field(pid, 5)
        if (session is not None and int(session) in leaders) or (cwd(pid) or "").startswith(prefix):
            found.append(pid)
    return found
