"""The cluster's DNS, as CoreDNS's kubernetes plugin answers it, served by the agent on the pod network.

It listens on the ``kube-dns`` Service's ClusterIP (UDP and TCP port 53) and
answers from the service proxy's view of Services and EndpointSlices:

* ``SERVICE.NAMESPACE.svc.cluster.local``: the ClusterIP, or for a headless
  Service the addresses of its ready endpoints (all of them with
  ``publishNotReadyAddresses``);
* ``HOSTNAME.SERVICE.NAMESPACE.svc.cluster.local``: the endpoint with that
  hostname (a StatefulSet's pods behind their headless Service);
* ``A-B-C-D.NAMESPACE.pod.cluster.local``: that address;
* ``_PORT._PROTO.SERVICE.NAMESPACE.svc.cluster.local``: SRV records of named ports.

A name in ``cluster.local`` that does not exist is NXDOMAIN, so a pod's search
path (``NAMESPACE.svc.cluster.local svc.cluster.local cluster.local``, with
``ndots:5``) works as on a cluster. Other names are passed to this machine's own
resolvers. A pod's ``resolv.conf`` and ``hosts`` are written by ``pod_files``.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Callable

from labkit.sandbox.node.namespaces import in_network
from labkit.sandbox.node.services import ServiceProxy, endpoints_of

DOMAIN = "cluster.local"
TTL = 5
A, AAAA, SRV, ANY = 1, 28, 33, 255
NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3


def _name(data: bytes, offset: int) -> tuple[str, int]:
    labels = []
    while True:
        length = data[offset]
        if length == 0:
            return ".".join(labels), offset + 1
        if length & 0xC0:  # a pointer: questions do not use them, but be safe
            pointed, _ = _name(data, ((length & 0x3F) << 8) | data[offset + 1])
            return ".".join([*labels, pointed]) if labels else pointed, offset + 2
        labels.append(data[offset + 1 : offset + 1 + length].decode(errors="replace"))
        offset += 1 + length


def _encode(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".") if p) + b"\0"


class ClusterDNS:
    """Answers DNS queries about the cluster; one per agent."""

    def __init__(self, proxy: ServiceProxy, address: str, network_pid: int, log: Callable[[str], None]) -> None:
        self.proxy = proxy
        self.address = address
        self.network_pid = network_pid
        self.log = log
        self.upstream = _upstream_servers()
        self.servers: list[socketserver.BaseServer] = []

    def start(self) -> None:
        """Listen on ``address``:53 in the pod network (the sockets are made there, then served from here)."""
        dns = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                answer = dns.answer(data)
                if answer:
                    sock.sendto(answer, self.client_address)

        class TCPHandler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    answer = dns.answer(self.rfile.read(struct.unpack("!H", head)[0]))
                    if not answer:
                        return
                    self.wfile.write(struct.pack("!H", len(answer)) + answer)

        for server_class, handler in ((socketserver.ThreadingUDPServer, UDPHandler),
                                      (socketserver.ThreadingTCPServer, TCPHandler)):  # fmt: skip
            server_class.daemon_threads = True
            server_class.allow_reuse_address = True
            self.servers.append(in_network(self.network_pid, server_class, (self.address, 53), handler))
        for server in self.servers:
            threading.Thread(target=server.serve_forever, name="cluster-dns", daemon=True).start()

    # -- answering --------------------------------------------------------------------------

    def answer(self, query: bytes) -> bytes | None:
        try:
            ident, flags, count = struct.unpack("!HHH", query[:6])
            if count != 1 or flags & 0x8000:
                return None
            name, end = _name(query, 12)
            qtype, qclass = struct.unpack("!HH", query[end : end + 4])
        except (struct.error, IndexError):
            return None
        question = query[12 : end + 4]
        name = name.lower().rstrip(".")
        if not (name == DOMAIN or name.endswith("." + DOMAIN)):
            return self.forward(query) or _reply(ident, flags, question, SERVFAIL, [])
        found = self.lookup(name)
        if found is None:
            return _reply(ident, flags, question, NXDOMAIN, [])
        records = [(t, data) for t, data in found if qtype in (t, ANY)]
        return _reply(ident, flags, question, NOERROR, records)

    def lookup(self, name: str) -> list[tuple[int, bytes]] | None:
        """The records of ``name`` in the cluster's domain: (type, rdata); None if it does not exist."""
        parts = name[: -len(DOMAIN) - 1].split(".") if name != DOMAIN else []
        if len(parts) == 3 and parts[2] == "pod":  # 10-244-1-5.ns.pod
            try:
                return [(A, ipaddress.IPv4Address(parts[0].replace("-", ".")).packed)]
            except ValueError:
                return None
        if len(parts) < 3 or parts[-1] != "svc":  # the zone's own names exist, without records
            return [] if parts in ([], ["svc"], ["pod"]) or (len(parts) == 2 and parts[1] in ("svc", "pod")) else None
        *prefix, service, namespace, _ = parts
        view = self.proxy.view(namespace, service)
        if view is None:
            return None
        endpoints = [ep for ep in endpoints_of(view) if ep.ready or view.publish_not_ready]
        if not prefix:
            if view.headless:
                return [(A, ipaddress.IPv4Address(ep.ip).packed) for ep in endpoints]
            return [(A, ipaddress.IPv4Address(view.cluster_ip).packed)]
        if len(prefix) == 1:  # an endpoint by its hostname
            match = [ep for ep in endpoints if ep.hostname == prefix[0]]
            return [(A, ipaddress.IPv4Address(ep.ip).packed) for ep in match] or None
        if len(prefix) == 2 and prefix[0].startswith("_") and prefix[1].startswith("_"):
            port = next((p for p in view.ports if p.get("name") == prefix[0][1:]
                         and p.get("protocol", "TCP").lower() == prefix[1][1:]), None)  # fmt: skip
            if port is None:
                return None
            targets = ([f"{ep.hostname}.{service}.{namespace}.svc.{DOMAIN}" for ep in endpoints if ep.hostname]
                       if view.headless else []) or [f"{service}.{namespace}.svc.{DOMAIN}"]  # fmt: skip
            return [(SRV, struct.pack("!HHH", 0, 100, port["port"]) + _encode(t)) for t in targets]
        return None

    def forward(self, query: bytes) -> bytes | None:
        """Ask this machine's resolvers (from the machine's own network), for names outside the cluster."""
        for server in self.upstream:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(2.0)
                    sock.sendto(query, (server, 53))
                    return sock.recv(4096)
            except OSError:
                continue
        return None


def _reply(ident: int, flags: int, question: bytes, rcode: int, records: list[tuple[int, bytes]]) -> bytes:
    flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode  # response, authoritative, RD as asked, RA
    head = struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0)
    body = b"".join(struct.pack("!HHHIH", 0xC00C, kind, 1, TTL, len(data)) + data for kind, data in records)
    return head + question + body


def _upstream_servers() -> list[str]:
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return []
    servers = [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]
    return [s for s in servers if ":" not in s][:3]


def pod_files(folder: Path, pod: dict, ip: str, dns_ip: str) -> list[dict]:
    """The pod's ``/etc/resolv.conf`` and ``/etc/hosts``, written as the kubelet writes them, as mounts."""
    spec, meta = pod["spec"], pod["metadata"]
    folder.mkdir(parents=True, exist_ok=True)
    mounts = []
    policy = spec.get("dnsPolicy", "ClusterFirst")
    config = spec.get("dnsConfig") or {}
    if policy != "Default" and not spec.get("hostNetwork"):
        search = [f"{meta['namespace']}.svc.{DOMAIN}", f"svc.{DOMAIN}", DOMAIN] if policy != "None" else []
        servers = [dns_ip] if policy != "None" else []
        options = {"ndots": "5"} if policy != "None" else {}
        servers += config.get("nameservers", [])
        search += config.get("searches", [])
        options.update({o["name"]: o.get("value") for o in config.get("options", [])})
        text = "".join(f"nameserver {s}\n" for s in servers) + (f"search {' '.join(search)}\n" if search else "")
        text += f"options {' '.join(k if v is None else f'{k}:{v}' for k, v in options.items())}\n" if options else ""
        (folder / "resolv.conf").write_text(text)
        mounts.append({"source": str(folder / "resolv.conf"), "path": "/etc/resolv.conf"})
    hostname = spec.get("hostname") or meta["name"]
    names = [f"{hostname}.{spec['subdomain']}.{meta['namespace']}.svc.{DOMAIN}", hostname] if spec.get("subdomain") else [hostname]
    lines = ["# Kubernetes-managed hosts file.", "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             f"{ip}\t{' '.join(names)}"]  # fmt: skip
    lines += [f"{alias['ip']}\t{' '.join(alias.get('hostnames', []))}" for alias in spec.get("hostAliases", [])]
    (folder / "hosts").write_text("\n".join(lines) + "\n")
    mounts.append({"source": str(folder / "hosts"), "path": "/etc/hosts"})
    return mounts
