"""The local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

``Sandbox(name).up()`` prepares the state folder (certificates, kubeconfigs,
ports), hands the component command lines to a detached supervisor (see
supervisor.py) and waits until the API server's ``/readyz`` and the other
components' ``/healthz`` answer. ``down()`` stops everything and checks that no
process and no listening port is left. The flags are those of a kubeadm cluster,
narrowed to loopback, so what the course says about a real control plane is true
of this one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from labkit.errors import LabkitError
from labkit.progress import Progress, format_duration
from labkit.sandbox import binaries, procs
from labkit.sandbox.binaries import Toolset
from labkit.kube.client import APPLY_PATCH, KubeAPI
from labkit.kube.errors import APIError
from labkit.sandbox.node import namespaces
from labkit.sandbox.pki import CLUSTER_DNS_IP, KUBERNETES_SERVICE_IP, SERVICE_CIDR
from labkit.sandbox.state import DEFAULT_NAME, SandboxState, port_lock, ports_of_others
from labkit.sandbox.versions import pins

CLUSTER_CIDR = "10.244.0.0/16"
PORT_RANGE = (20000, 32000)  # below Linux's ephemeral range, so outgoing connections never take them
READY_TIMEOUT = 120.0
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE_AGENT = "node-agent"
DEFAULT_NODES = 3  # one per zone
ADDONS = Path(__file__).parent / "addons"  # objects every sandbox has (server-side applied at each `up`)
ZONES = ("zone-a", "zone-b", "zone-c")
NODE_CAPACITY = {"cpu": "2", "memory": "4Gi", "pods": "110"}
# Which port each component serves its health on, and the path to ask.
HEALTH = {
    "etcd": ("etcd-client", "/health"),
    "kube-apiserver": ("apiserver", "/readyz"),
    "kube-controller-manager": ("controller-manager", "/healthz"),
    "kube-scheduler": ("scheduler", "/healthz"),
}
PORT_NAMES = ("etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler")


def kubelet_port_name(node: str) -> str:
    """The key of a node's kubelet API port in the sandbox's ports (one HTTPS server per node)."""
    return f"kubelet-{node}"


@dataclass
class ComponentStatus:
    name: str
    state: str
    pid: int | None
    port: int | None
    uptime: float | None
    restarts: int
    memory: int
    healthy: bool | None
    last_exit: str | None


class Sandbox:
    """A named local control plane."""

    def __init__(self, name: str = DEFAULT_NAME) -> None:
        self.state = SandboxState(name)
        self.name = self.state.name

    # ------------------------------------------------------------------------------------ up

    def up(
        self, *, say=print, wait: bool = True, timeout: float = READY_TIMEOUT, nodes: int | None = None,
        only: tuple[str, ...] | None = None,
    ) -> dict:
        """Start the sandbox (a no-op if it runs); returns its config.

        ``nodes`` sets how many nodes the node agent registers (kept for later `up`s);
        ``only`` starts a subset of the components (the benchmark's etcd + API server floor).
        """
        with self.state.operation():
            config = self.state.load()
            if self.state.supervisor_pid():
                if config is None:
                    raise LabkitError(f"Sandbox {self.name!r} has a running supervisor but no config.",
                                      hint=self.state.purge_hint())
                if wait:
                    self.wait_ready(config, timeout=timeout, only=only)
                say(f"Sandbox {self.name!r} is already running at {self.server(config)}.")
                if nodes is not None and nodes != config.get("nodes", DEFAULT_NODES):
                    say(f"It has {config.get('nodes', DEFAULT_NODES)} nodes; to have {nodes}, run "
                        f"`labkit sandbox down` and `labkit sandbox up --nodes {nodes}`.")
                return config
            self._sweep()  # leftovers of a supervisor that was killed
            toolset = binaries.ensure(say=say)
            started = time.monotonic()
            config = config or self.state.new_config()
            if nodes is not None:
                if not 0 <= nodes <= 20:
                    raise LabkitError(f"--nodes {nodes}: a sandbox has 0 to 20 nodes.")
                config["nodes"] = nodes
            config.setdefault("nodes", DEFAULT_NODES)
            previous = config.get("versions")
            config["versions"] = {g.name: g.version for g in pins().groups}
            if previous and previous != config["versions"]:
                say(f"Upgrading sandbox {self.name!r} from {previous} to {config['versions']}.")
            self.state.root.mkdir(parents=True, exist_ok=True)
            self.state.pki.ensure()
            for folder in (self.state.etc, self.state.logs, self.state.run, self.state.etcd_data):
                folder.mkdir(parents=True, exist_ok=True)
            self.state.ensure_pods()
            self.state.etcd_data.chmod(0o700)
            with port_lock():
                config["ports"] = self._choose_ports(config.get("ports", {}), self.port_names(config), say)
                self.state.save(config)
            self._write_kubeconfigs(config)
            self._write_node_config(config)
            only = only or self.component_names(config)
            (self.state.run / "components.json").write_text(json.dumps(
                [c for c in self._components(config, toolset) if c["name"] in only], indent=2
            ))
            self._start_supervisor()
            if wait:
                self.wait_ready(config, timeout=timeout, only=only)
                say(self._usage(config, time.monotonic() - started))
            return config

    def port_names(self, config: dict) -> tuple[str, ...]:
        """The ports this sandbox listens on: the control plane's, and each node's kubelet API."""
        return PORT_NAMES + tuple(kubelet_port_name(node) for node in self.node_names(config))

    def _choose_ports(self, previous: dict[str, int], names: tuple[str, ...], say) -> dict[str, int]:
        """Keep last time's ports where they are free (the kubeconfig stays valid); else pick new ones."""
        taken = ports_of_others(self.name)
        chosen: dict[str, int] = {}
        rng = random.Random()
        for key in names:
            port = previous.get(key)
            if port and port not in taken and port not in chosen.values() and procs.port_free(port):
                chosen[key] = port
                continue
            if port:
                say(f"Port {port} ({key}) is in use; sandbox {self.name!r} moves to another port.")
            for _ in range(1000):
                candidate = rng.randint(*PORT_RANGE)
                if candidate not in taken and candidate not in chosen.values() and procs.port_free(candidate):
                    chosen[key] = candidate
                    break
            else:
                raise LabkitError(f"No free local port found in {PORT_RANGE[0]}-{PORT_RANGE[1]}.")
        return chosen

    def server(self, config: dict) -> str:
        return f"https://127.0.0.1:{config['ports']['apiserver']}"

    def _write_kubeconfigs(self, config: dict) -> None:
        pki, server = self.state.pki, self.server(config)
        cluster = f"labkit-{self.name}"
        pki.write_kubeconfig(self.state.kubeconfig, cluster=cluster, server=server, user=f"{cluster}-admin", stem="admin")
        for component in ("controller-manager", "scheduler"):
            pki.write_kubeconfig(
                self.state.etc / f"{component}.kubeconfig",
                cluster=cluster, server=server, user=f"system:kube-{component}", stem=component,
            )  # fmt: skip

    def _write_egress_config(self) -> Path:
        path = self.state.etc / "egress-selector.yaml"
        path.write_text("apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n"
                        "- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n    transport:\n"
                        f"      uds:\n        udsName: {json.dumps(str(self.state.egress_socket))}\n")  # fmt: skip
        return path

    def _components(self, config: dict, tools: Toolset) -> list[dict]:
        """The four command lines, as a kubeadm control plane would run them, on loopback."""
        p = config["ports"]
        pki = self.state.pki
        etc = self.state.etc
        c = lambda stem: str(pki.cert(stem))  # noqa: E731
        k = lambda stem: str(pki.key(stem))  # noqa: E731
        etcd = [
            str(tools["etcd"]),
            f"--name={self.name}",
            f"--data-dir={self.state.etcd_data}",
            f"--listen-client-urls=https://127.0.0.1:{p['etcd-client']}",
            f"--advertise-client-urls=https://127.0.0.1:{p['etcd-client']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-cluster={self.name}=http://127.0.0.1:{p['etcd-peer']}",
            f"--cert-file={c('etcd/server')}",
            f"--key-file={k('etcd/server')}",
            f"--trusted-ca-file={c('etcd/ca')}",
            "--client-cert-auth=true",
            # A sandbox trades durability against power loss for speed: data written before a
            # process is killed still reaches the disk, since the page cache outlives the process.
            "--unsafe-no-fsync=true",
            "--snapshot-count=10000",
            "--log-level=warn",
        ]
        auth = lambda kubeconfig: [  # noqa: E731
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--client-ca-file={c('ca')}",
            f"--requestheader-client-ca-file={c('front-proxy-ca')}",
            "--bind-address=127.0.0.1",
        ]
        apiserver = [
            str(tools["kube-apiserver"]),
            "--bind-address=127.0.0.1",
            f"--secure-port={p['apiserver']}",
            f"--etcd-servers=https://127.0.0.1:{p['etcd-client']}",
            f"--etcd-cafile={c('etcd/ca')}",
            f"--etcd-certfile={c('apiserver-etcd-client')}",
            f"--etcd-keyfile={k('apiserver-etcd-client')}",
            f"--tls-cert-file={c('apiserver')}",
            f"--tls-private-key-file={k('apiserver')}",
            f"--client-ca-file={c('ca')}",
            f"--kubelet-client-certificate={c('apiserver-kubelet-client')}",
            f"--kubelet-client-key={k('apiserver-kubelet-client')}",
            # The API server checks each node's serving certificate when it calls its kubelet API
            # (`kubectl logs`), as it should on any cluster whose kubelets have CA-signed certificates.
            f"--kubelet-certificate-authority={c('ca')}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            f"--requestheader-client-ca-file={c('front-proxy-ca')}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-username-headers=X-Remote-User",
            f"--proxy-client-cert-file={c('front-proxy-client')}",
            f"--proxy-client-key-file={k('front-proxy-client')}",
            # What the API server opens to the cluster (kubelet APIs, pods/proxy, services/proxy, webhooks,
            # aggregated APIs) goes through the node agent, which dials pod and Service addresses inside the
            # pod network, as a konnectivity proxy does for a control plane outside its cluster's network.
            f"--egress-selector-config-file={self._write_egress_config()}",
            # The API server would publish its own address as the endpoint of the `kubernetes`
            # Service, but the API rejects loopback endpoints; sandbox networking owns this.
            "--endpoint-reconciler-type=none",
        ]
        controller_manager = [
            str(tools["kube-controller-manager"]),
            *auth(etc / "controller-manager.kubeconfig"),
            f"--secure-port={p['controller-manager']}",
            f"--tls-cert-file={c('controller-manager-serving')}",
            f"--tls-private-key-file={k('controller-manager-serving')}",
            f"--cluster-name=labkit-{self.name}",
            f"--cluster-signing-cert-file={c('ca')}",
            f"--cluster-signing-key-file={k('ca')}",
            f"--root-ca-file={c('ca')}",
            f"--service-account-private-key-file={pki.sa_key}",
            "--use-service-account-credentials=true",
            # Starting, it creates a ServiceAccount and token per controller; at the default 20
            # requests/s that alone takes seconds. A one-machine API server takes far more.
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--controllers=*,bootstrapsigner,tokencleaner",
            f"--flex-volume-plugin-dir={self.state.root / 'volume-plugins'}",
            "--allocate-node-cidrs=true",
            f"--cluster-cidr={CLUSTER_CIDR}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # One instance per component: a leader lease would only make a restarted
            # component wait for its previous self's lease to expire.
            "--leader-elect=false",
        ]
        scheduler = [
            str(tools["kube-scheduler"]),
            *auth(etc / "scheduler.kubeconfig"),
            f"--secure-port={p['scheduler']}",
            f"--tls-cert-file={c('scheduler-serving')}",
            f"--tls-private-key-file={k('scheduler-serving')}",
            "--leader-elect=false",
        ]
        argvs = {"etcd": etcd, "kube-apiserver": apiserver,
                 "kube-controller-manager": controller_manager, "kube-scheduler": scheduler}  # fmt: skip
        # The controllers start once the API server is ready: before that, the RBAC roles that
        # authorise them do not exist on a new cluster, and they would back off for seconds.
        readyz = {"after": f"https://127.0.0.1:{p['apiserver']}/readyz", "after_ca": c("ca")}
        argvs[NODE_AGENT] = namespaces.agent_argv(str(self.state.root))
        gated = {"kube-controller-manager", "kube-scheduler", NODE_AGENT}
        return [{"name": name, "argv": argvs[name], **(readyz if name in gated else {})}
                for name in self.component_names(config)]  # fmt: skip

    def component_names(self, config: dict) -> tuple[str, ...]:
        return COMPONENTS + ((NODE_AGENT,) if config.get("nodes") else ())

    def node_names(self, config: dict) -> list[str]:
        return [f"node-{i}" for i in range(1, config.get("nodes", 0) + 1)]

    def _write_node_config(self, config: dict) -> None:
        """What the node agent serves: each node's identity, zone, capacity and kubelet API port."""
        pki = self.state.pki
        nodes = []
        for index, node in enumerate(self.node_names(config)):
            client, serving = pki.ensure_node(node), pki.ensure_node_serving(node)
            nodes.append({"name": node, "zone": ZONES[index % len(ZONES)], **NODE_CAPACITY,
                          "cert": str(pki.cert(client)), "key": str(pki.key(client)),
                          "port": config["ports"][kubelet_port_name(node)],
                          "serving_cert": str(pki.cert(serving)), "serving_key": str(pki.key(serving))})  # fmt: skip
        markers = self.state.run / "nodes"
        markers.mkdir(parents=True, exist_ok=True)
        for marker in markers.glob("*.stopped"):  # a fresh start powers every node on
            marker.unlink()
        proxy, chaos = pki.ensure_proxy(), pki.ensure_chaos()
        (self.state.run / "nodes.json").write_text(json.dumps({
            "server": self.server(config), "ca": str(self.state.pki.cert("ca")),
            "version": pins().kubernetes.version, "nodes": nodes,
            "proxy": {"cert": str(pki.cert(proxy)), "key": str(pki.key(proxy))},
            "chaos": {"cert": str(pki.cert(chaos)), "key": str(pki.key(chaos))},
            "service_cidr": SERVICE_CIDR, "kubernetes_ip": KUBERNETES_SERVICE_IP, "dns_ip": CLUSTER_DNS_IP,
            "egress_socket": str(self.state.egress_socket),
        }, indent=2))  # fmt: skip

    def _start_supervisor(self) -> None:
        log = open(self.state.logs / "supervisor.log", "ab")
        subprocess.Popen(
            [sys.executable, "-m", "labkit.sandbox.supervisor", str(self.state.root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: it outlives this command, kernel or shell
            close_fds=True,
            cwd=self.state.root,
        )
        log.close()
        deadline = time.monotonic() + 10
        while not self.state.supervisor_pid():
            if time.monotonic() > deadline:
                raise LabkitError(
                    "The sandbox supervisor did not start.\n" + self._tail("supervisor"),
                    hint=f"See {self.state.logs / 'supervisor.log'}.",
                )
            time.sleep(0.02)

    # ------------------------------------------------------------------------------- readiness

    def _ssl_context(self, client: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.state.pki.cert("ca")))
        if client:
            context.load_cert_chain(str(self.state.pki.cert("admin")), str(self.state.pki.key("admin")))
        return context

    def _etcd_context(self) -> ssl.SSLContext:
        pki = self.state.pki
        context = ssl.create_default_context(cafile=str(pki.cert("etcd/ca")))
        context.load_cert_chain(str(pki.cert("apiserver-etcd-client")), str(pki.key("apiserver-etcd-client")))
        return context

    @staticmethod
    def _fetch(url: str, context: ssl.SSLContext, timeout: float) -> tuple[int, str]:
        """GET ``url``: (HTTP status, body), with status 0 when nothing answered."""
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            return 0, str(getattr(exc, "reason", exc))

    def check_health(self, component: str, config: dict, timeout: float = 2.0) -> tuple[bool, str]:
        """Ask one component's health endpoint; returns (healthy, what it said)."""
        port_key, path = HEALTH[component]
        url = f"https://127.0.0.1:{config['ports'][port_key]}{path}"
        context = self._etcd_context() if component == "etcd" else self._ssl_context(component == "kube-apiserver")
        status, body = self._fetch(url, context, timeout)
        return status == 200, body.strip()

    def api_get(self, config: dict, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET a path of this sandbox's API as its admin: (HTTP status, body); status 0 if unreachable."""
        return self._fetch(self.server(config) + path, self._ssl_context(True), timeout)

    def _controllers_working(self, config: dict) -> bool:
        """The controller-manager acts, not just answers: it has made `default`'s ServiceAccount,
        without which no Pod can be created in that namespace."""
        return self.api_get(config, "/api/v1/namespaces/default/serviceaccounts/default", timeout=1.0)[0] == 200

    def _ensure_addons(self, config: dict) -> None:
        """The add-ons a cluster has and the node agent serves: ``kube-dns`` in ``kube-system``, on the
        ClusterIP that pods' resolv.conf names (selector-less: the agent answers on it itself), and Chaos Mesh's
        experiment kinds with the RBAC of the agent's chaos controller."""
        pki = self.state.pki
        api = KubeAPI(self.server(config), pki.cert("ca"), pki.cert("admin"), pki.key("admin"))
        self._apply_addons(api)
        labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS", "kubernetes.io/cluster-service": "true"}
        body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
                                                                  "labels": labels},
                "spec": {"clusterIP": CLUSTER_DNS_IP, "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                                                {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}  # fmt: skip
        if api.get("/api/v1/namespaces/kube-system/services/kube-dns") is not None:
            return
        try:
            api.request("POST", "/api/v1/namespaces/kube-system/services", body)
        except APIError as exc:
            if exc.status != 409:  # made meanwhile
                raise LabkitError(f"The sandbox could not create the kube-dns Service: {exc}") from None

    def _apply_addons(self, api: KubeAPI) -> None:
        """Server-side apply of ``addons/*.yaml`` (made or brought up to date), then wait for the CRDs among them
        to be served, so an experiment created right after `up` is accepted."""
        crds = []
        for manifest in sorted(ADDONS.glob("*.yaml")):
            for obj in yaml.safe_load_all(manifest.read_text()):
                group, _, version = obj["apiVersion"].rpartition("/")
                plural = {"CustomResourceDefinition": "customresourcedefinitions", "ClusterRole": "clusterroles",
                          "ClusterRoleBinding": "clusterrolebindings"}[obj["kind"]]  # fmt: skip
                path = f"/apis/{group}/{version}/{plural}/{obj['metadata']['name']}"
                try:
                    api.request("PATCH", path, obj, content_type=APPLY_PATCH, query={"fieldManager": "labkit-sandbox",
                                                                                    "force": "true"})  # fmt: skip
                except APIError as exc:
                    raise LabkitError(f"The sandbox could not install {obj['kind']} {obj['metadata']['name']}: "
                                      f"{exc}") from None  # fmt: skip
                if obj["kind"] == "CustomResourceDefinition":
                    crds.append(path)
        deadline = time.monotonic() + 30
        for path in crds:
            while not any(c.get("type") == "Established" and c.get("status") == "True"
                          for c in ((api.get(path) or {}).get("status") or {}).get("conditions", [])):  # fmt: skip
                if time.monotonic() > deadline:
                    raise LabkitError(f"The sandbox's API server did not serve {path.rsplit('/', 1)[-1]} within 30 s.")
                time.sleep(0.05)

    def ready_nodes(self, config: dict) -> set[str]:
        """The sandbox's nodes whose Ready condition is True and that have their pod address range."""
        status, body = self.api_get(config, "/api/v1/nodes", timeout=2.0)
        if status != 200:
            return set()
        ready = set()
        for node in json.loads(body).get("items", []):
            for condition in node.get("status", {}).get("conditions", []):
                if condition["type"] == "Ready" and condition["status"] == "True" and node["spec"].get("podCIDR"):
                    ready.add(node["metadata"]["name"])
        return ready

    def _nodes_ready(self, config: dict) -> bool:
        return set(self.node_names(config)) <= self.ready_nodes(config)

    def wait_ready(self, config: dict, *, timeout: float = READY_TIMEOUT, only: tuple[str, ...] | None = None) -> float:
        """Wait until every component answers healthy and the controllers act.

        Fails early and clearly if a component keeps crashing, with the end of its log.
        """
        started = time.monotonic()
        only = only or self.component_names(config)
        pending = [c for c in (*COMPONENTS[1:], "etcd") if c in only]
        if "kube-controller-manager" in only:
            pending.append("controllers")
        if NODE_AGENT in only:
            pending.append("nodes")
        progress = Progress(f"starting sandbox {self.name!r}")
        try:
            self._wait_for(pending, config, progress, started, timeout)
        finally:
            progress.clear()
        return time.monotonic() - started

    def _wait_for(self, pending: list[str], config: dict, progress: Progress, started: float, timeout: float) -> None:
        while pending:
            progress.update(detail="waiting for " + ", ".join(pending))
            for check in list(pending):
                if check == "controllers":
                    ok = pending[0] == "controllers" and self._controllers_working(config)
                    if ok:
                        self._ensure_addons(config)
                elif check == "nodes":
                    ok = pending[0] == "nodes" and self._nodes_ready(config)
                else:
                    ok = self.check_health(check, config, timeout=1.0)[0]
                if ok:
                    pending.remove(check)
            if not pending:
                break
            if not self.state.supervisor_pid():
                raise LabkitError(
                    f"The sandbox supervisor stopped while {self.name!r} was starting.\n" + self._tail("supervisor"),
                    hint=self.state.purge_hint(),
                )
            crashing = self._crashing(pending)
            elapsed = time.monotonic() - started
            if crashing or elapsed > timeout:
                culprit = crashing or {"controllers": "kube-controller-manager", "nodes": NODE_AGENT}.get(
                    pending[0], pending[0]
                )
                what = "keeps exiting" if crashing else f"did not become ready within {timeout:.0f}s"
                raise LabkitError(
                    f"{culprit} {what}. The end of its log ({self.state.logs / (culprit + '.log')}):\n"
                    + self._tail(culprit),
                    hint="The sandbox is still running and retrying: see `labkit sandbox status` and "
                    f"`labkit sandbox logs {culprit}`. If its state is damaged: " + self.state.purge_hint(),
                )
            time.sleep(0.05)

    def _crashing(self, pending: list[str]) -> str | None:
        status = self.state.status() or {}
        for name, info in status.get("components", {}).items():
            if name in pending and info.get("restarts", 0) >= 3:
                return name
        return None

    def _tail(self, component: str, lines: int = 12) -> str:
        path = self.state.logs / f"{component}.log"
        try:
            text = path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return "    (no log)"
        return "\n".join("    " + line[:300] for line in text)

    def _usage(self, config: dict, seconds: float) -> str:
        flag = "" if self.name == DEFAULT_NAME else f" --name {self.name}"
        return (
            f"Sandbox {self.name!r} is up: Kubernetes {pins().kubernetes.version} control plane at "
            f"{self.server(config)} (ready in {format_duration(seconds)}).\n"
            f"  use it from this shell:  eval \"$(labkit sandbox env{flag})\"   then e.g.  kubectl get namespaces\n"
            f"  kubeconfig:              {self.state.kubeconfig}\n"
            f"  see it:                  labkit sandbox status{flag}   |   labkit sandbox logs kube-apiserver{flag}\n"
            f"  stop it (state is kept): labkit sandbox down{flag}"
        )

    # ------------------------------------------------------------------------------------ down

    def down(self, *, purge: bool = False, say=print) -> bool:
        """Stop the sandbox; True if something was running. ``purge`` also deletes its state."""
        with self.state.operation():
            running = bool(self.state.supervisor_pid())
            damage: LabkitError | None = None
            try:
                config = self.state.load()
            except LabkitError as exc:  # stop it all the same; report the damage afterwards
                config, damage = None, exc
            if running:
                self._stop_supervisor()
            leftovers = self._sweep()
            if config:
                self._wait_ports_closed(config)
            purged = purge and self.state.exists()
            if purged:
                self.state.remove()
            if damage is not None and not purge:
                if running or leftovers:
                    say(f"Sandbox {self.name!r} stopped.")
                raise damage
        if running or leftovers:
            say(f"Sandbox {self.name!r} stopped." + ("" if purge else " Its cluster state is kept for the next `up`."))
        elif config is None and not purged:
            say(f"There is no sandbox {self.name!r}; nothing to stop.")
        else:
            say(f"Sandbox {self.name!r} is not running.")
        if purged:
            say(f"Sandbox {self.name!r} purged: its state folder is deleted.")
        return running

    def _stop_supervisor(self) -> None:
        pid = self.state.supervisor_pid()
        if pid and pid > 0:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + 60
        while self.state.supervisor_pid():
            if time.monotonic() > deadline:
                pid = self.state.supervisor_pid()
                if pid and pid > 0:
                    os.kill(pid, signal.SIGKILL)  # its components die with it (PR_SET_PDEATHSIG)
                deadline = time.monotonic() + 10
            time.sleep(0.05)

    def _own_processes(self) -> list[int]:
        """Component processes of this sandbox still alive: our binaries, pointed at our folder."""
        folders = {str(binaries.bin_root().resolve())}
        found = []
        for pid in procs.all_pids():
            if pid == os.getpid():
                continue
            path = procs.exe(pid)
            if not path:
                continue
            args = procs.cmdline(pid)
            ours = (
                any(path.startswith(folder) for folder in folders)
                or Path(path).name in COMPONENTS
                or any(arg.startswith("labkit.sandbox.") for arg in args)  # supervisor, node agent
            )
            if ours and procs.mentions(args, self.state.root) and procs.alive(pid):
                found.append(pid)
        return found

    def _sweep(self) -> int:
        """Kill any process left behind (a supervisor that was SIGKILLed, say): components and pods."""
        pids = self._own_processes() + procs.running_in(self.state.pods)
        found = len(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if procs.alive(pid)]
            time.sleep(0.02)
        return found

    def _wait_ports_closed(self, config: dict) -> None:
        deadline = time.monotonic() + 10
        ports = list(config.get("ports", {}).values())
        while time.monotonic() < deadline:
            if not any(procs.listening(port) for port in ports):
                return
            time.sleep(0.05)
        busy = [port for port in ports if procs.listening(port)]
        raise LabkitError(f"Sandbox {self.name!r} stopped, but ports {busy} still accept connections.",
                          hint="Another program took them; `ss -ltnp` shows which.")

    # ----------------------------------------------------------------------------------- nodes

    def set_node_running(self, node: str, running: bool, *, say=print) -> None:
        """Stop a node as if its machine were lost (no heartbeats), or bring it back."""
        config = self.state.load()
        if config is None or not self.state.supervisor_pid():
            raise LabkitError(f"Sandbox {self.name!r} is not running.", hint="Start it with `labkit sandbox up`.")
        names = self.node_names(config)
        if node not in names:
            raise LabkitError(f"Sandbox {self.name!r} has no node {node!r}.",
                              hint="Its nodes: " + (", ".join(names) or "none (start it with --nodes N)") + ".")
        marker = self.state.run / "nodes" / f"{node}.stopped"
        if running:
            marker.unlink(missing_ok=True)
            say(f"Node {node} is starting; it reports Ready within seconds.")
        else:
            marker.touch()
            say(f"Node {node} stopped: no more heartbeats. The node lifecycle controller marks it NotReady "
                "after its grace period (50 s) and taints it; pods are evicted when their tolerations expire.")

    # ---------------------------------------------------------------------------------- status

    def components_status(self, config: dict) -> list[ComponentStatus]:
        status = self.state.status() or {}
        running = bool(self.state.supervisor_pid())
        result = []
        for name in self.component_names(config):
            info = status.get("components", {}).get(name, {}) if running else {}
            pid = info.get("pid")
            alive = procs.alive(pid)
            last = info.get("last_exit")
            last_text = None
            if last:
                how = f"signal {last['signal']}" if last.get("signal") else f"exit code {last.get('code')}"
                last_text = f"{how} at {time.strftime('%H:%M:%S', time.localtime(last['at']))}"
            port_key = HEALTH.get(name, (None, None))[0]
            result.append(
                ComponentStatus(
                    name=name,
                    state=("running" if alive else info.get("state", "stopped")) if running else "stopped",
                    pid=pid if alive else None,
                    port=config["ports"].get(port_key) if port_key else None,
                    uptime=time.time() - info["started_at"] if alive and info.get("started_at") else None,
                    restarts=info.get("restarts", 0),
                    memory=procs.rss_bytes(pid) if alive else 0,
                    healthy=self.check_health(name, config, timeout=1.0)[0] if alive and port_key else None,
                    last_exit=last_text,
                )
            )
        return result

    def status(self) -> dict:
        """Everything ``labkit sandbox status`` shows, as data."""
        config = self.state.load()
        if config is None:
            return {"name": self.name, "exists": False, "running": False}
        supervisor = self.state.supervisor_pid()
        run_status = self.state.status() or {}
        components = self.components_status(config)
        return {
            "name": self.name,
            "exists": True,
            "running": bool(supervisor),
            "supervisor_pid": supervisor,
            "uptime": time.time() - run_status["started_at"] if supervisor and run_status.get("started_at") else None,
            "server": self.server(config),
            "kubeconfig": str(self.state.kubeconfig),
            "state_dir": str(self.state.root),
            "versions": config.get("versions", {}),
            "ports": config["ports"],
            "memory": sum(c.memory for c in components),
            "components": [c.__dict__ for c in components],
            "network": self.network_record() if supervisor and config.get("nodes") else None,
        }

    def service_url(self, namespace: str, name: str, port: int | None = None) -> str:
        """A URL on this machine's loopback that leads to Service ``namespace/name`` (its ``port``, default the
        first): a forward the node agent keeps while the Service exists, like ``minikube service --url``."""
        config = self.state.load()
        if config is None or not self.state.supervisor_pid() or not config.get("nodes"):
            raise LabkitError(f"Sandbox {self.name!r} is not running with nodes.", hint="Start it with `labkit sandbox up`.")
        if port is None:
            status, body = self.api_get(config, f"/api/v1/namespaces/{namespace}/services/{name}")
            if status != 200:
                raise LabkitError(f"There is no Service {name} in namespace {namespace}.",
                                  hint="`kubectl get services -A` lists them.")  # fmt: skip
            ports = json.loads(body)["spec"].get("ports", [])
            if not ports:
                raise LabkitError(f"Service {namespace}/{name} has no ports.")
            port = ports[0]["port"]
        node = config["ports"][kubelet_port_name(self.node_names(config)[0])]
        status, body = self._fetch(f"https://127.0.0.1:{node}/labkit/forward/{namespace}/{name}/{port}",
                                   self._ssl_context(True), 10)  # fmt: skip
        if status != 200:
            raise LabkitError(f"Service {namespace}/{name} cannot be forwarded: {body.strip()}")
        return f"http://127.0.0.1:{json.loads(body)['port']}"

    def network_record(self) -> dict:
        """The pod network as the node agent recorded it at its start (run/network.json)."""
        try:
            return json.loads((self.state.run / "network.json").read_text())
        except (OSError, ValueError):
            return {"mode": "unknown", "problem": "the node agent has not said yet"}

    # ------------------------------------------------------------------------------ helpers

    def kubeconfig_text(self) -> str:
        if self.state.load() is None or not self.state.kubeconfig.exists():
            raise LabkitError(f"Sandbox {self.name!r} has not been created yet.", hint="Run `labkit sandbox up` first.")
        return self.state.kubeconfig.read_text()

    def env(self) -> dict[str, str]:
        """The environment that points plain `kubectl` at this sandbox."""
        if self.state.load() is None:
            raise LabkitError(f"Sandbox {self.name!r} has not been created yet.", hint="Run `labkit sandbox up` first.")
        kubectl_dir = binaries.toolset().kubectl_dir
        return {"KUBECONFIG": str(self.state.kubeconfig), "PATH": f"{kubectl_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def log_path(self, component: str) -> Path:
        names = (*COMPONENTS, NODE_AGENT, "supervisor")
        matches = [n for n in names if n == component] or [n for n in names if component in n]
        if len(matches) != 1:
            raise LabkitError(f"No component called {component!r}.", hint="Components: " + ", ".join(names) + ".")
        if self.state.load() is None:
            raise LabkitError(f"Sandbox {self.name!r} has not been created yet.", hint="Run `labkit sandbox up` first.")
        path = self.state.logs / f"{matches[0]}.log"
        if not path.exists():
            raise LabkitError(f"{matches[0]} has not written a log yet in sandbox {self.name!r}.")
        return path
