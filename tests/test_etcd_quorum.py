"""A three-member etcd cluster in the sandbox, as Lab 04 runs it, keeps Raft's promises under a partition.

etcd runs as a StatefulSet (the image catalog's etcd images run the sandbox's pinned
etcd), its members finding each other by their StatefulSet DNS names; the test talks
to each member over etcd's JSON gateway through a Service per member. A NetworkChaos
partition cuts the leader off from the two others: the majority elects a new leader
and accepts writes, the cut-off member refuses them (and linearizable reads) but
still serves stale serializable reads, and once the partition is deleted it has the
majority's writes and accepts writes again.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import eventually, module_cluster

import labkit
from labkit.lab import Lab
from labkit.sandbox.controlplane import Sandbox

cluster = module_cluster("etcd", nodes=3)

MEMBERS = ["etcd-0", "etcd-1", "etcd-2"]
PEERS = ",".join(f"{m}=http://{m}.etcd.$(NAMESPACE).svc.cluster.local:2380" for m in MEMBERS)
ETCD = f"""
apiVersion: v1
kind: Service
metadata: {{name: etcd}}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {{app: etcd}}
  ports: [{{name: client, port: 2379}}, {{name: peer, port: 2380}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: etcd}}
spec:
  serviceName: etcd
  replicas: 3
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: etcd}}}}
  template:
    metadata: {{labels: {{app: etcd}}}}
    spec:
      containers:
      - name: etcd
        image: registry.k8s.io/etcd:3.6.8-0
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        - name: NAMESPACE
          valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
        - {{name: ETCD_NAME, value: $(POD_NAME)}}
        - {{name: ETCD_DATA_DIR, value: /var/lib/etcd}}
        - {{name: ETCD_LISTEN_CLIENT_URLS, value: "http://0.0.0.0:2379"}}
        - {{name: ETCD_ADVERTISE_CLIENT_URLS, value: "http://$(POD_NAME).etcd.$(NAMESPACE).svc.cluster.local:2379"}}
        - {{name: ETCD_LISTEN_PEER_URLS, value: "http://0.0.0.0:2380"}}
        - {{name: ETCD_INITIAL_ADVERTISE_PEER_URLS, value: "http://$(POD_NAME).etcd.$(NAMESPACE).svc.cluster.local:2380"}}
        - {{name: ETCD_INITIAL_CLUSTER, value: "{PEERS}"}}
        - {{name: ETCD_INITIAL_CLUSTER_TOKEN, value: "etcd-$(NAMESPACE)"}}
        - {{name: ETCD_INITIAL_CLUSTER_STATE, value: new}}
        ports: [{{name: client, containerPort: 2379}}, {{name: peer, containerPort: 2380}}]
        readinessProbe:
          httpGet: {{path: /health, port: 2379}}
          periodSeconds: 1
        volumeMounts: [{{name: data, mountPath: /var/lib/etcd}}]
      volumes: [{{name: data, emptyDir: {{}}}}]
""" + "".join(f"""---
apiVersion: v1
kind: Service
metadata: {{name: {m}-client}}
spec:
  publishNotReadyAddresses: true
  selector: {{statefulset.kubernetes.io/pod-name: {m}}}
  ports: [{{port: 2379}}]
""" for m in MEMBERS)  # fmt: skip


class Refused(Exception):
    """etcd answered with an error, or not in time."""


class Etcd:
    """Each member's JSON gateway, through a Service of its own on this machine's loopback."""

    def __init__(self, lab: Lab) -> None:
        self.urls = {m: lab.service_url(f"{m}-client") for m in MEMBERS}
        self.names = {m["ID"]: m["name"] for m in self.call(MEMBERS[0], "/v3/cluster/member/list")["members"]}

    def call(self, member: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
        request = urllib.request.Request(self.urls[member] + path, data=json.dumps(body or {}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise Refused(f"{member}: HTTP {exc.code} {exc.read().decode(errors='replace')}") from None
        except OSError as exc:  # timed out, reset
            raise Refused(f"{member}: {exc}") from None

    def put(self, member: str, key: str, value: str, timeout: float = 30) -> dict:
        return self.call(member, "/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, timeout)

    def get(self, member: str, key: str, serializable: bool = False, timeout: float = 30) -> str | None:
        kvs = self.call(member, "/v3/kv/range", {"key": _b64(key), "serializable": serializable}, timeout).get("kvs", [])
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

    def status(self, member: str) -> tuple[str | None, int] | None:
        """(the leader ``member`` follows, its Raft term), or None if it does not answer."""
        try:
            answer = self.call(member, "/v3/maintenance/status", timeout=5)
        except Refused:
            return None
        return self.names.get(answer.get("leader", "0")), int(answer["raftTerm"])

    def accepts(self, member: str, key: str, value: str) -> bool:
        try:
            self.put(member, key, value)
            return True
        except Refused:
            return False


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def lab(cluster: Sandbox, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, tmp_path: Path) -> Lab:
    monkeypatch.setenv("KUBECONFIG", str(cluster.state.kubeconfig))
    monkeypatch.setenv("LABKIT_CLUSTER", "kubeconfig")
    monkeypatch.chdir(tmp_path)
    lab = labkit.start_lab(request.node.name.removeprefix("test_").replace("_", "-")[:30], fresh=True)
    yield lab
    lab.close(quiet=True)


def test_only_the_majority_accepts_writes_and_the_minority_catches_up(lab: Lab) -> None:
    lab.apply(ETCD)
    lab.wait_ready("statefulset/etcd", timeout=180)
    etcd = Etcd(lab)

    def agreed(members: list[str]) -> tuple[str, int] | None:
        views = {etcd.status(m) for m in members}
        view = views.pop() if len(views) == 1 else None
        return view if view and view[0] else None

    leader, term = eventually(lambda: agreed(MEMBERS), timeout=120, what="the three members agree on a leader")
    etcd.put(leader, "greeting", "before the partition")
    majority = [m for m in MEMBERS if m != leader]

    cut = [lab.chaos.partition(f"pod/{leader}", f"pod/{m}", direction="both").wait_injected() for m in majority]

    # The majority elects one of its own in a later term, and commits writes.
    new_leader, new_term = eventually(lambda: (v := agreed(majority)) and v[0] != leader and v, timeout=120,
                                      what="the majority electing a new leader")  # fmt: skip
    assert new_leader in majority and new_term > term
    eventually(lambda: etcd.accepts(majority[0], "greeting", "written by the majority"), timeout=120,
               what="the majority accepting a write")  # fmt: skip
    assert etcd.accepts(majority[1], "other", "written by the majority too")
    assert etcd.get(majority[1], "greeting") == "written by the majority"

    # The cut-off member refuses (or never answers) a write and a linearizable read; its own copy is stale.
    assert not etcd.accepts(leader, "greeting", "written by the minority")
    with pytest.raises(Refused):
        etcd.get(leader, "greeting")
    assert etcd.get(leader, "greeting", serializable=True) == "before the partition"
    assert etcd.get(majority[0], "greeting") == "written by the majority"  # the refused write never took effect

    for experiment in cut:
        experiment.delete()

    # Healed: the old leader follows the new one, has the majority's writes, and accepts writes again.
    def caught_up() -> bool:
        try:
            return (etcd.get(leader, "greeting", serializable=True, timeout=5) == "written by the majority"
                    and etcd.get(leader, "other", timeout=5) == "written by the majority too")  # fmt: skip
        except Refused:
            return False

    eventually(caught_up, timeout=120, what="the cut-off member catching up with the majority")
    eventually(lambda: etcd.accepts(leader, "greeting", "written after the partition"), timeout=120,
               what="the former minority accepting a write")  # fmt: skip
    assert all(etcd.get(m, "greeting") == "written after the partition" for m in MEMBERS)
    assert agreed(MEMBERS) is not None and agreed(MEMBERS)[1] >= new_term
