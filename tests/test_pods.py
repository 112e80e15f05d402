"""Pods run by the node agent as local processes, with status as the API documents it."""

from __future__ import annotations

import os
import signal

from conftest import eventually, kubectl, kubectl_json, module_cluster, run_labkit

from labkit.sandbox import procs
from labkit.sandbox.controlplane import Sandbox


def _quiet(_: str) -> None:
    pass


cluster = module_cluster("pods", nodes=2)


def _pod(cluster: Sandbox, ns: str, name: str) -> dict:
    return kubectl_json(cluster, "-n", ns, "get", "pod", name)


def _container(pod: dict) -> dict:
    return pod["status"].get("containerStatuses", [{}])[0]


def test_deployment_runs_as_processes_and_scales(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "create", "deployment", "web", "--image=python:3.12", "--replicas=3", "--",
            "python", "-c", "import time; print('serving', flush=True); time.sleep(3600)")  # fmt: skip
    kubectl(cluster, "-n", ns, "rollout", "status", "deployment/web", "--timeout=60s")
    pods = kubectl_json(cluster, "-n", ns, "get", "pods")["items"]
    assert len(pods) == 3 and {p["status"]["phase"] for p in pods} == {"Running"}
    for pod in pods:
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == ready["ContainersReady"] == ready["PodScheduled"] == "True"
        assert "running" in _container(pod)["state"]
    assert len(procs.running_in(cluster.state.root / "pods")) >= 3
    kubectl(cluster, "-n", ns, "scale", "deployment/web", "--replicas=1")
    eventually(lambda: len(kubectl_json(cluster, "-n", ns, "get", "pods")["items"]) == 1, what="scale down to 1")


def test_a_catalog_app_becomes_ready_behind_its_probe_and_scales(cluster: Sandbox, ns: str) -> None:
    # Three replicas of the course's web app, all on port 8080: each pod has its own network namespace.
    manifest = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: labkit/web:2.0
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /readyz, port: 8080}, periodSeconds: 1}
"""
    kubectl(cluster, "-n", ns, "apply", "-f", "-", input=manifest)
    kubectl(cluster, "-n", ns, "rollout", "status", "deployment/web", "--timeout=90s")
    pods = kubectl_json(cluster, "-n", ns, "get", "pods")["items"]
    assert len(pods) == 3 and all(_container(p)["ready"] and _container(p)["restartCount"] == 0 for p in pods)
    assert {_container(p)["imageID"] for p in pods} == {"labkit.local/labkit/web@2.0"}
    kubectl(cluster, "-n", ns, "scale", "deployment/web", "--replicas=1")
    eventually(lambda: len(kubectl_json(cluster, "-n", ns, "get", "pods")["items"]) == 1, what="scale down to 1")
    kubectl(cluster, "-n", ns, "rollout", "status", "deployment/web", "--timeout=60s")


def test_a_finished_pod_is_completed(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "once", "--image=busybox", "--restart=Never", "--",
            "sh", "-c", "echo hello; exit 0")  # fmt: skip
    pod = eventually(lambda: (p := _pod(cluster, ns, "once"))["status"].get("phase") == "Succeeded" and p,
                     what="the pod to succeed")  # fmt: skip
    terminated = _container(pod)["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"


def test_a_crashing_container_backs_off(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "crash", "--image=alpine", "--", "sh", "-c", "echo boom; exit 3")
    messages = set()

    def waiting() -> dict:
        p = _pod(cluster, ns, "crash")
        messages.add(_container(p).get("state", {}).get("waiting", {}).get("message", "").split(" restarting")[0])
        return p

    # The kubelet's back-off: the first restart at once, then 10 s, then 20 s ...
    pod = eventually(lambda: (p := waiting()) and _container(p).get("restartCount", 0) >= 2
                     and _container(p)["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"
                     and "back-off 20s" in messages and p, timeout=60, what="a back-off of 20 s")  # fmt: skip
    assert "back-off 10s" in messages and "back-off 0s" not in messages
    last = _container(pod)["lastState"]["terminated"]
    assert last["exitCode"] == 3 and last["reason"] == "Error"
    assert pod["status"]["phase"] == "Running"
    reasons = [e["reason"] for e in kubectl_json(cluster, "-n", ns, "get", "events")["items"]]
    assert "BackOff" in reasons and "Started" in reasons


def test_an_unknown_image_fails_to_pull(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "nope", "--image=example.com/no/such:1")
    reasons = set()
    eventually(lambda: reasons.add(_container(_pod(cluster, ns, "nope")).get("state", {}).get("waiting", {})
                                   .get("reason")) or {"ErrImagePull", "ImagePullBackOff"} <= reasons,
               timeout=60, what="ErrImagePull then ImagePullBackOff")  # fmt: skip
    failed = [e for e in kubectl_json(cluster, "-n", ns, "get", "events")["items"] if e["reason"] == "Failed"]
    assert "no such image" in failed[0]["message"]


def test_deleting_a_pod_stops_its_processes(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "sleeper", "--image=busybox", "--", "sleep", "3600")
    eventually(lambda: _pod(cluster, ns, "sleeper")["status"].get("phase") == "Running", what="Running")
    uid = _pod(cluster, ns, "sleeper")["metadata"]["uid"]
    folder = next((cluster.state.root / "pods").glob(f"*/{ns}_sleeper_{uid}"))
    assert procs.running_in(folder)
    kubectl(cluster, "-n", ns, "delete", "pod", "sleeper", "--timeout=60s")
    assert procs.running_in(folder) == []


def test_stopped_node_kills_its_pods(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "pinned", "--image=busybox", "--overrides",
            '{"spec": {"nodeName": "node-1"}}', "--", "sleep", "3600")  # fmt: skip
    eventually(lambda: _pod(cluster, ns, "pinned")["status"].get("phase") == "Running", what="Running")
    folder = next((cluster.state.root / "pods" / "node-1").glob(f"{ns}_pinned_*"))
    assert run_labkit("sandbox", "node", "stop", "node-1", "--name", cluster.name).returncode == 0
    try:
        eventually(lambda: procs.running_in(folder) == [], timeout=10, what="the node's processes to die")
    finally:
        run_labkit("sandbox", "node", "start", "node-1", "--name", cluster.name)
    eventually(lambda: _pod(cluster, ns, "pinned")["status"].get("phase") == "Running" and procs.running_in(folder),
               timeout=30, what="the pod to run again on the returned node")  # fmt: skip


def test_a_killed_agent_leaves_no_container_behind_and_runs_its_pods_again(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "survivor", "--image=busybox", "--", "sleep", "3600")
    eventually(lambda: _pod(cluster, ns, "survivor")["status"].get("phase") == "Running", what="Running")
    folder = next((cluster.state.root / "pods").glob(f"*/{ns}_survivor_*"))
    before = set(procs.running_in(folder))
    assert before
    agent = cluster.state.status()["components"]["node-agent"]
    os.kill(agent["pid"], signal.SIGKILL)
    # The containers die with the agent; the restarted agent runs the pod again in fresh processes.
    eventually(lambda: (now := set(procs.running_in(folder))) and not now & before, timeout=60,
               what="the pod's processes to be replaced")  # fmt: skip
    eventually(lambda: _container(_pod(cluster, ns, "survivor")).get("state", {}).get("running"), what="Running")


def test_what_the_agent_cannot_honour_is_said_in_an_event(cluster: Sandbox, ns: str) -> None:
    manifest = """
apiVersion: v1
kind: Pod
metadata: {name: probed}
spec:
  containers:
  - name: app
    image: busybox
    command: [sleep, "3600"]
    readinessProbe: {grpc: {port: 9090}}
"""
    kubectl(cluster, "-n", ns, "apply", "-f", "-", input=manifest)
    warning = eventually(lambda: [e for e in kubectl_json(cluster, "-n", ns, "get", "events")["items"]
                                  if e["reason"] == "Unsupported"], what="an Unsupported warning")  # fmt: skip
    assert warning[0]["type"] == "Warning" and "grpc readiness probe (container app)" in warning[0]["message"]


def test_down_leaves_no_pod_process(cluster: Sandbox, ns: str) -> None:  # last: stops the module's sandbox
    kubectl(cluster, "-n", ns, "run", "last", "--image=busybox", "--", "sleep", "3600")
    eventually(lambda: _pod(cluster, ns, "last")["status"].get("phase") == "Running", what="Running")
    cluster.down(say=_quiet)
    assert procs.running_in(cluster.state.root / "pods") == []
