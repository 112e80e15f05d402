"""The node agent: labkit's kubelet for the sandbox's nodes.

One agent process serves all the sandbox's nodes; for each node it does what a
kubelet's node-status and lease machinery does:

* registers the Node (capacity, allocatable, labels with a zone, addresses,
  kubelet version, conditions) with the node's own credentials
  (``system:node:NAME``), so the Node authorizer and NodeRestriction judge it as
  they judge a kubelet;
* renews the node's Lease in ``kube-node-lease`` every 10 s (a 40 s lease, the
  kubelet's defaults), which is the heartbeat the node lifecycle controller
  watches;
* posts the node's status when it changes, and at least every minute.

A node is *stopped* (``labkit sandbox node stop NODE``) by a marker file in
``run/nodes/``: its heartbeats stop, as when a machine is lost, and the real
node lifecycle controller marks it NotReady, taints it and evicts its pods.
Removing the marker (``node start``) brings it back. The pods bound to each node
run as local processes (pods.py), and each node serves the kubelet API that
`kubectl logs` goes through (server.py) on its own port, published in its status;
a stopped node's API is closed, as a lost machine answers nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

from labkit.sandbox import procs
from labkit.kube.client import STRATEGIC_MERGE_PATCH, KubeAPI
from labkit.kube.errors import APIError
from labkit.kube.events import api_micro_time, api_time, kubelet_event
from labkit.sandbox.node import logs, namespaces, usage
from labkit.sandbox.node.chaos import ChaosController
from labkit.sandbox.node.dns import ClusterDNS
from labkit.sandbox.node.faults import Faults
from labkit.sandbox.node.forward import ClusterEgress, Forwards
from labkit.sandbox.node.network import Networking, PodNetwork
from labkit.sandbox.node.services import ServiceProxy
from labkit.sandbox.node.podsource import PodSource
from labkit.sandbox.node.server import NodeServer

LEASE_SECONDS = 40  # kubelet's nodeLeaseDurationSeconds
RENEW_EVERY = 10.0  # a quarter of the lease, as the kubelet renews it
STATUS_EVERY = 60.0  # the kubelet reports unchanged status every nodeStatusReportFrequency (5 min); we are chattier
LEASE_NAMESPACE = "kube-node-lease"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class NodeSpec:
    """What the agent is told about one node (run/nodes.json, written by `labkit sandbox up`)."""

    name: str
    zone: str
    cpu: str
    memory: str
    pods: str
    cert: str
    key: str
    port: int = 0  # the kubelet API's port (0: none)
    serving_cert: str = ""
    serving_key: str = ""


class NodeHeartbeat(threading.Thread):
    """Registration, lease renewal and status of one node."""

    def __init__(self, spec: NodeSpec, server: str, ca: Path, version: str, run_dir: Path,
                 stopping: threading.Event, networking: Networking | None = None,
                 monitor: usage.Monitor | None = None, capture: logs.Capture | None = None) -> None:  # fmt: skip
        super().__init__(name=f"node-{spec.name}", daemon=True)
        self.spec = spec
        self.api = KubeAPI(server, ca, Path(spec.cert), Path(spec.key))
        self.version = version
        self.marker = run_dir / "nodes" / f"{spec.name}.stopped"
        self.stopping = stopping
        self.ready_since: dt.datetime | None = None
        self.last_status = 0.0
        self.uid: str | None = None
        self.pods = PodSource(spec.name, self.api, run_dir.parent / "pods" / spec.name, stopping, _log,
                              allocatable={"cpu": spec.cpu, "memory": spec.memory}, networking=networking,
                              monitor=monitor, capture=capture)  # fmt: skip
        self.kubelet_api = NodeServer(spec.name, spec.port, Path(spec.serving_cert), Path(spec.serving_key), ca,
                                      self.pods.current, _log, networking, self.api) if spec.port else None  # fmt: skip

    # -- the node object ---------------------------------------------------------------------

    def _conditions(self, now: dt.datetime) -> list[dict]:
        assert self.ready_since is not None
        since = api_time(self.ready_since)

        def condition(kind: str, status: str, reason: str, message: str) -> dict:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": api_time(now), "lastTransitionTime": since}  # fmt: skip

        return [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ]

    def _status(self, now: dt.datetime) -> dict:
        resources = {"cpu": self.spec.cpu, "memory": self.spec.memory, "pods": self.spec.pods,
                     "ephemeral-storage": "20Gi"}  # fmt: skip
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": self._conditions(now),
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.spec.name}],  # fmt: skip
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.spec.port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.spec.name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, self.spec.name)),
                "bootID": str(uuid.uuid4()),
                "kernelVersion": platform.release(),
                "osImage": "labkit sandbox node",
                "containerRuntimeVersion": "labkit://processes",
                "kubeletVersion": self.version,
                "operatingSystem": "linux",
                "architecture": arch,
            },
        }

    def register(self) -> None:
        now = _now()
        self.ready_since = now
        node = self.api.get(f"/api/v1/nodes/{self.spec.name}")
        if node is None:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.spec.name,
                    "labels": {
                        "kubernetes.io/hostname": self.spec.name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": self._status(now)["nodeInfo"]["architecture"],
                        "topology.kubernetes.io/zone": self.spec.zone,
                        "node.kubernetes.io/instance-type": "labkit-sandbox",
                    },
                    "annotations": {"volumes.kubernetes.io/controller-managed-attach-detach": "true"},
                },
                "spec": {},
                "status": self._status(now),
            }
            node = self.api.request("POST", "/api/v1/nodes", body)
        self.uid = node["metadata"]["uid"]
        self.event("Starting", "Starting kubelet.")
        self.post_status()
        self.event("NodeReady", f"Node {self.spec.name} status is now: NodeReady")

    def event(self, reason: str, message: str, kind: str = "Normal") -> None:
        """An Event about this node, as the kubelet reports one (`kubectl describe node` shows it)."""
        # The kubelet refers to its Node by name, using the name as the UID too.
        involved = {"apiVersion": "v1", "kind": "Node", "name": self.spec.name, "uid": self.spec.name}
        self.api.request("POST", "/api/v1/namespaces/default/events",
                         kubelet_event(involved, reason, message, kind=kind, node=self.spec.name))

    def post_status(self) -> None:
        self.api.request("PATCH", f"/api/v1/nodes/{self.spec.name}/status", {"status": self._status(_now())},
                         content_type=STRATEGIC_MERGE_PATCH)  # fmt: skip
        self.last_status = time.monotonic()

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.spec.name}"
        spec = {"holderIdentity": self.spec.name, "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": api_micro_time()}  # fmt: skip
        lease = self.api.get(path)
        if lease is None:
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.spec.name, "uid": self.uid}
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.spec.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                    "spec": spec}  # fmt: skip
            self.api.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", body)
        else:
            lease["spec"].update(spec)
            self.api.request("PUT", path, lease)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        registered = False
        next_beat = 0.0
        while not self.stopping.is_set():
            if self.marker.exists():  # the machine is "lost": no heartbeats, its processes die
                registered = False
                if not self.pods.paused.is_set():
                    self.pods.lose()
                self.serve(False)
                self.stopping.wait(0.5)
                continue
            now = time.monotonic()
            if now >= next_beat:
                try:
                    self.serve(True)
                    if not registered:
                        self.register()
                        registered = True
                        _log(f"node {self.spec.name} registered and ready")
                        if not self.pods.is_alive():
                            self.pods.start()
                        elif self.pods.paused.is_set():
                            self.pods.resume()
                    self.renew_lease()
                    if time.monotonic() - self.last_status >= STATUS_EVERY:
                        self.post_status()
                    next_beat = now + RENEW_EVERY
                except (APIError, OSError) as exc:
                    _log(f"node {self.spec.name}: {exc}; retrying")
                    next_beat = now + 1.0
            self.stopping.wait(0.5)

    def serve(self, on: bool) -> None:
        """Open (retried at each heartbeat while the port is taken) or close the node's kubelet API."""
        if self.kubelet_api is None or self.kubelet_api.running == on:
            return
        if not on:
            self.kubelet_api.stop()
            return
        try:
            self.kubelet_api.start()
        except OSError as exc:
            _log(f"node {self.spec.name}: its kubelet API cannot listen on 127.0.0.1:{self.spec.port} ({exc}); "
                 "`kubectl logs` of its pods fails until it can")  # fmt: skip


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m labkit.sandbox.node.agent STATE_DIR", file=sys.stderr)
        return 2
    root = Path(sys.argv[1])
    config = json.loads((root / "run" / "nodes.json").read_text())
    # Processes a previous agent left behind (it was killed with SIGKILL) are cleaned up:
    # their pods get fresh containers, as after a kubelet restart with a wiped runtime.
    _kill_leftovers(root)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    networking = start_network(config, stopping)
    _record_network(root / "run" / "network.json", networking)
    monitor = usage.Monitor.start_new()  # CPU and memory of every container, for all the nodes
    capture = logs.Capture.start_new()  # every container's output, into its log
    threads = [
        NodeHeartbeat(NodeSpec(**node), config["server"], Path(config["ca"]), config["version"], root / "run", stopping,
                      networking, monitor, capture)  # fmt: skip
        for node in config["nodes"]
    ]
    if config.get("egress_socket"):
        servers = {t.spec.port: t.kubelet_api for t in threads if t.kubelet_api is not None}

        def local(port: int):  # noqa: ANN202 - the kubelet API that takes a connection to this port, while it serves
            server = servers.get(port)
            return server.adopt if server is not None and server.running else None

        ClusterEgress(Path(config["egress_socket"]), networking.network.pid if networking else None, _log, local).start()
    for thread in threads:
        thread.start()
    if "chaos" in config:  # Chaos Mesh's experiments, carried out on these nodes
        api = KubeAPI(config["server"], Path(config["ca"]), Path(config["chaos"]["cert"]), Path(config["chaos"]["key"]))
        ChaosController(api, lambda: {w.pod["metadata"]["uid"]: w for t in threads for w in t.pods.current()},
                        networking.faults if networking is not None else None, _log, stopping).start()  # fmt: skip
    _log(f"node agent serving {', '.join(t.spec.name for t in threads)}")
    while not stopping.is_set():
        stopping.wait(1.0)
    _log("node agent stopping")
    for thread in threads:
        thread.join(2)  # its heartbeat ends (it waits 0.5 s at a time): nothing reopens the kubelet API
        thread.serve(False)
    workers = [worker for thread in threads for worker in thread.pods.current()]
    for thread in threads:
        thread.pods.stop_all()
    for worker in workers:
        worker.finished.wait(10)
    if networking is not None:
        networking.network.stop()
    _kill_leftovers(root)
    return 0


def start_network(config: dict, stopping: threading.Event) -> Networking | None:
    """The pod network all the agent's nodes share, with its Services, DNS and forwards; None (said in the
    log) where pods cannot have one."""
    global NETWORK_PROBLEM
    if not namespaces.available():
        NETWORK_PROBLEM = "this machine refuses the node agent Linux namespaces, so pods share its network"
        _log(f"no pod network: {NETWORK_PROBLEM}")
        return None
    network = PodNetwork(_log)
    if not network.start():
        NETWORK_PROBLEM = f"{network.problem}; pods share the machine's network"
        _log(f"no pod network: {NETWORK_PROBLEM}")
        return None
    kubernetes_ip, dns_ip = config["kubernetes_ip"], config["dns_ip"]
    network.add_services(config["service_cidr"], kubernetes_ip, dns_ip)
    api = KubeAPI(config["server"], Path(config["ca"]), Path(config["proxy"]["cert"]), Path(config["proxy"]["key"]))
    proxy = ServiceProxy(api, network, config["service_cidr"], {kubernetes_ip, dns_ip}, _log, stopping)
    proxy.start()
    ClusterDNS(proxy, dns_ip, network.pid, _log).start()
    server = urllib.parse.urlsplit(config["server"])
    forwards = Forwards(proxy, network.pid, (server.hostname or "127.0.0.1", server.port or 443), kubernetes_ip, _log)
    mode = "root" if _real_root() else "rootless"
    _log(f"pod network ready ({mode}, held by process {network.pid}); Services, DNS on {dns_ip}")
    return Networking(network, proxy, forwards, Faults(network, _log), dns_ip, mode)


NETWORK_PROBLEM = ""  # why there is no pod network, for `labkit sandbox status`


def _record_network(path: Path, networking: Networking | None) -> None:
    """What `labkit sandbox status` says of the pod network."""
    if networking is None:
        record = {"mode": "none", "problem": NETWORK_PROBLEM}
    else:
        record = {"mode": networking.mode, "dns": networking.dns_ip, "pod_network_pid": networking.network.pid}
    path.write_text(json.dumps(record))


def _real_root() -> bool:
    """Whether the agent is this machine's root, rather than root in a user namespace of its own."""
    try:
        with open("/proc/self/uid_map") as handle:
            return handle.read().split()[:3] == ["0", "0", "4294967295"]
    except OSError:
        return False


def _kill_leftovers(root: Path) -> None:
    for pid in procs.running_in(root / "pods"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
