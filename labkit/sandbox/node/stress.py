"""A stressor, run inside a container by a StressChaos experiment (the sandbox's stress-ng).

    python3 -m labkit.sandbox.node.stress cpu LOAD       # keep a CPU LOAD percent busy
    python3 -m labkit.sandbox.node.stress memory BYTES   # hold BYTES of touched memory

It runs until it is killed: the experiment's end, or its container's.
"""

from __future__ import annotations

import sys
import time

SLICE = 0.1  # seconds: each slice is busy for LOAD percent of it, then sleeps


def cpu(load: int) -> None:
    busy = SLICE * load / 100
    while True:
        start = time.monotonic()
        while time.monotonic() - start < busy:
            pass
        time.sleep(max(0.0, SLICE - (time.monotonic() - start)))


def memory(size: int) -> None:
    held = bytearray(size)
    for offset in range(0, size, 4096):  # touch every page, so it is resident
        held[offset] = 1
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("cpu", "memory"):
        print(__doc__, file=sys.stderr)
        return 2
    (cpu if argv[0] == "cpu" else memory)(int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
