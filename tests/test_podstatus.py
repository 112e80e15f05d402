"""The pod status a node reports, as a pure function of what it observed and what it reported before."""

from __future__ import annotations

from labkit.sandbox.node.podstatus import ContainerView, PodView, phase, pod_status, with_transition_times

RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}


def _conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["lastTransitionTime"]) for c in status["conditions"]}


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    starting = PodView(containers=(ContainerView("web", "python", state=RUNNING, started=True, probed_ready=False),),
                       sandbox_ready=True, ip="10.244.1.2", start_time="t0")  # fmt: skip
    first = pod_status(starting, None, "t1")
    assert _conditions(first)["Ready"] == ("False", "t1") and _conditions(first)["Initialized"] == ("True", "t1")
    # Nothing changed but the clock: every time is kept.
    again = pod_status(starting, first, "t2")
    assert again == first
    # Ready turns True: Ready and ContainersReady move, the others keep theirs.
    ready = PodView(containers=(ContainerView("web", "python", state=RUNNING, started=True),), sandbox_ready=True,
                    ip="10.244.1.2", start_time="t0")  # fmt: skip
    later = pod_status(ready, again, "t3")
    assert _conditions(later) == {"PodReadyToStartContainers": ("True", "t1"), "Initialized": ("True", "t1"),
                                  "ContainersReady": ("True", "t3"), "Ready": ("True", "t3")}  # fmt: skip
    assert "reason" not in next(c for c in later["conditions"] if c["type"] == "Ready")


def test_a_new_condition_or_no_previous_status_takes_now() -> None:
    current = [{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}]
    previous = [{"type": "Ready", "status": "True", "lastTransitionTime": "t1"}]
    assert [c["lastTransitionTime"] for c in with_transition_times(current, previous, "t9")] == ["t1", "t9"]
    assert [c["lastTransitionTime"] for c in with_transition_times(current, [], "t9")] == ["t9", "t9"]


def test_phases_follow_the_containers() -> None:
    done = {"terminated": {"exitCode": 0}}
    failed = {"terminated": {"exitCode": 1}}
    init_waiting = ContainerView("setup", "busybox", state={"waiting": {"reason": "PodInitializing"}})
    assert phase(PodView(init=(init_waiting,), containers=(ContainerView("web", "python"),))) == "Pending"
    assert phase(PodView(init=(ContainerView("setup", "busybox", state=failed, done=True),))) == "Failed"
    assert phase(PodView(containers=(ContainerView("web", "python", state=RUNNING),))) == "Running"
    assert phase(PodView(containers=(ContainerView("job", "python", state=done, done=True),))) == "Succeeded"
    mixed = (ContainerView("a", "python", state=done, done=True), ContainerView("b", "python", state=failed, done=True))
    assert phase(PodView(containers=mixed)) == "Failed"
    # Between restarts (CrashLoopBackOff) a pod that has run stays Running.
    crashed = ContainerView("web", "python", state={"waiting": {"reason": "CrashLoopBackOff"}}, restarts=2)
    assert phase(PodView(containers=(crashed,))) == "Running"


def test_readiness_by_kind_of_container() -> None:
    ran = ContainerView("x", "busybox", state={"terminated": {"exitCode": 0}}, done=True)
    live = ContainerView("x", "busybox", state=RUNNING, started=True)
    pod = PodView(init=(ran,), containers=(live,), ephemeral=(live,), sandbox_ready=True)
    status = pod_status(pod, None, "t1")
    assert status["initContainerStatuses"][0]["ready"] is True
    assert status["containerStatuses"][0]["ready"] is True
    assert status["ephemeralContainerStatuses"][0]["ready"] is False  # an ephemeral container is never ready
    assert "podIP" not in status
