"""When the agent probes a container, as the kubelet times it: the first readiness probe at the node's
relist after the start, liveness and startup probes on the worker's ticks, none before
initialDelaySeconds. The probes themselves are tested live in test_containers and test_pods."""

from __future__ import annotations

import pytest

from labkit.sandbox.node.probes import Prober, Relist


def relist_at(phase: float) -> Relist:
    clock = Relist()
    clock.phase = phase
    return clock


def prober(taken: float, phase: float, **probes: dict) -> Prober:
    container = {"name": "web", **{f"{kind}Probe": spec for kind, spec in probes.items()}}
    return Prober(container, None, None, {}, "/", lambda *_: None, relist_at(phase), taken, "127.0.0.1")


@pytest.mark.parametrize("after, expected", [(100.0, 100.3), (100.3, 100.3), (100.31, 101.3), (99.9, 100.3)])
def test_the_relist_ticks_once_a_second_at_its_own_phase(after: float, expected: float) -> None:
    assert relist_at(0.3).next(after) == pytest.approx(expected)


def test_readiness_is_first_probed_at_the_relist_that_sees_the_container_then_on_the_ticks() -> None:
    p = prober(taken=50.0, phase=0.6, readiness={"periodSeconds": 1}, liveness={"periodSeconds": 10})
    p.plan(begun=50.2)  # started 0.2 s after the node took the pod; the node relists at .6
    assert p.schedules["Readiness"].next_at == pytest.approx(50.6)
    assert p.schedules["Liveness"].next_at == pytest.approx(60.0)  # the first tick (every 10 s from 50) after .6
    assert p.schedules["Readiness"].tick_after(50.6) == pytest.approx(51.0)  # then the pod's ticks, not .6 + 1


def test_no_probe_runs_before_its_initial_delay() -> None:
    p = prober(taken=0.0, phase=0.5, readiness={"periodSeconds": 2, "initialDelaySeconds": 5},
               startup={"periodSeconds": 3, "initialDelaySeconds": 1})  # fmt: skip
    p.plan(begun=1.0)
    assert p.schedules["Readiness"].next_at == pytest.approx(6.0)  # the first tick (0, 2, 4, 6) at or after 1 + 5
    assert p.schedules["Startup"].next_at == pytest.approx(3.0)  # at or after the relist (1.5) and 1 + 1


def test_the_api_defaults_apply() -> None:
    p = prober(taken=0.0, phase=0.0, readiness={"httpGet": {"port": 8080}})
    schedule = p.schedules["Readiness"]
    assert (schedule.period, schedule.timeout, schedule.failures_allowed, schedule.successes_needed) == (10, 1, 3, 1)
