"""The node agent's nodes: registration, heartbeats and node loss, judged by the real control plane."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import eventually, kubectl, kubectl_json, run_labkit, sandbox_processes

from labkit.sandbox.controlplane import Sandbox


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def cluster(tools) -> Sandbox:  # noqa: ANN001
    sb = Sandbox("nodes")
    result = run_labkit("sandbox", "up", "--name", sb.name, "--nodes", "3")
    assert result.returncode == 0, result.stderr
    yield sb
    sb.down(purge=True, say=_quiet)


def _ready(node: dict) -> str:
    return next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready")


def _node_events(cluster: Sandbox, node: str) -> list[str]:
    events = kubectl_json(cluster, "get", "events", "-n", "default",
                          "--field-selector", f"involvedObject.kind=Node,involvedObject.name={node}")  # fmt: skip
    return [e["reason"] for e in events["items"]]


def test_nodes_register_ready_spread_over_zones(cluster: Sandbox) -> None:
    nodes = kubectl_json(cluster, "get", "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node-1", "node-2", "node-3"]
    assert {_ready(n) for n in nodes} == {"True"}  # `up` returned only once they were
    assert len({n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in nodes}) == 3
    for node in nodes:
        status = node["status"]
        assert status["nodeInfo"]["kubeletVersion"] == "v1.36.3"
        assert status["capacity"]["pods"] == "110" and status["allocatable"]["cpu"] == "2"
        assert {c["type"] for c in status["conditions"]} == {"Ready", "MemoryPressure", "DiskPressure", "PIDPressure"}
        assert {a["type"] for a in status["addresses"]} == {"InternalIP", "Hostname"}
        assert node["spec"].get("podCIDR")  # the controller-manager's IPAM gave it a range


def test_leases_are_renewed(cluster: Sandbox) -> None:
    lease = kubectl_json(cluster, "-n", "kube-node-lease", "get", "lease", "node-1")
    assert lease["spec"]["holderIdentity"] == "node-1" and lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"][0]["kind"] == "Node"
    first = lease["spec"]["renewTime"]
    eventually(
        lambda: kubectl_json(cluster, "-n", "kube-node-lease", "get", "lease", "node-1")["spec"]["renewTime"] != first,
        timeout=30, what="the lease to be renewed",
    )  # fmt: skip


def test_a_node_may_only_change_itself(cluster: Sandbox, tmp_path) -> None:  # noqa: ANN001
    """NodeRestriction judges the agent's nodes as it judges kubelets."""
    pki = cluster.state.pki
    as_node_1 = [
        f"--server={cluster.server(cluster.state.load())}",
        f"--certificate-authority={pki.cert('ca')}",
        f"--client-certificate={pki.cert('nodes/node-1')}",
        f"--client-key={pki.key('nodes/node-1')}",
    ]
    empty = tmp_path / "kubeconfig"
    empty.write_text("apiVersion: v1\nkind: Config\n")
    env = {"KUBECONFIG": str(empty)}
    own = kubectl(cluster, *as_node_1, "label", "node", "node-1", "example.com/own=yes", env=env, check=False)
    assert own.returncode == 0 and "labeled" in own.stdout, own.stderr
    other = kubectl(cluster, *as_node_1, "label", "node", "node-2", "example.com/other=yes", env=env, check=False)
    assert other.returncode != 0 and "forbidden" in other.stderr.lower(), other.stderr
    reserved = kubectl(cluster, *as_node_1, "label", "node", "node-1", "node-restriction.kubernetes.io/x=yes",
                       env=env, check=False)  # fmt: skip
    assert reserved.returncode != 0 and "is not allowed to modify labels" in reserved.stderr
    assert "example.com/other" not in kubectl_json(cluster, "get", "node", "node-2")["metadata"]["labels"]


def test_killed_agent_is_restarted_and_nodes_stay_ready(cluster: Sandbox) -> None:
    agent = cluster.state.status()["components"]["node-agent"]
    os.kill(agent["pid"], signal.SIGKILL)
    eventually(lambda: (a := cluster.state.status()["components"]["node-agent"])["pid"] not in (None, agent["pid"])
               and a["restarts"] == agent["restarts"] + 1, timeout=30, what="the agent to restart")  # fmt: skip
    time.sleep(1)
    assert {_ready(n) for n in kubectl_json(cluster, "get", "nodes")["items"]} == {"True"}


def test_node_stop_makes_the_control_plane_mark_it_unreachable(cluster: Sandbox) -> None:
    before = _node_events(cluster, "node-2")
    stop = run_labkit("sandbox", "node", "stop", "node-2", "--name", cluster.name)
    assert stop.returncode == 0 and "no more heartbeats" in stop.stderr
    # The real node lifecycle controller: after its 50 s grace period, Ready is Unknown and the
    # node carries the unreachable taints that drive evictions.
    node = eventually(
        lambda: (n := kubectl_json(cluster, "get", "node", "node-2")) and _ready(n) == "Unknown" and n,
        timeout=120, what="node-2 to become NotReady",
    )  # fmt: skip
    assert next(c for c in node["status"]["conditions"] if c["type"] == "Ready")["reason"] == "NodeStatusUnknown"
    unreachable = {("node.kubernetes.io/unreachable", "NoExecute"), ("node.kubernetes.io/unreachable", "NoSchedule")}
    eventually(  # the two taints come from two controller loops, moments apart
        lambda: unreachable <= {(t["key"], t["effect"])
                                for t in kubectl_json(cluster, "get", "node", "node-2")["spec"].get("taints", [])},
        timeout=30, what="the unreachable taints",
    )  # fmt: skip
    assert _ready(kubectl_json(cluster, "get", "node", "node-1")) == "True"  # the others carry on

    start = run_labkit("sandbox", "node", "start", "node-2", "--name", cluster.name)
    assert start.returncode == 0
    eventually(
        lambda: (n := kubectl_json(cluster, "get", "node", "node-2")) and _ready(n) == "True"
        and not n["spec"].get("taints"),
        timeout=60, what="node-2 to be Ready without taints",
    )  # fmt: skip
    after = _node_events(cluster, "node-2")
    assert "NodeNotReady" in after  # the controller's
    assert after.count("Starting") == before.count("Starting") + 1  # the agent's, as a kubelet starting
    assert after.count("NodeReady") == before.count("NodeReady") + 1
    described = kubectl(cluster, "describe", "node", "node-2").stdout
    assert "Starting kubelet." in described and "status is now: NodeReady" in described


def test_cordon_marks_a_node_unschedulable(cluster: Sandbox) -> None:
    kubectl(cluster, "cordon", "node-3")
    try:
        assert kubectl_json(cluster, "get", "node", "node-3")["spec"]["unschedulable"] is True
    finally:
        kubectl(cluster, "uncordon", "node-3")


def test_unknown_node_gives_a_clear_message(cluster: Sandbox) -> None:
    result = run_labkit("sandbox", "node", "stop", "node-9", "--name", cluster.name)
    assert result.returncode == 1
    assert "has no node 'node-9'" in result.stderr and "node-1, node-2, node-3" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_lists_the_agent(cluster: Sandbox) -> None:
    text = run_labkit("sandbox", "status", "--name", cluster.name).stdout
    assert "node-agent" in text


def test_down_stops_the_agent_too(cluster: Sandbox) -> None:  # runs last: it stops the module's sandbox
    assert len(sandbox_processes(cluster)) == 6  # supervisor, four components, node agent
    cluster.down(say=_quiet)
    assert sandbox_processes(cluster) == []
