"""CPU and memory use of each container, sampled from /proc for the whole agent in one pass.

A container is the process session its first process leads (the agent starts
each container in a new session), so one scan of /proc a second groups every
process by session and sums resident memory and CPU time. The pod workers read
their containers' figures from here to enforce memory limits (an OOM kill) and
to report usage.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
INTERVAL = 0.5


@dataclass(frozen=True)
class Usage:
    memory_bytes: int
    cpu_seconds: float
    processes: int


def scan() -> dict[int, Usage]:
    """{session id: usage} over every live process."""
    totals: dict[int, list[float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z":
            continue
        session = int(fields[3])  # stat field 6
        cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        rss = int(fields[21]) * PAGE
        entry = totals.setdefault(session, [0, 0.0, 0])
        entry[0] += rss
        entry[1] += cpu
        entry[2] += 1
    return {sid: Usage(int(m), c, int(n)) for sid, (m, c, n) in totals.items()}


def total(parts: list[Usage | None]) -> Usage | None:
    """The sum of several sessions' use (a container and the load injected into it); None if none is known."""
    known = [part for part in parts if part is not None]
    if not known:
        return None
    return Usage(sum(u.memory_bytes for u in known), sum(u.cpu_seconds for u in known), sum(u.processes for u in known))


class Monitor(threading.Thread):
    """Keeps the latest scan; one per agent (``start_new``), handed to its nodes."""

    def __init__(self) -> None:
        super().__init__(name="usage", daemon=True)
        self.latest: dict[int, Usage] = {}

    @classmethod
    def start_new(cls) -> Monitor:
        monitor = cls()
        monitor.latest = scan()
        monitor.start()
        return monitor

    def run(self) -> None:
        while True:
            time.sleep(INTERVAL)
            self.latest = scan()

    def of(self, session: int) -> Usage | None:
        return self.latest.get(session)
