"""Chaos experiments in the sandbox, as Chaos Mesh's objects, through the notebook API.

Each kind must measurably change what the pods do and be undone when it ends; recovery
times are recorded for a killed pod and a lost node; bad experiments say why.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import eventually, kubectl_json, module_cluster

import labkit
from labkit.errors import LabkitError
from labkit.lab import Lab
from labkit.sandbox.controlplane import Sandbox
from labkit.sandbox.node.chaos import Invalid, pick, shaping, stressors

cluster = module_cluster("chaos", nodes=3)

WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: REPLICAS
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      containers:
      - name: web
        image: labkit/web:1.0
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /readyz, port: 8080}, periodSeconds: 1}
        resources: {limits: {memory: 160Mi}}
"""


@pytest.fixture
def lab(cluster: Sandbox, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, tmp_path: Path) -> Lab:
    monkeypatch.setenv("KUBECONFIG", str(cluster.state.kubeconfig))
    monkeypatch.setenv("LABKIT_CLUSTER", "kubeconfig")
    monkeypatch.chdir(tmp_path)  # where the lab's results file goes
    lab = labkit.start_lab(request.node.name.removeprefix("test_").replace("_", "-")[:30], fresh=True)
    yield lab
    lab.close(quiet=True)


def deploy(lab: Lab, replicas: int) -> list[dict]:
    lab.apply(WEB.replace("REPLICAS", str(replicas)))
    lab.wait_ready("deployment/web")
    return lab.pods("app=web")


def container(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]


def ready(pod: dict) -> bool:
    return bool(pod.get("status", {}).get("containerStatuses")) and container(pod)["ready"]


def reasons(lab: Lab, name: str) -> list[str]:
    return [e["reason"] for e in lab.event_list() if e["involvedObject"].get("name") == name]


def test_a_killed_pod_is_replaced_and_the_recovery_is_recorded(lab: Lab) -> None:
    before = {p["metadata"]["name"] for p in deploy(lab, 3)}
    with lab.measure("a web pod is killed", "deployment/web") as record:
        kill = lab.chaos.pod_kill("deployment/web").wait_injected()
    assert kill.conditions()["Selected"] and kill.conditions()["AllInjected"]
    [victim] = [r["id"].split("/")[1] for r in kill.records()]
    assert victim in before and kill.records()[0]["phase"] == "Injected"
    assert record.ttd is not None and record.ttr is not None and 0 <= record.ttd <= record.ttr
    assert record.acted is None  # injecting the fault is not the trainee's action
    now = {p["metadata"]["name"] for p in lab.pods("app=web") if ready(p)}
    assert victim not in now and len(now) == 3
    assert "Applied" in reasons(lab, kill.name)
    saved = json.loads(Path("labkit-results.json").read_text())["runs"][lab.run_id]
    assert saved["lab"] == lab.id and saved["recoveries"][0]["ttr"] == record.ttr


def test_pod_failure_serves_nothing_until_its_duration_ends(lab: Lab) -> None:
    [pod] = deploy(lab, 1)
    failure = lab.chaos.pod_failure("deployment/web", duration="4s").wait_injected()
    name = pod["metadata"]["name"]

    def failing() -> bool:
        now = lab.get(f"pod/{name}")
        return "pause" in now["spec"]["containers"][0]["image"] and not ready(now)

    eventually(failing, timeout=20, what="the pod runs the pause image and is not ready")
    failure.wait_recovered(timeout=30)
    back = eventually(lambda: (p := lab.get(f"pod/{name}")) and ready(p) and p, timeout=30, what="the pod ready again")
    assert back["spec"]["containers"][0]["image"] == "labkit/web:1.0"
    assert container(back)["restartCount"] >= 2  # into the pause image, then back
    assert {"TimeUp", "Recovered"} <= set(reasons(lab, failure.name))
    assert failure.phase == "Stop" and failure.conditions()["AllRecovered"]


def test_container_kill_restarts_the_container(lab: Lab) -> None:
    [pod] = deploy(lab, 1)
    kill = lab.chaos.container_kill("deployment/web", "web").wait_injected()
    assert kill.records()[0]["id"].endswith(f"{pod['metadata']['name']}/web")
    restarted = eventually(lambda: (p := lab.get(f"pod/{pod['metadata']['name']}")) and container(p)["restartCount"] == 1
                           and p, what="a restart")  # fmt: skip
    assert container(restarted)["lastState"]["terminated"]["exitCode"] == 137


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _round_trip(url: str, times: int = 5) -> float:
    samples = []
    for _ in range(times):
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
        samples.append(time.monotonic() - started)
    return sorted(samples)[len(samples) // 2]


def test_a_delay_slows_a_pod_until_the_experiment_is_deleted(lab: Lab) -> None:
    deploy(lab, 1)
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}")
    url = lab.service_url("web") + "/version"
    eventually(lambda: _answers(url), what="the Service to have its endpoint")
    before = _round_trip(url)
    delay = lab.chaos.delay("deployment/web", "200ms").wait_injected()
    assert _round_trip(url) >= before + 0.18
    delay.delete()
    eventually(lambda: _round_trip(url, 3) < before + 0.1, timeout=20, what="the delay gone")


# Tries each server (SERVERS: their addresses, comma-separated) every 0.3 s and prints "ok" or "fail" for each.
CLIENT = """
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  containers:
  - name: client
    image: python:3.12
    command:
    - python3
    - -u
    - -c
    - |
      import socket, time
      def attempt(address):
          try:
              socket.create_connection((address, 8080), timeout=0.5).close()
              return "ok"
          except OSError:
              return "fail"
      while True:
          print(" ".join(attempt(a) for a in "SERVERS".split(",")))
          time.sleep(0.3)
"""


def _last_try(lab: Lab) -> str:
    lines = lab.kubectl("logs client --tail=1", show=False).strip().splitlines()
    return lines[-1] if lines else ""


def test_a_partition_cuts_pods_apart_and_heals_when_it_ends(lab: Lab) -> None:
    [server] = deploy(lab, 1)
    lab.apply(CLIENT.replace("SERVERS", server["status"]["podIP"]))
    lab.wait_ready("pod/client")
    eventually(lambda: _last_try(lab) == "ok", what="the client reaching the server")
    cut = lab.chaos.partition("pod/client", "deployment/web", duration="6s").wait_injected()
    eventually(lambda: _last_try(lab) == "fail", timeout=20, what="the partition to cut the client off")
    cut.wait_recovered(timeout=30)
    eventually(lambda: _last_try(lab) == "ok", timeout=20, what="the partition to heal")


def test_a_partition_takes_lists_of_pods_on_either_side(lab: Lab) -> None:
    servers = deploy(lab, 3)
    lab.apply(CLIENT.replace("SERVERS", ",".join(p["status"]["podIP"] for p in servers)))
    lab.wait_ready("pod/client")
    eventually(lambda: _last_try(lab) == "ok ok ok", what="the client reaching the three servers")
    cut_off = [f"pod/{p['metadata']['name']}" for p in servers[:2]]
    cut = lab.chaos.partition("pod/client", cut_off, duration="30s").wait_injected()
    assert cut.object()["spec"]["target"]["selector"] == {"pods": {lab.namespace: sorted(c[4:] for c in cut_off)}}
    eventually(lambda: _last_try(lab) == "fail fail ok", timeout=20, what="the client cut from the two listed pods only")
    cut.delete()
    eventually(lambda: _last_try(lab) == "ok ok ok", timeout=20, what="the partition to heal")


def _cpu_seconds(lab: Lab, pod: dict) -> float:
    # The node's kubelet API, straight: the API server's node proxy refuses the nodes' loopback addresses. A new
    # container has figures once it has been sampled (within a second), as on a kubelet.
    node = lab.cluster.get(f"/api/v1/nodes/{pod['spec']['nodeName']}")

    def figure() -> float | None:
        text = lab._reach.agent("GET", "/metrics/resource", node=node).text
        for line in text.splitlines():
            if line.startswith("container_cpu_usage_seconds_total") and f'pod="{pod["metadata"]["name"]}"' in line:
                return float(line.split()[1])
        return None

    found = eventually(lambda: (lambda value: value is not None and (value,))(figure()), timeout=5,
                       what=f"a CPU figure for {pod['metadata']['name']} in the node's /metrics/resource")  # fmt: skip
    return found[0]


def test_stress_burns_cpu_and_memory_past_a_limit(lab: Lab) -> None:
    [pod] = deploy(lab, 1)
    name = pod["metadata"]["name"]
    before = _cpu_seconds(lab, pod)
    time.sleep(2)
    idle = _cpu_seconds(lab, pod) - before
    burn = lab.chaos.stress_cpu("deployment/web", load=100, duration="30s").wait_injected()
    time.sleep(1)
    start = _cpu_seconds(lab, pod)
    time.sleep(2)
    assert _cpu_seconds(lab, pod) - start >= idle + 0.3
    burn.delete()
    lab.chaos.stress_memory("deployment/web", "300MB", duration="30s").wait_injected()
    killed = eventually(lambda: (p := lab.get(f"pod/{name}")) and container(p).get("lastState", {}).get("terminated")
                        and p, timeout=30, what="the OOM kill")  # fmt: skip
    assert container(killed)["lastState"]["terminated"]["reason"] == "OOMKilled"


def test_bad_experiments_say_why_and_overlaps_are_refused(lab: Lab) -> None:
    deploy(lab, 1)
    with pytest.raises(LabkitError, match="no pod is selected"):
        lab.chaos.pod_kill("app=nothing-here").wait_injected()
    bad = lab.chaos.apply({"apiVersion": "chaos-mesh.org/v1alpha1", "kind": "PodChaos", "metadata": {"name": "odd"},
                           "spec": {"action": "pod-explode", "selector": {"labelSelectors": {"app": "web"}}}})  # fmt: skip
    with pytest.raises(LabkitError, match="action must be one of pod-kill"):
        bad.wait_injected()
    with pytest.raises(LabkitError, match="not a duration"):
        lab.chaos.pod_failure("deployment/web", duration="soon").wait_injected()
    first = lab.chaos.delay("deployment/web", "50ms").wait_injected()
    with pytest.raises(LabkitError, match=f"already under NetworkChaos {lab.namespace}/{first.name}"):
        lab.chaos.loss("deployment/web", 50).wait_injected()
    with pytest.raises(LabkitError, match="not a chaos experiment"):
        lab.chaos.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    assert [e["reason"] for e in lab.event_list() if e["reason"] == "Failed"]


def test_closing_the_lab_mid_experiment_removes_its_faults(cluster: Sandbox, lab: Lab) -> None:
    addresses = {p["status"]["podIP"] for p in deploy(lab, 2)}
    lab.chaos.delay("deployment/web", "100ms").wait_injected()
    lab.chaos.stress_cpu("deployment/web", load=50, duration="5m").wait_injected()
    agent = lab._reach.sandbox_node()

    def ours() -> list[dict]:  # other tests' labs may still be closing
        return [f for f in lab._reach.agent("GET", "/labkit/faults", node=agent).json() if set(f["sources"]) & addresses]

    assert len(ours()) == 2
    namespace = lab.namespace
    lab.close(quiet=True)
    gone = lambda: namespace not in {n["metadata"]["name"] for n in kubectl_json(cluster, "get", "namespaces")["items"]}  # noqa: E731
    eventually(gone, timeout=60, what="the namespace, its experiments' finalizers released")
    assert ours() == []


@pytest.mark.slow
def test_a_lost_node_is_recovered_and_recorded(lab: Lab) -> None:
    deploy(lab, 3)
    with lab.measure("a node is lost", "deployment/web", within=180) as record:
        node = lab.lose_node()
    try:
        assert record.ttd is not None and record.ttr is not None
        serving = [p for p in lab.pods("app=web") if not p["metadata"].get("deletionTimestamp")
                   and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        assert len(serving) == 3 and all(p["spec"]["nodeName"] != node for p in serving)
    finally:
        lab.restore_node(node)


def test_selection_modes_and_specs() -> None:
    pods = [{"metadata": {"name": str(i)}} for i in range(10)]
    assert len(pick(pods, "one", None)) == 1 and len(pick(pods, "all", None)) == 10
    assert len(pick(pods, "fixed", "3")) == 3 and len(pick(pods, "fixed-percent", "25")) == 2
    assert 1 <= len(pick(pods, "random-max-percent", "50")) <= 5
    assert len(pick(pods[:2], "fixed-percent", "10")) == 1  # at least one
    with pytest.raises(Invalid):
        pick(pods, "fixed-percent", "150")
    assert shaping("delay", {"delay": {"latency": "1m30s", "jitter": "5ms"}}) == {"delay_ms": 90000.0, "jitter_ms": 5.0}
    assert shaping("bandwidth", {"bandwidth": {"rate": "1mbps"}}) == {"rate_bps": 8e6}
    with pytest.raises(Invalid, match="loss.loss"):
        shaping("loss", {})
    assert [c[-2:] for c in stressors({"cpu": {"workers": 2, "load": 40}, "memory": {"size": "64MiB"}})] == \
        [["cpu", "40"], ["cpu", "40"], ["memory", str(64 * 2**20)]]
    with pytest.raises(Invalid):
        stressors({})


def test_nodes_a_killed_kernel_stopped_come_back_with_the_next_lab(cluster: Sandbox, lab: Lab,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    deploy(lab, 1)
    node = lab.lose_node("node-2")
    marker = cluster.state.run / "nodes" / f"{node}.stopped"
    assert marker.exists()
    # The kernel dies without closing the lab: its namespace says who made it and which node it stopped.
    namespace = lab.cluster.get(f"/api/v1/namespaces/{lab.namespace}")
    assert namespace["metadata"]["annotations"]["labkit.io/lost-nodes"] == node
    owner = namespace["metadata"]["annotations"]["labkit.io/owner"]
    host, _, start = owner.split(":")
    dead = {"metadata": {"annotations": {"labkit.io/owner": f"{host}:999999:{start}"}}}
    lab.cluster.request("PATCH", f"/api/v1/namespaces/{lab.namespace}", dead, content_type="application/merge-patch+json")
    lab.closed = True  # as if its kernel were gone
    after = labkit.start_lab("after-a-killed-kernel", fresh=True)
    try:
        assert not marker.exists(), "the node the dead kernel stopped is still stopped"
    finally:
        after.close(quiet=True)
