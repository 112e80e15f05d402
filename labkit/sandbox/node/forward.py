"""TCP forwards across the boundary between this machine's network and the pod network.

The agent lives in both: it reaches the API server on this machine's loopback and
enters the pod network to make sockets there. So it carries, with plain TCP
relays (a thread each way):

* **the ``kubernetes`` Service**: pods connect to its ClusterIP (443), which the
  agent listens on in the pod network, and reach the API server, whose
  certificate names that address; in-cluster clients in pods work unchanged;
* **NodePorts**, on this machine's ``127.0.0.1:NODEPORT``, as a local cluster's
  port mappings publish them, to the Service inside;
* **a Service for a notebook**, on demand (the kubelet API's ``/labkit/forward``):
  a port on this machine's loopback that leads to the Service's ClusterIP, like
  ``minikube service --url``. It lasts as long as the Service;
* **the API server's way into the cluster** (``ClusterEgress``): its egress selector
  sends what it opens to the cluster (kubelet APIs, ``pods/proxy``, ``services/proxy``,
  admission and conversion webhooks, aggregated APIs) as HTTP CONNECT requests to
  a Unix socket, as to a konnectivity proxy; the agent dials loopback addresses (the
  nodes' kubelet APIs) on this machine and every other address inside the pod
  network, where pods and ClusterIPs answer.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from pathlib import Path
from typing import Callable

from labkit.sandbox.node.namespaces import in_network
from labkit.sandbox.node.services import ServiceProxy

BUFFER = 65536


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides have finished (half-closes passed on), then close both."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join()
    a.close()
    b.close()


class Listener(threading.Thread):
    """Accepts on ``sock`` and relays each connection to what ``connect`` opens."""

    def __init__(self, sock: socket.socket, connect: Callable[[], socket.socket], name: str,
                 log: Callable[[str], None]) -> None:  # fmt: skip
        super().__init__(name=name, daemon=True)
        self.sock = sock
        self.connect = connect
        self.log = log

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self.connect()
        except OSError:
            client.close()  # what the far side refused, the near side refuses
            return
        relay(client, upstream)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def listen(host: str, port: int, netns: int | None = None) -> socket.socket:
    """A listening TCP socket on ``host:port``, in the network namespace of ``netns`` if given."""
    sock = in_network(netns, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def dial(host: str, port: int, netns: int | None = None, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``host:port`` made from the network namespace of ``netns`` if given."""
    sock = in_network(netns, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # relayed as it comes: never held back here
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


class ClusterEgress(threading.Thread):
    """An HTTP CONNECT proxy on a Unix socket, for the API server's ``cluster`` egress (see the module's docstring)."""

    HEADER_LIMIT = 16 << 10

    def __init__(self, path: Path, netns: int | None, log: Callable[[str], None],
                 local: Callable[[int], Callable[[socket.socket], bool] | None] | None = None) -> None:  # fmt: skip
        """``local(port)``: for one of the agent's own loopback ports (a node's kubelet API, while it serves), what
        takes a connection straight to its server, one relay fewer; None for any other port."""
        super().__init__(name="cluster-egress", daemon=True)
        self.netns = netns  # the pod network's (None: pods share this machine's network)
        self.log = log
        self.local = local
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)  # the API server runs as the same user; nobody else may tunnel through
        self.sock.listen(128)

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk or len(head) > self.HEADER_LIMIT:
                    client.close()
                    return
                head += chunk
            request, rest = head.split(b"\r\n\r\n", 1)
            method, target, _ = (request.split(b"\r\n", 1)[0].decode(errors="replace") + "  ").split(" ", 2)
            host, _, port = target.rpartition(":")
            host = host.strip("[]")
            if method != "CONNECT" or not port.isdigit():
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                client.close()
                return
            here = self._on_this_machine(host)
            adopt = self.local(int(port)) if here and not rest and self.local is not None else None
            if adopt is not None:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if not adopt(client):
                    client.close()
                return
            upstream = dial(host, int(port), None if here else self.netns)
        except OSError as exc:
            try:
                client.sendall(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n{exc}".encode())
            except OSError:
                pass
            client.close()
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        relay(client, upstream)

    @staticmethod
    def _on_this_machine(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"


class Forwards:
    """The agent's forwards: the ``kubernetes`` Service, NodePorts, and Services asked for by notebooks."""

    def __init__(self, proxy: ServiceProxy, netns: int, api_address: tuple[str, int], api_ip: str,
                 log: Callable[[str], None]) -> None:  # fmt: skip
        self.proxy = proxy
        self.netns = netns
        self.log = log
        self.lock = threading.Lock()
        self.node_ports: dict[int, Listener] = {}
        self.asked: dict[tuple[str, str, int], tuple[int, Listener]] = {}  # (namespace, service, port) -> host port
        sock = listen(api_ip, 443, netns)
        Listener(sock, lambda: dial(*api_address), "forward-kubernetes", log).start()
        proxy.listeners.append(self.reconcile)

    def _to_service(self, namespace: str, name: str, port: int) -> Callable[[], socket.socket]:
        def connect() -> socket.socket:
            view = self.proxy.view(namespace, name)
            if view is None or view.headless:
                raise OSError(f"service {namespace}/{name} has no ClusterIP")
            return dial(view.cluster_ip, port, self.netns)

        return connect

    def service(self, namespace: str, name: str, port: int) -> int:
        """A port on this machine's loopback that leads to ``namespace/name``'s ``port`` (made once)."""
        view = self.proxy.view(namespace, name)
        if view is None:
            raise LookupError(f'services "{name}" not found')
        if view.headless:
            raise LookupError(f"service {name} is headless: it has no ClusterIP to forward to")
        if not any(p["port"] == port for p in view.ports):
            raise LookupError(f"service {name} has no port {port} (it has {', '.join(str(p['port']) for p in view.ports)})")
        with self.lock:
            if (namespace, name, port) not in self.asked:
                sock = listen("127.0.0.1", 0)
                listener = Listener(sock, self._to_service(namespace, name, port), f"forward-{namespace}-{name}", self.log)
                listener.start()
                self.asked[(namespace, name, port)] = (sock.getsockname()[1], listener)
            return self.asked[(namespace, name, port)][0]

    def reconcile(self) -> None:
        """After each change of Services: NodePorts opened and closed, forwards of deleted Services closed."""
        views = {(v.namespace, v.name): v for v in self.proxy.views()}
        wanted = {p["nodePort"]: (v.namespace, v.name, p["port"]) for v in views.values() if not v.headless
                  for p in v.ports if p.get("nodePort") and p.get("protocol", "TCP") == "TCP"}  # fmt: skip
        with self.lock:
            for node_port in set(self.node_ports) - set(wanted):
                self.node_ports.pop(node_port).close()
            for node_port, (namespace, name, port) in wanted.items():
                if node_port not in self.node_ports:
                    try:
                        sock = listen("127.0.0.1", node_port)
                    except OSError as exc:
                        self.log(f"NodePort {node_port} of {namespace}/{name}: this machine's port is taken ({exc})")
                        continue
                    listener = Listener(sock, self._to_service(namespace, name, port), f"nodeport-{node_port}", self.log)
                    listener.start()
                    self.node_ports[node_port] = listener
            for key in [k for k in self.asked if k[:2] not in views]:
                self.asked.pop(key)[1].close()
