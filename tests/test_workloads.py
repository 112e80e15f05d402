"""Workloads on a three-node sandbox: Jobs, node loss, cordon and drain, judged as kubectl shows them.

The controllers at work are the real ones (job, deployment, node lifecycle, taint
eviction, disruption); the node agent runs the pods. Each test works in its own
namespace of one module-scoped sandbox.
"""

from __future__ import annotations

import re

from conftest import eventually, kubectl, kubectl_json, module_cluster, run_labkit

from labkit.sandbox.controlplane import Sandbox

cluster = module_cluster("workloads", nodes=3)


# ---------------------------------------------------------------------------------- helpers


def _apply(cluster: Sandbox, ns: str, manifest: str) -> None:
    kubectl(cluster, "-n", ns, "apply", "-f", "-", input=manifest)


def _pods(cluster: Sandbox, ns: str, selector: str) -> list[dict]:
    return kubectl_json(cluster, "-n", ns, "get", "pods", "-l", selector)["items"]


def _condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def _is_ready(pod: dict) -> bool:
    return _condition(pod, "Ready").get("status") == "True"


def _live(pods: list[dict]) -> list[dict]:
    """The pods not being deleted: what a controller counts as its replicas."""
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _node_ready(cluster: Sandbox, node: str) -> str:
    return _condition(kubectl_json(cluster, "get", "node", node), "Ready").get("status", "")


def _taints(cluster: Sandbox, node: str) -> set[tuple[str, str]]:
    return {(t["key"], t["effect"]) for t in kubectl_json(cluster, "get", "node", node)["spec"].get("taints", [])}


def _nodes_ready_untainted(cluster: Sandbox) -> bool:
    nodes = kubectl_json(cluster, "get", "nodes")["items"]
    return all(_condition(n, "Ready").get("status") == "True" and not n["spec"].get("taints")
               and not n["spec"].get("unschedulable") for n in nodes)  # fmt: skip


def _deployment(name: str, replicas: int, *, tolerate_seconds: int | None = None,
                node_selector: str | None = None) -> str:  # fmt: skip
    """A Deployment of busybox sleepers; optionally tolerating node loss only briefly."""
    tolerations = ""
    if tolerate_seconds is not None:
        tolerations = "      tolerations:\n" + "".join(
            f"      - {{key: node.kubernetes.io/{key}, operator: Exists, effect: NoExecute, "
            f"tolerationSeconds: {tolerate_seconds}}}\n"
            for key in ("unreachable", "not-ready")
        )
    selector = f"      nodeSelector: {{kubernetes.io/hostname: {node_selector}}}\n" if node_selector else ""
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 5
{tolerations}{selector}      containers:
      - name: app
        image: busybox
        command: [sleep, "3600"]
"""


def _job(name: str, script: str, **spec: int) -> str:
    """A Job whose pods run ``sh -c SCRIPT`` once (``restartPolicy: Never``)."""
    fields = "".join(f"  {key}: {value}\n" for key, value in spec.items())
    return f"""
apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
{fields}  template:
    spec:
      restartPolicy: Never
      containers:
      - name: work
        image: busybox
        command: [sh, -c, "{script}"]
"""


def _rolled_out(cluster: Sandbox, ns: str, name: str) -> None:
    kubectl(cluster, "-n", ns, "rollout", "status", f"deployment/{name}", "--timeout=90s")


# -------------------------------------------------------------------------------------- Jobs


def test_job_runs_to_completion(cluster: Sandbox, ns: str) -> None:
    _apply(cluster, ns, _job("batch", "echo done", completions=3, parallelism=2))
    waited = kubectl(cluster, "-n", ns, "wait", "--for=condition=complete", "job/batch", "--timeout=90s", check=False)
    assert waited.returncode == 0 and "condition met" in waited.stdout, waited.stderr
    job = kubectl_json(cluster, "-n", ns, "get", "job", "batch")
    assert _condition(job, "Complete")["status"] == "True"
    assert job["status"]["succeeded"] == 3 and not job["status"].get("failed")
    pods = _pods(cluster, ns, "batch.kubernetes.io/job-name=batch")
    assert len(pods) == 3 and {p["status"]["phase"] for p in pods} == {"Succeeded"}
    for pod in pods:
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert kubectl(cluster, "-n", ns, "logs", "-l", "batch.kubernetes.io/job-name=batch").stdout == "done\n" * 3
    described = kubectl(cluster, "-n", ns, "describe", "job", "batch").stdout
    assert re.search(r"Parallelism:\s+2\n", described) and re.search(r"Completions:\s+3\n", described)
    assert "0 Active (0 Ready) / 3 Succeeded / 0 Failed" in described


def test_failing_job_exceeds_its_backoff_limit(cluster: Sandbox, ns: str) -> None:
    _apply(cluster, ns, _job("doomed", "echo failing; exit 1", backoffLimit=1))
    # One failure is allowed, so the job controller makes a second pod (after its 10 s back-off).
    waited = kubectl(cluster, "-n", ns, "wait", "--for=condition=failed", "job/doomed", "--timeout=90s", check=False)
    assert waited.returncode == 0, waited.stderr
    job = kubectl_json(cluster, "-n", ns, "get", "job", "doomed")
    failed = _condition(job, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    assert job["status"]["failed"] == 2 and not job["status"].get("succeeded")
    pods = _pods(cluster, ns, "batch.kubernetes.io/job-name=doomed")
    assert len(pods) == 2 and {p["status"]["phase"] for p in pods} == {"Failed"}
    assert {p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in pods} == {1}
    described = kubectl(cluster, "-n", ns, "describe", "job", "doomed").stdout
    assert "BackoffLimitExceeded" in described and "Job has reached the specified backoff limit" in described


# -------------------------------------------------------------------------- cordon and drain


def test_cordon_keeps_new_pods_off_a_node(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "cordon", "node-3")
    try:
        node = kubectl_json(cluster, "get", "node", "node-3")
        assert node["spec"]["unschedulable"] is True
        assert "Ready,SchedulingDisabled" in kubectl(cluster, "get", "node", "node-3").stdout
        eventually(lambda: ("node.kubernetes.io/unschedulable", "NoSchedule") in _taints(cluster, "node-3"),
                   timeout=30, what="the unschedulable taint")  # fmt: skip
        _apply(cluster, ns, _deployment("spread", 4))
        _rolled_out(cluster, ns, "spread")
        placed = {p["spec"]["nodeName"] for p in _pods(cluster, ns, "app=spread")}
        assert placed and "node-3" not in placed
        # A pod that may only go to node-3 waits, and says why.
        _apply(cluster, ns, _deployment("pinned", 1, node_selector="node-3"))
        pending = eventually(lambda: (p := _pods(cluster, ns, "app=pinned")) and
                             _condition(p[0], "PodScheduled").get("reason") == "Unschedulable" and p[0],
                             timeout=30, what="the pinned pod to be Unschedulable")  # fmt: skip
        assert pending["status"]["phase"] == "Pending" and not pending["spec"].get("nodeName")
        assert "unschedulable" in _condition(pending, "PodScheduled")["message"]
    finally:
        kubectl(cluster, "uncordon", "node-3")
    assert not kubectl_json(cluster, "get", "node", "node-3")["spec"].get("unschedulable")
    _rolled_out(cluster, ns, "pinned")  # uncordoned, the waiting pod is scheduled there and runs
    (pod,) = _pods(cluster, ns, "app=pinned")
    assert pod["spec"]["nodeName"] == "node-3" and pod["status"]["phase"] == "Running"


def test_drain_respects_the_pod_disruption_budget(cluster: Sandbox, ns: str) -> None:
    _apply(cluster, ns, _deployment("guarded", 3))
    _apply(cluster, ns, """
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: guarded}
spec:
  minAvailable: 3
  selector: {matchLabels: {app: guarded}}
""")  # fmt: skip
    _rolled_out(cluster, ns, "guarded")

    def budget(allowed: int) -> bool:
        status = kubectl_json(cluster, "-n", ns, "get", "pdb", "guarded").get("status", {})
        return status.get("currentHealthy") == 3 and status.get("disruptionsAllowed") == allowed

    eventually(lambda: budget(0), timeout=30, what="the disruption controller to allow no disruption")
    node = _pods(cluster, ns, "app=guarded")[0]["spec"]["nodeName"]
    drain = ["drain", node, "--ignore-daemonsets", "--delete-emptydir-data"]
    try:
        blocked = kubectl(cluster, *drain, "--timeout=15s", check=False)
        assert blocked.returncode != 0, blocked.stdout
        output = blocked.stdout + blocked.stderr
        assert "Cannot evict pod as it would violate the pod's disruption budget" in output, output
        assert kubectl_json(cluster, "get", "node", node)["spec"]["unschedulable"] is True  # drain cordons first
        pods = _pods(cluster, ns, "app=guarded")
        assert len(_live(pods)) == 3 and node in {p["spec"]["nodeName"] for p in pods}  # nothing was evicted

        kubectl(cluster, "-n", ns, "patch", "pdb", "guarded", "--type=merge", "-p", '{"spec": {"minAvailable": 2}}')
        eventually(lambda: budget(1), timeout=30, what="the disruption controller to allow one disruption")
        # A node may hold two of the three pods; drain then evicts the second once the first's replacement is Ready.
        drained = kubectl(cluster, *drain, "--timeout=90s", check=False)
        assert drained.returncode == 0, drained.stderr
        assert f"node/{node} drained" in drained.stdout and "evicted" in drained.stdout
        eventually(lambda: len(pods := _pods(cluster, ns, "app=guarded")) == 3 and all(map(_is_ready, pods))
                   and node not in {p["spec"]["nodeName"] for p in pods},
                   timeout=60, what="three Ready pods on the other nodes")  # fmt: skip
    finally:
        kubectl(cluster, "uncordon", node)


# ---------------------------------------------------------------------------------- node loss


def test_pods_of_a_lost_node_are_replaced_elsewhere(cluster: Sandbox, ns: str) -> None:
    _apply(cluster, ns, _deployment("resilient", 3, tolerate_seconds=5))
    _rolled_out(cluster, ns, "resilient")
    pods = _pods(cluster, ns, "app=resilient")
    lost = pods[0]["spec"]["nodeName"]
    doomed = {p["metadata"]["name"] for p in pods if p["spec"]["nodeName"] == lost}
    stop = run_labkit("sandbox", "node", "stop", lost, "--name", cluster.name)
    assert stop.returncode == 0, stop.stderr
    try:
        # The node lifecycle controller notices the missing heartbeats after its grace period...
        eventually(lambda: _node_ready(cluster, lost) == "Unknown", timeout=120, what=f"{lost} to become NotReady")
        assert kubectl(cluster, "get", "node", lost, "--no-headers").stdout.split()[1] == "NotReady"
        # ...the taint eviction controller deletes the pods there once their 5 s toleration is over...
        evicted = eventually(
            lambda: (e := [p for p in _pods(cluster, ns, "app=resilient") if p["metadata"]["name"] in doomed])
            and all(p["metadata"].get("deletionTimestamp") for p in e) and e,
            timeout=60, what="the lost node's pods to be evicted",
        )  # fmt: skip
        for pod in evicted:
            assert _condition(pod, "DisruptionTarget").get("reason") == "DeletionByTaintManager"
        # ...and the ReplicaSet replaces them on the nodes that remain.
        replaced = eventually(
            lambda: len(live := _live(_pods(cluster, ns, "app=resilient"))) == 3 and all(map(_is_ready, live)) and live,
            timeout=60, what="three Ready replicas again",
        )  # fmt: skip
        assert lost not in {p["spec"]["nodeName"] for p in replaced}
        assert not doomed & {p["metadata"]["name"] for p in replaced}
        events = kubectl_json(cluster, "-n", ns, "get", "events", "--field-selector", "reason=TaintManagerEviction")
        assert {e["involvedObject"]["name"] for e in events["items"]} >= doomed
    finally:
        start = run_labkit("sandbox", "node", "start", lost, "--name", cluster.name)
        assert start.returncode == 0, start.stderr
    eventually(lambda: _nodes_ready_untainted(cluster), timeout=60, what=f"{lost} to be Ready again without taints")
    # Back, the node's agent finishes the deletion of the pods it held, as a returning kubelet does.
    eventually(lambda: not doomed & {p["metadata"]["name"] for p in _pods(cluster, ns, "app=resilient")},
               timeout=60, what="the evicted pods to be gone")  # fmt: skip
    deployment = kubectl_json(cluster, "-n", ns, "get", "deployment", "resilient")
    assert deployment["status"]["readyReplicas"] == 3 and deployment["status"]["availableReplicas"] == 3
