"""Services on the pod network: labkit's kube-proxy, in nftables, and what pods learn of Services.

``ServiceProxy`` lists and watches Services and EndpointSlices with kube-proxy's
own identity (``system:kube-proxy``, which the default RBAC policy lets read
them) and, on every change, writes the pod network's ``labkit`` nftables table
whole, as kube-proxy's nftables mode does:

* a ClusterIP's port leads to one of the Service's **ready** endpoints, chosen
  at random per connection (``numgen random``), by DNAT; a pod that reaches
  itself through its own Service is masqueraded, so the reply comes back;
* a NodePort answers on every node's address on the pod network;
* a Service with no ready endpoint, or a ClusterIP's port the Service does not
  have, refuses the connection at once (TCP reset), as kube-proxy makes it;
* the ``kubernetes`` Service (the API server) and ``kube-dns`` are served by the
  agent itself on their ClusterIPs (``forward.py``, ``dns.py``).

It also gives a container the environment variables the kubelet writes for the
Services of its namespace, and the DNS server its view of Services and endpoints.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from labkit.kube.client import KubeAPI
from labkit.kube.watch import ListWatch

MASQUERADE_MARK = 0x4000
TABLE = "labkit"
SYNC_DELAY = 0.02  # changes that arrive together are written together


@dataclass
class Endpoint:
    ip: str
    ready: bool
    hostname: str = ""
    pod: str = ""  # the pod's name, for headless Services' records


@dataclass
class ServiceView:
    """What the proxy and DNS need of one Service."""

    namespace: str
    name: str
    cluster_ip: str  # "" or "None" for a headless Service
    ports: list[dict]
    type: str
    endpoints: dict[str, list[tuple[Endpoint, int, str]]] = field(default_factory=dict)  # port name -> (ep, port, proto)
    publish_not_ready: bool = False

    @property
    def headless(self) -> bool:
        return self.cluster_ip in ("", "None")


class ServiceProxy:
    """Keeps the pod network's Service rules (and a view of Services for env vars and DNS) current."""

    def __init__(self, api: KubeAPI, network, service_cidr: str, local_ips: set[str], log: Callable[[str], None],
                 stopping: threading.Event) -> None:  # noqa: ANN001 - a PodNetwork
        self.api = api
        self.network = network
        self.service_cidr = service_cidr
        self.local_ips = local_ips  # addresses the agent serves itself on the pod network (kubernetes, kube-dns)
        self.log = log
        self.stopping = stopping
        self.lock = threading.Lock()
        self.services: dict[tuple[str, str], dict] = {}
        self.slices: dict[tuple[str, str], dict] = {}  # (namespace, slice name) -> EndpointSlice
        self.synced = {"services": threading.Event(), "endpointslices": threading.Event()}
        self.dirty = threading.Event()
        self.listeners: list[Callable[[], None]] = []  # told after each change (the forwards)
        self.last_rules = ""

    def start(self) -> None:
        for kind, path in (("services", "/api/v1/services"), ("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices")):
            threading.Thread(target=self._follow, args=(kind, path), name=f"proxy-{kind}", daemon=True).start()
        threading.Thread(target=self._sync_loop, name="proxy-sync", daemon=True).start()

    def wait_synced(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(event.wait(max(0.0, deadline - time.monotonic())) for event in self.synced.values())

    # -- keeping the lists ------------------------------------------------------------------

    def _follow(self, kind: str, path: str) -> None:
        store = self.services if kind == "services" else self.slices
        for change, found in ListWatch(self.api, path, watch_seconds=300, stop=self.stopping.is_set,
                                       wait=self.stopping.wait, log=lambda m: self.log(f"service proxy: {m}")):  # fmt: skip
            with self.lock:
                if change == "LISTED":
                    store.clear()
                    store.update({_key(item): item for item in found})
                elif change == "DELETED":
                    store.pop(_key(found), None)
                else:
                    store[_key(found)] = found
            if change == "LISTED":
                self.synced[kind].set()
            self.dirty.set()

    def _sync_loop(self) -> None:
        while not self.stopping.is_set():
            if not self.dirty.wait(1.0):
                continue
            time.sleep(SYNC_DELAY)
            self.dirty.clear()
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - a bad Service must not stop the proxy
                self.log(f"service proxy: could not write the rules: {exc}")
                self.dirty.set()
                self.stopping.wait(1.0)
            for listener in list(self.listeners):
                listener()

    # -- views ------------------------------------------------------------------------------

    def views(self, namespace: str | None = None) -> list[ServiceView]:
        with self.lock:
            services = [s for s in self.services.values() if namespace is None or s["metadata"]["namespace"] == namespace]
            slices = list(self.slices.values())
        by_service: dict[tuple[str, str], list[dict]] = {}
        for item in slices:
            owner = item["metadata"].get("labels", {}).get("kubernetes.io/service-name")
            if owner:
                by_service.setdefault((item["metadata"]["namespace"], owner), []).append(item)
        return [_view(svc, by_service.get(_key(svc), [])) for svc in services]

    def view(self, namespace: str, name: str) -> ServiceView | None:
        with self.lock:
            svc = self.services.get((namespace, name))
        if svc is None:
            return None
        return next((v for v in self.views(namespace) if v.name == name), None)

    # -- the rules --------------------------------------------------------------------------

    def rules(self) -> str:
        """The whole ``labkit`` table for the Services as they are now."""
        chains: list[str] = []
        dispatch: list[str] = []
        node_ports: list[str] = []
        refuse: list[str] = []
        for view in sorted(self.views(), key=lambda v: (v.namespace, v.name)):
            if view.headless or view.cluster_ip in self.local_ips:
                continue
            for port in view.ports:
                proto = port.get("protocol", "TCP").lower()
                if proto not in ("tcp", "udp"):
                    continue
                chain = _chain("svc", view.namespace, view.name, port.get("name", ""), proto)
                ready = [(ep, number) for ep, number, p in view.endpoints.get(port.get("name", ""), [])
                         if p.lower() == proto and (ep.ready or view.publish_not_ready)]  # fmt: skip
                match = f"{proto} dport {port['port']}"
                if not ready:
                    refuse.append(f"ip daddr {view.cluster_ip} {match} reject with tcp reset" if proto == "tcp"
                                  else f"ip daddr {view.cluster_ip} {match} reject")  # fmt: skip
                    if port.get("nodePort"):
                        refuse.append(f"fib daddr type local {proto} dport {port['nodePort']} reject" +
                                      (" with tcp reset" if proto == "tcp" else ""))  # fmt: skip
                    continue
                dispatch.append(f"ip daddr {view.cluster_ip} {match} goto {chain}")
                if port.get("nodePort"):
                    node_ports.append(f"fib daddr type local {proto} dport {port['nodePort']} goto {chain}")
                targets = []
                for index, (ep, number) in enumerate(ready):
                    target = f"{chain}-{index}"
                    chains.append(f"chain {target} {{\n    ip saddr {ep.ip} meta mark set meta mark | {MASQUERADE_MARK:#x}\n"
                                  f"    meta l4proto {proto} dnat to {ep.ip}:{number}\n  }}")  # fmt: skip
                    targets.append(f"{index} : goto {target}")
                chains.append(f"chain {chain} {{\n    numgen random mod {len(ready)} vmap {{ {', '.join(targets)} }}\n  }}")
        lines = [f"table ip {TABLE} {{"]
        lines += [f"  {c}" for c in chains]
        lines.append("  chain services {")
        lines += [f"    {rule}" for rule in dispatch + node_ports]
        lines.append("  }")
        lines.append("  chain refused {")
        lines.append("    ct state != new return")  # replies, such as those to the agent's own forwards, pass
        lines += [f"    {rule}" for rule in refuse]
        # A ClusterIP's port its Service does not have (the agent's own addresses aside: it serves those).
        lines.append(f"    ip daddr != {{ {', '.join(sorted(self.local_ips))} }} ip daddr {self.service_cidr} reject")
        lines.append("  }")
        # Priorities as nft names them: dstnat -100, srcnat 100, filter 0 (numbers: older nft takes no names here).
        hooks = {"prerouting": ("nat", "prerouting", -100, "jump services"),
                 "output": ("nat", "output", -100, "jump services"),
                 "postrouting": ("nat", "postrouting", 100,
                                 f"meta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade"),
                 "forward": ("filter", "forward", 0, "jump refused"),
                 "input": ("filter", "input", 0, "jump refused"),
                 "local-out": ("filter", "output", 0, "jump refused")}  # fmt: skip
        for name, (kind, hook, priority, rule) in hooks.items():
            lines.append(f"  chain {name} {{\n    type {kind} hook {hook} priority {priority}; policy accept;\n"
                         f"    {rule}\n  }}")  # fmt: skip
        lines.append("}")
        return "\n".join(lines)

    def sync(self) -> None:
        rules = self.rules()
        if rules == self.last_rules:
            return
        self.network.nft(f"table ip {TABLE}\ndelete table ip {TABLE}\n{rules}\n")
        self.last_rules = rules

    # -- what a pod learns ------------------------------------------------------------------

    def environment(self, namespace: str) -> dict[str, str]:
        """The variables the kubelet gives a container for the Services of its namespace (and the API's)."""
        env: dict[str, str] = {}
        views = [v for v in self.views("default") if v.name == "kubernetes"] + self.views(namespace)
        for view in views:
            if view.headless or not view.ports:
                continue
            prefix = re.sub(r"[^A-Z0-9_]", "_", view.name.upper())
            first = view.ports[0]
            env[f"{prefix}_SERVICE_HOST"] = view.cluster_ip
            env[f"{prefix}_SERVICE_PORT"] = str(first["port"])
            env[f"{prefix}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{view.cluster_ip}:{first['port']}"
            for port in view.ports:
                proto = port.get("protocol", "TCP")
                if port.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{re.sub(r'[^A-Z0-9_]', '_', port['name'].upper())}"] = str(port["port"])
                base = f"{prefix}_PORT_{port['port']}_{proto}"
                env[base] = f"{proto.lower()}://{view.cluster_ip}:{port['port']}"
                env[f"{base}_PROTO"] = proto.lower()
                env[f"{base}_PORT"] = str(port["port"])
                env[f"{base}_ADDR"] = view.cluster_ip
        return env


def _key(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _chain(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", "-".join(p for p in parts if p))[:200]


def _view(svc: dict, slices: list[dict]) -> ServiceView:
    spec = svc.get("spec", {})
    view = ServiceView(svc["metadata"]["namespace"], svc["metadata"]["name"], spec.get("clusterIP", ""),
                       spec.get("ports", []), spec.get("type", "ClusterIP"),
                       publish_not_ready=bool(spec.get("publishNotReadyAddresses")))  # fmt: skip
    for item in slices:
        if item.get("addressType", "IPv4") != "IPv4":
            continue
        for port in item.get("ports") or []:
            for ep in item.get("endpoints") or []:
                conditions = ep.get("conditions", {})
                ready = conditions.get("ready", True) is not False
                target = ep.get("targetRef", {})
                for address in ep.get("addresses", []):
                    endpoint = Endpoint(address, ready, ep.get("hostname", ""),
                                        target.get("name", "") if target.get("kind") == "Pod" else "")  # fmt: skip
                    view.endpoints.setdefault(port.get("name", ""), []).append(
                        (endpoint, port.get("port"), port.get("protocol", "TCP")))
    return view


def endpoints_of(view: ServiceView) -> Iterator[Endpoint]:
    """Every distinct endpoint of a Service (any port), ready ones first."""
    seen: dict[str, Endpoint] = {}
    for entries in view.endpoints.values():
        for ep, _, _ in entries:
            seen.setdefault(ep.ip, ep)
    yield from sorted(seen.values(), key=lambda ep: not ep.ready)
