"""A pod's status, as a pure function of what the node observed of it and of the status it last reported.

The kubelet's status manager computes the phase and the conditions from its
containers' states and writes a condition's ``lastTransitionTime`` only when that
condition's status changes, so ``kubectl describe`` and anything that watches
conditions (a rollout's progress, an operator's alert) see when a pod became
ready, not when it was last looked at. ``pod_status`` does the same: given the
observation and the previous status it returns the new one, and nothing else
goes in (no clock but ``now``, no pod worker), so it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ContainerView:
    """One container as the node last saw it."""

    name: str
    image: str
    image_id: str = ""
    state: dict = field(default_factory=dict)  # {"running": {...}} | {"waiting": {...}} | {"terminated": {...}}
    last_state: dict = field(default_factory=dict)
    restarts: int = 0
    done: bool = False  # terminated, not to be restarted
    started: bool = False  # running, and past its startup probe
    probed_ready: bool = True  # its readiness probe's verdict (True without one)
    ever_started: bool = False
    container_id: str = ""

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def succeeded(self) -> bool:
        return self.done and self.state.get("terminated", {}).get("exitCode") == 0


@dataclass(frozen=True)
class PodView:
    """A pod as the node last saw it."""

    init: tuple[ContainerView, ...] = ()
    containers: tuple[ContainerView, ...] = ()
    ephemeral: tuple[ContainerView, ...] = ()
    sandbox_ready: bool = False  # its volumes are set up and containers may start
    ip: str | None = None
    start_time: str | None = None
    host_ip: str = "127.0.0.1"


def phase(pod: PodView) -> str:
    if any(c.done and not c.succeeded for c in pod.init):
        return "Failed"
    if not all(c.succeeded for c in pod.init):
        return "Pending"
    if any(c.running for c in pod.containers):
        return "Running"
    if pod.containers and all(c.done for c in pod.containers):
        return "Succeeded" if all(c.succeeded for c in pod.containers) else "Failed"
    if any(c.restarts or c.ever_started for c in pod.containers):
        return "Running"
    return "Pending"


def container_status(c: ContainerView, kind: str) -> dict:
    """``kind``: "init", "app" or "ephemeral" (an init container is ready once it succeeded; an ephemeral one never)."""
    ready = c.succeeded if kind == "init" else (kind == "app" and c.started and c.probed_ready)
    entry = {"name": c.name, "image": c.image, "imageID": c.image_id, "ready": ready, "started": c.started,
             "restartCount": c.restarts, "state": c.state, "lastState": c.last_state}  # fmt: skip
    if c.container_id:
        entry["containerID"] = c.container_id
    return entry


def _condition(kind: str, ok: bool, reason: str | None = None, message: str | None = None) -> dict:
    entry = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None}
    if reason:
        entry["reason"] = reason
    if message:
        entry["message"] = message
    return entry


def with_transition_times(conditions: list[dict], previous: list[dict], now: str) -> list[dict]:
    """``conditions`` with a ``lastTransitionTime``: the previous one where the condition's status is unchanged,
    ``now`` where it changed or is new."""
    before = {c["type"]: c for c in previous}
    out = []
    for condition in conditions:
        old = before.get(condition["type"])
        kept = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        out.append({**condition, "lastTransitionTime": old["lastTransitionTime"] if kept else now})
    return out


def pod_status(pod: PodView, previous: dict | None, now: str) -> dict:
    """The status to report for ``pod``, given the one reported before (None at first) and the time ``now``."""
    statuses = [container_status(c, "app") for c in pod.containers]
    all_ready = bool(statuses) and all(s["ready"] for s in statuses)
    current = phase(pod)
    ready_reason = None if all_ready else ("PodCompleted" if current in ("Succeeded", "Failed") else "ContainersNotReady")
    initialized = all(c.succeeded for c in pod.init)
    waiting = [c.name for c in pod.init if not c.succeeded]
    not_ready = [s["name"] for s in statuses if not s["ready"]]
    ready_message = f"containers with unready status: [{' '.join(not_ready)}]" if not_ready else None
    conditions = [
        _condition("PodReadyToStartContainers", pod.sandbox_ready),
        _condition("Initialized", initialized, None if initialized else "ContainersNotInitialized",
                   None if initialized else f"containers with incomplete status: [{' '.join(waiting)}]"),
        _condition("ContainersReady", all_ready, ready_reason, ready_message),
        _condition("Ready", all_ready, ready_reason, ready_message),
    ]  # fmt: skip
    status = {
        "phase": current,
        "hostIP": pod.host_ip,
        "hostIPs": [{"ip": pod.host_ip}],
        **({"podIP": pod.ip, "podIPs": [{"ip": pod.ip}]} if pod.ip else {}),
        "startTime": pod.start_time,
        "conditions": with_transition_times(conditions, (previous or {}).get("conditions", []), now),
        "containerStatuses": statuses,
    }
    if pod.init:
        status["initContainerStatuses"] = [container_status(c, "init") for c in pod.init]
    if pod.ephemeral:
        status["ephemeralContainerStatuses"] = [container_status(c, "ephemeral") for c in pod.ephemeral]
    return status
