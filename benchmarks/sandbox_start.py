"""How fast the sandbox's control plane starts, and how much memory it holds.

With the binaries cached, each run starts a brand-new sandbox (fresh certificates
and an empty etcd, as a grader gets for each submission) and measures:

* **floor**: etcd + kube-apiserver alone, from launch to the API server's /readyz.
  Every real control plane pays this.
* **whole /readyz**: all four components launched together, to the API server's
  /readyz: what the two extra components cost the API server on this machine.
* **whole ready**: all four to the point `labkit sandbox up` returns: every
  component healthy and the controller-manager acting (it has created the
  `default` ServiceAccount, without which no Pod can be created).
* **restart**: `up` again on an existing sandbox, after `down` (state kept).

It prints the median (and min/max) of several runs of each, the ratio of the
whole control plane to the floor measured in the same run, and the resident
memory of the running control plane.

    python benchmarks/sandbox_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.sandbox import binaries  # noqa: E402
from labkit.sandbox.controlplane import COMPONENTS, Sandbox  # noqa: E402


def _quiet(_: str) -> None:
    pass


def _readyz_after(sandbox: Sandbox, config: dict, started: float) -> float:
    while sandbox.api_get(config, "/readyz", timeout=1.0)[0] != 200:
        time.sleep(0.02)
    return time.monotonic() - started


def fresh_start(name: str, only: tuple[str, ...]) -> tuple[float, float, int]:
    """(seconds to /readyz, seconds to fully ready, resident bytes) for one fresh sandbox."""
    sandbox = Sandbox(name)
    sandbox.down(purge=True, say=_quiet)
    started = time.monotonic()
    config = sandbox.up(say=_quiet, wait=False, only=only)
    readyz = _readyz_after(sandbox, config, started)
    sandbox.wait_ready(config, only=only)
    ready = time.monotonic() - started
    time.sleep(2)  # let start-up garbage settle before reading memory
    memory = sum(c.memory for c in sandbox.components_status(config))
    return readyz, ready, memory


def restart(name: str) -> float:
    sandbox = Sandbox(name)
    sandbox.down(say=_quiet)
    started = time.monotonic()
    sandbox.up(say=_quiet)
    return time.monotonic() - started


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s   (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    binaries.ensure(say=print)  # binaries cached before anything is timed
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as state:
        os.environ["LABKIT_STATE_DIR"] = state
        floor, whole_readyz, whole_ready, restarts, memory = [], [], [], [], []
        try:
            for run in range(args.runs):
                # Interleave the two kinds so that machine noise falls on both alike.
                floor.append(fresh_start("bench-floor", ("etcd", "kube-apiserver"))[0])
                Sandbox("bench-floor").down(purge=True, say=_quiet)
                readyz, ready, rss = fresh_start("bench-whole", COMPONENTS)
                whole_readyz.append(readyz)
                whole_ready.append(ready)
                memory.append(rss)
                restarts.append(restart("bench-whole"))
                Sandbox("bench-whole").down(purge=True, say=_quiet)
                print(f"run {run + 1}/{args.runs}: floor {floor[-1]:.2f}s, whole /readyz {readyz:.2f}s, "
                      f"whole ready {ready:.2f}s, restart {restarts[-1]:.2f}s, memory {rss / 2**20:.0f} MiB",
                      file=sys.stderr)
        finally:
            for name in ("bench-floor", "bench-whole"):
                Sandbox(name).down(purge=True, say=_quiet)

    base = statistics.median(floor)
    print()
    print(f"Control-plane start, {args.runs} fresh sandboxes each, binaries cached, {os.cpu_count()} CPUs")
    print(f"  floor: etcd + kube-apiserver to /readyz        {summary(floor)}")
    print(f"  whole control plane to /readyz                 {summary(whole_readyz)}   "
          f"ratio {statistics.median(whole_readyz) / base:.2f}x floor")
    print(f"  whole control plane ready (what `up` waits for) {summary(whole_ready)}  "
          f"ratio {statistics.median(whole_ready) / base:.2f}x floor")
    print(f"  restart of an existing sandbox (`down`, `up`)  {summary(restarts)}")
    print(f"  resident memory of the running control plane   {statistics.median(memory) / 2**20:6.0f} MiB "
          f"(min {min(memory) / 2**20:.0f}, max {max(memory) / 2**20:.0f})")
    print("Targets: whole within 1.5x the floor and under 10 s; memory under 600 MB.")


if __name__ == "__main__":
    main()
