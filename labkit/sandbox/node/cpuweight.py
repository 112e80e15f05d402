"""A container's CPU request as its share of a busy machine, as the kubelet's cpu.shares make it.

On a real node each container's cgroup gets ``cpu.shares`` from its CPU request
(1024 per CPU; 2, the least there is, for a container that requests none), and
the node's own daemons sit outside the pods' cgroups. So when the machine is
busy, a container gets CPU in proportion to what it asked for, and a burst of
starting BestEffort pods cannot starve the kubelet or the control plane.

The sandbox's containers are processes, and the kernel's nice levels are CPU
weights on the same scale (nice 0 is 1024, each level about 1.25x less), so a
container is given the nice level whose weight is nearest its shares, and never
more than the agent's own (nice 0). Each container leads a session of its own,
which the kernel gives a scheduler autogroup of its own where autogroups are on;
that group's nice is set too, since it is what weighs the group against others.
"""

from __future__ import annotations

import bisect
import os

from labkit.kube import quantity

MIN_SHARES = 2  # the kubelet's MinShares: a container without a CPU request
SHARES_PER_CPU = 1024
# The kernel's sched_prio_to_weight for nice 0..19 (kernel/sched/core.c).
NICE_WEIGHTS = (1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15)


def shares(container: dict) -> int:
    """The cpu.shares the kubelet would give ``container`` (a container spec): its request, else its
    limit (a limit alone is also the request), else the minimum."""
    resources = container.get("resources", {})
    cpu = resources.get("requests", {}).get("cpu") or resources.get("limits", {}).get("cpu")
    if not cpu:
        return MIN_SHARES
    return max(MIN_SHARES, int(quantity.parse(str(cpu)) * SHARES_PER_CPU))


def level(container: dict) -> int:
    """The nice level of ``container`` (a container spec)."""
    return nice_for(shares(container))


def nice_for(weight: int) -> int:
    """The nice level (0..19) whose kernel weight is nearest ``weight``."""
    ascending = NICE_WEIGHTS[::-1]
    i = bisect.bisect_left(ascending, weight)
    nearest = min((j for j in (i - 1, i) if 0 <= j < len(ascending)), key=lambda j: abs(ascending[j] - weight))
    return len(ascending) - 1 - nearest


def apply(pid: int, nice: int) -> None:
    """Give process ``pid`` (a container's first process, just started) the ``nice`` level, and its
    autogroup too, so that even the container's set-up yields. The launcher sets the same level on
    itself before the container's program runs, so nothing of the container runs at more. Best
    effort: a machine that refuses leaves the container at the agent's own weight."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        with open(f"/proc/{pid}/autogroup", "w") as handle:
            handle.write(str(nice))
    except OSError:
        pass  # no autogroups here, or (unprivileged) the kernel's limit of one change per 100 ms
