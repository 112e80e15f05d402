"""When an object is ready, as ``kubectl rollout status`` and ``kubectl wait`` judge it, and why not.

``progress`` reads one object: whether it is there yet, a short summary for a
status line, and a failure when it will not get there by itself (a Deployment
past its progress deadline, a failed Job or Pod). ``pod_problems`` explains
pods that are not ready in the words ``kubectl describe`` would use, so a
trainee who waited in vain learns why.
"""

from __future__ import annotations

from dataclasses import dataclass

# Waiting reasons that mean a container will not start until someone changes something.
STUCK = {"ErrImagePull", "ImagePullBackOff", "CrashLoopBackOff", "CreateContainerConfigError", "InvalidImageName",
         "CreateContainerError", "RunContainerError"}  # fmt: skip


@dataclass
class Progress:
    done: bool
    summary: str
    failure: str | None = None  # set when it will not get there without a change


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) or [] if c.get("type") == kind), {})


def progress(kind: str, obj: dict) -> Progress:
    """How far ``obj`` (of ``kind``: Deployment, Pod, ...) is from ready."""
    spec, status = obj.get("spec", {}), obj.get("status", {}) or {}
    current = status.get("observedGeneration", 0) >= obj["metadata"].get("generation", 0)
    if kind == "Deployment":
        want = spec.get("replicas", 1)
        updated, ready = status.get("updatedReplicas", 0), status.get("readyReplicas", 0)
        available, total = status.get("availableReplicas", 0), status.get("replicas", 0)
        summary = f"{ready}/{want} ready, {updated} up to date" + (f", {total - updated} old" if total > updated else "")
        stalled = condition(obj, "Progressing")
        if current and stalled.get("reason") == "ProgressDeadlineExceeded":
            return Progress(False, summary, f"the rollout is stuck (ProgressDeadlineExceeded): {stalled.get('message', '')}")
        done = current and updated >= want and total == updated and available >= want
        return Progress(done, summary)
    if kind in ("StatefulSet", "ReplicaSet"):
        want = spec.get("replicas", 1)
        ready = status.get("readyReplicas", 0)
        updated = status.get("updatedReplicas", ready) if kind == "StatefulSet" else ready
        same = status.get("currentRevision") == status.get("updateRevision") if kind == "StatefulSet" else True
        return Progress(current and ready >= want and updated >= want and same, f"{ready}/{want} ready")
    if kind == "DaemonSet":
        want = status.get("desiredNumberScheduled", 0)
        ready, updated = status.get("numberReady", 0), status.get("updatedNumberScheduled", 0)
        return Progress(current and ready >= want and updated >= want, f"{ready}/{want} ready")
    if kind == "Pod":
        phase = status.get("phase", "Pending")
        if phase == "Failed":
            return Progress(False, "Failed", f"the pod failed: {status.get('reason') or pod_problem(obj) or 'see its events'}")
        if phase == "Succeeded":
            return Progress(True, "Succeeded")
        ready = condition(obj, "Ready").get("status") == "True"
        return Progress(ready, "Ready" if ready else (pod_problem(obj) or phase))
    if kind == "Job":
        if condition(obj, "Failed").get("status") == "True":
            return Progress(False, "failed", f"the job failed: {condition(obj, 'Failed').get('message', '')}")
        done = condition(obj, "Complete").get("status") == "True"
        return Progress(done, "complete" if done else f"{status.get('succeeded', 0)} succeeded, {status.get('active', 0)} running")
    return Progress(True, "exists")


def pod_problem(pod: dict) -> str | None:
    """Why one pod is not ready, in kubectl's words (a waiting reason and its message), or None."""
    status = pod.get("status", {}) or {}
    if status.get("phase") == "Pending" and condition(pod, "PodScheduled").get("status") == "False":
        return f"not scheduled: {condition(pod, 'PodScheduled').get('message', '')}".strip()
    for c in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
        waiting = c.get("state", {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            message = waiting.get("message", "")
            return f"container {c['name']}: {waiting['reason']}" + (f" ({message})" if message else "")
        terminated = c.get("state", {}).get("terminated")
        if terminated and terminated.get("exitCode"):
            return f"container {c['name']} exited with code {terminated['exitCode']} ({terminated.get('reason', '')})"
    for c in status.get("containerStatuses", []):
        if c.get("state", {}).get("running") and not c.get("ready"):
            return f"container {c['name']} is running but not ready (its readiness probe fails)"
    return None


def stuck(pod: dict) -> bool:
    """Whether a pod waits on something that will not change by itself (a bad image, a crash loop)."""
    statuses = [*pod.get("status", {}).get("initContainerStatuses", []), *pod.get("status", {}).get("containerStatuses", [])]
    return any(c.get("state", {}).get("waiting", {}).get("reason") in STUCK for c in statuses)


def selector_of(obj: dict) -> str | None:
    """A workload's pod selector as a label-selector string (matchLabels only), or None."""
    labels = (obj.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or None


def status_word(pod: dict) -> str:
    """The STATUS column of ``kubectl get pods``: Running, ContainerCreating, CrashLoopBackOff, Init:0/1,
    Completed, Terminating..."""
    status = pod.get("status", {}) or {}
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    word = status.get("reason") or status.get("phase", "Pending")
    inits = status.get("initContainerStatuses", [])
    for i, c in enumerate(inits):
        state = c.get("state", {})
        if "terminated" in state and state["terminated"].get("exitCode") == 0:
            continue
        if "terminated" in state:
            return f"Init:{state['terminated'].get('reason') or 'Error'}"
        if state.get("waiting", {}).get("reason") not in (None, "PodInitializing"):
            return f"Init:{state['waiting']['reason']}"
        return f"Init:{i}/{len(inits)}"
    for c in reversed(status.get("containerStatuses", [])):
        state = c.get("state", {})
        if state.get("waiting", {}).get("reason"):
            word = state["waiting"]["reason"]
        elif state.get("terminated"):
            word = state["terminated"].get("reason") or f"ExitCode:{state['terminated'].get('exitCode')}"
    return word
