"""The kubelet API of one node: the HTTPS server the API server calls for `kubectl logs`.

``kubectl logs`` asks the API server for ``pods/NAME/log``; the API server finds
the pod's node, dials the address and port the node published in its status
(InternalIP 127.0.0.1, ``daemonEndpoints.kubeletEndpoint.Port``), checks the
node's serving certificate against the cluster CA (``--kubelet-certificate-authority``)
and presents its kubelet client certificate. This module is that endpoint, one
server per node, speaking what the kubelet speaks:

* ``GET /containerLogs/{namespace}/{pod}/{container}`` with ``follow``,
  ``tailLines``, ``sinceSeconds``, ``sinceTime``, ``timestamps``, ``limitBytes``
  and ``previous``; its errors carry the kubelet's own wording and status codes
  (404 for an unknown pod or container; 400, which the API server passes on word
  for word, for a container with no logs to show);
* ``GET /healthz``: ``ok``;
* ``GET|POST|PUT|DELETE /labkit/proxy/{namespace}/{pod}/{port}/{path}``: labkit's
  own, not a kubelet's: the same request for ``path`` on the pod's ``port``, made
  from inside the pod's network namespace, so that a notebook can reach a pod's HTTP port
  as a real cluster's API server ``pods/proxy`` does. A port nothing listens on
  is a 502 with the dial error, as the API server's proxy gives it;
* ``GET /labkit/forward/{namespace}/{service}/{port}``: labkit's own too: a port
  on this machine's loopback that leads to the Service (``forward.py``), as JSON;
* ``GET|POST /labkit/faults``, ``DELETE /labkit/faults/{id}``: the network faults
  in force, one more, one fewer (``faults.py``).

Authentication and authorization are a kubelet's in webhook mode (``authz.py``): a
client certificate the cluster CA signed or a bearer token the API server vouches
for, and a SubjectAccessReview of what the request means (``nodes/proxy`` for the
kubelet's paths; ``pods/proxy`` and ``services/proxy`` for labkit's, as the API
server would ask for the same request), so that a trainee's service account
reaches its own pods' ports here as it would through the API server, and nobody
else's; nobody is 401, refused is the kubelet's 403.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import select
import socket
import ssl
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from labkit.kube.client import KubeAPI
from labkit.sandbox.node import authz, logs, metrics, streaming, websocket
from labkit.sandbox.node.namespaces import in_network
from labkit.sandbox.node.streaming import Refused

PROXY_TIMEOUT = 10.0  # a pod's HTTP answer, through labkit's proxy
PROXY_LIMIT = 8 << 20  # bytes of it passed on
STREAMING = ("/exec/", "/attach/", "/portForward/")
REQUEST_TIMEOUT = 120.0  # an idle kept-alive connection, or a client that stops reading, is dropped after this


def _q(text: str) -> str:
    """A name quoted as Go's %q quotes it, so messages read exactly as a kubelet's."""
    return json.dumps(text)


# -- what the server needs to know about a pod's containers -------------------------------------


@dataclass
class ContainerView:
    """What logs need of one container: its log folder and its status (state, last state)."""

    pod: str
    name: str
    folder: Path
    state: dict
    last_state: dict


def find_pod(workers: Iterable, namespace: str, pod: str):  # noqa: ANN201 - a pod worker
    """The pod worker of ``namespace/pod`` among a node's; ``Refused`` (the kubelet's 404) if none."""
    for worker in workers:
        meta = worker.pod["metadata"]
        if meta["namespace"] == namespace and meta["name"] == pod:
            return worker
    raise Refused(404, f"pod {_q(pod)} does not exist")


def find_container(workers: Iterable, namespace: str, pod: str, container: str) -> ContainerView:
    """The container ``container`` of pod ``namespace/pod`` among a node's pod workers.

    The one place that knows the pod worker's insides (``pod``, ``workdir``, its containers'
    ``state`` and ``last_state``), so a change there is a change here only. Raises ``Refused``
    with the kubelet's 404s when the node has no such pod or the pod no such container.
    """
    worker = find_pod(workers, namespace, pod)
    for c in worker.all_containers():
        if c.name == container:
            return ContainerView(pod, container, worker.workdir / "logs" / container, dict(c.state),
                                 dict(c.last_state))  # fmt: skip
    raise Refused(404, f"container {_q(container)} not found in pod {_q(pod)}")


def choose_attempt(view: ContainerView, previous: bool) -> int:
    """Which attempt's log to show, by the kubelet's rules (validateContainerLogStatus).

    Without ``previous``: the newest attempt, whether it runs, has finished, or has exited and
    waits to be restarted. With ``previous``: the attempt the container's ``lastState`` describes —
    the newest one while the container waits to restart (as in CrashLoopBackOff), the one before
    it once the container runs again. Raises ``Refused`` (400, the kubelet's wording) when there is
    nothing to show.
    """
    files = logs.attempts(view.folder)
    waiting, terminated = view.state.get("waiting"), view.state.get("terminated")
    last = view.last_state.get("terminated")
    which = f"container {_q(view.name)} in pod {_q(view.pod)}"
    if previous:
        number = (files[-1] if waiting else files[-1] - 1) if files else -1
        if not last or number not in files:
            raise Refused(400, f"previous terminated {which} not found")
        return number
    if files and (view.state.get("running") or terminated or last):
        return files[-1]
    if terminated or last:
        raise Refused(400, f"{which} is terminated")
    if waiting:
        reason = waiting.get("reason", "")
        detail = {"ErrImagePull": "image can't be pulled",
                  "ImagePullBackOff": "trying and failing to pull image"}.get(reason, reason)  # fmt: skip
        raise Refused(400, f"{which} is waiting to start: {detail}")
    raise Refused(400, f"{which} is waiting to start - no logs yet")


# -- the request's options, decoded as the kubelet decodes PodLogOptions --------------------------


@dataclass
class LogOptions:
    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail: int | None = None
    since: dt.datetime | None = None
    limit_bytes: int | None = None


def parse_options(query: str, now: dt.datetime | None = None) -> LogOptions:
    """PodLogOptions from a query string; ``Refused`` with the kubelet's 400 or 422 if they are wrong."""
    values = {key: items[0] for key, items in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    if "tail" in values:  # the kubelet's older spelling of tailLines; "all" means no limit
        tail = values.pop("tail")
        if tail != "all":
            values["tailLines"] = tail

    def flag(name: str) -> bool:  # as the API's query decoding: absent, "0" and "false" are false
        return name in values and values[name] != "0" and values[name].lower() != "false"

    def number(name: str) -> int | None:
        return int(values[name]) if name in values else None

    try:
        options = LogOptions(follow=flag("follow"), previous=flag("previous"), timestamps=flag("timestamps"),
                             tail=number("tailLines"), limit_bytes=number("limitBytes"))  # fmt: skip
        seconds = number("sinceSeconds")
        since_time = dt.datetime.fromisoformat(values["sinceTime"]) if "sinceTime" in values else None
    except ValueError:
        raise Refused(400, '{"message": "Unable to decode query."}') from None
    if ((options.tail is not None and options.tail < 0) or (options.limit_bytes is not None and options.limit_bytes < 1)
            or (seconds is not None and seconds < 1) or (seconds is not None and since_time is not None)):  # fmt: skip
        raise Refused(422, '{"message": "Invalid request."}')
    if seconds is not None:
        options.since = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(seconds=seconds)
    elif since_time is not None:
        options.since = since_time if since_time.tzinfo else since_time.replace(tzinfo=dt.timezone.utc)
    return options


# -- the server --------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked responses, which is how the kubelet streams logs
    timeout = REQUEST_TIMEOUT
    server: _HTTPSServer

    def setup(self) -> None:
        self.request.settimeout(self.timeout)
        self.request.do_handshake()  # here, in the request's thread, so a slow client stalls no other
        super().setup()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # the API server logs every request it proxies; the agent's log keeps to problems

    def _allowed(self, url: urllib.parse.SplitResult, verb: str) -> bool:
        """Whether the caller may make this request (``authz.py``): else the kubelet's 401 or 403, and False."""
        owner = self.server.owner
        who = owner.gate.identify(self.request.getpeercert(), self.headers.get("Authorization"))
        if who is None:
            self._reply(401, "Unauthorized\n")
            return False
        wanted = authz.access(self.command, url.path, owner.node)
        if owner.gate.allows(who, wanted):
            return True
        owner.log(f"node {owner.node}: refused {who.user} ({self.command} {url.path})")
        self._reply(403, wanted.refusal(who))
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urllib.parse.urlsplit(self.path)
        if not self._allowed(url, "get"):
            return
        try:
            if url.path == "/healthz":
                self._reply(200, "ok")
            elif url.path.startswith("/containerLogs/"):
                self._container_logs(url)
            elif url.path.startswith("/labkit/proxy/"):
                self._proxy(url)
            elif url.path.startswith(STREAMING):
                self._streaming(url)
            elif url.path.startswith("/labkit/forward/"):
                self._forward(url)
            elif url.path == "/labkit/faults":
                self._reply(200, json.dumps(self._networking().faults.list()))
            elif url.path == "/metrics/resource":
                self._reply(200, metrics.resource_metrics(self.server.owner.workers()))
            else:
                self._reply(404, "404 page not found\n")
        except Refused as refusal:
            self._reply(refusal.status, str(refusal))

    def do_POST(self) -> None:  # noqa: N802
        """``POST /labkit/faults``: a network fault (faults.py's JSON form); its id and form, or 400 and why not.
        ``POST /labkit/proxy/...``: passed on to the pod."""
        url = urllib.parse.urlsplit(self.path)
        if not self._allowed(url, "create"):
            return
        try:
            if url.path.startswith("/labkit/proxy/"):
                self._proxy(url)
                return
            if url.path.startswith(STREAMING):
                self._streaming(url)
                return
            if url.path != "/labkit/faults":
                raise Refused(404, "404 page not found\n")
            try:
                spec = json.loads(self._body() or b"{}")
                fault = self._networking().faults.add(spec)
            except (ValueError, AttributeError) as exc:
                raise Refused(400, f"{exc}\n")
            self._reply(201, json.dumps(fault.describe()))
        except Refused as refusal:
            self._reply(refusal.status, str(refusal))

    def do_PUT(self) -> None:  # noqa: N802
        """``PUT /labkit/proxy/...``: passed on to the pod."""
        url = urllib.parse.urlsplit(self.path)
        if not self._allowed(url, "update"):
            return
        try:
            if not url.path.startswith("/labkit/proxy/"):
                raise Refused(404, "404 page not found\n")
            self._proxy(url)
        except Refused as refusal:
            self._reply(refusal.status, str(refusal))

    def do_DELETE(self) -> None:  # noqa: N802
        """``DELETE /labkit/faults/{id}``: the fault is removed (404 if there is none). ``DELETE /labkit/proxy/...``:
        passed on to the pod."""
        url = urllib.parse.urlsplit(self.path)
        if not self._allowed(url, "delete"):
            return
        try:
            if url.path.startswith("/labkit/proxy/"):
                self._proxy(url)
                return
            parts = url.path.split("/")
            if len(parts) != 4 or parts[:3] != ["", "labkit", "faults"]:
                raise Refused(404, "404 page not found\n")
            if not self._networking().faults.remove(parts[3]):
                raise Refused(404, f"fault {parts[3]} not found\n")
            self._reply(200, "{}")
        except Refused as refusal:
            self._reply(refusal.status, str(refusal))

    def _networking(self) -> Any:
        networking = self.server.owner.networking
        if networking is None:
            raise Refused(503, "this sandbox has no pod network (see `labkit sandbox status`)\n")
        return networking

    def _container_logs(self, url: urllib.parse.SplitResult) -> None:
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")[2:]]
        if len(parts) != 3 or not all(parts):
            raise Refused(404, "404 page not found\n")
        namespace, pod, container = parts
        options = parse_options(url.query)
        view = find_container(self.server.owner.workers(), namespace, pod, container)
        restart = choose_attempt(view, options.previous)
        reader = logs.follow if options.follow else logs.read
        extra = {"client_gone": self._client_gone} if options.follow else {}
        chunks = reader(view.folder, restart, tail=options.tail, since=options.since, timestamps=options.timestamps,
                        limit_bytes=options.limit_bytes, **extra)  # fmt: skip
        self._stream(chunks)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _proxy(self, url: urllib.parse.SplitResult) -> None:
        """The request as it came (its method, and its body but for a GET), made to the pod's port."""
        method = self.command
        parts = url.path.split("/", 6)  # "", "labkit", "proxy", namespace, pod, port, path
        if len(parts) < 6 or not parts[5].isdigit():
            raise Refused(404, "404 page not found\n")
        namespace, pod, port = parts[3], parts[4], int(parts[5])
        worker = find_pod(self.server.owner.workers(), namespace, pod)
        target = "/" + (parts[6] if len(parts) > 6 else "") + (f"?{url.query}" if url.query else "")
        body = self._body() if method != "GET" else None
        headers = {"Accept": self.headers.get("Accept", "*/*")}
        if body:
            headers["Content-Type"] = self.headers.get("Content-Type", "application/octet-stream")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROXY_TIMEOUT)
            in_network(worker.network_pid(), conn.connect)  # from inside the pod's network
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                body = response.read(PROXY_LIMIT)
            finally:
                conn.close()
        except ConnectionRefusedError:
            raise Refused(502, f"error trying to reach service: dial tcp 127.0.0.1:{port}: connect: connection refused\n")
        except (OSError, http.client.HTTPException) as exc:
            raise Refused(502, f"error trying to reach service: {exc}\n")
        self.send_response(response.status, response.reason)
        self.send_header("Content-Type", response.getheader("Content-Type", "text/plain"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _streaming(self, url: urllib.parse.SplitResult) -> None:
        """``/exec``, ``/attach`` and ``/portForward``: the connection is upgraded and served (``streaming.py``)."""
        owner = self.server.owner
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
        offered = streaming.offered_protocols(self.headers)
        if parts[0] == "portForward":
            if len(parts) != 3:
                raise Refused(404, "404 page not found\n")
            worker = find_pod(owner.workers(), parts[1], parts[2])
            network = streaming.PodNetwork(parts[2], worker.pod["metadata"]["uid"], worker.network_pid())
            if self.headers.get("Upgrade", "").lower() == "websocket":
                key = self.headers.get("Sec-WebSocket-Key", "")
                session = streaming.WebSocketPortForward(network, streaming.WebSocketPortForward.parse_ports(url.query))
                protocol = streaming.negotiate(websocket.offered_protocols(self.headers),
                                               streaming.WebSocketPortForward.PROTOCOLS)  # fmt: skip
                if not key:
                    raise Refused(400, "unable to upgrade: missing Sec-WebSocket-Key\n")
                streaming.serve_websocket(websocket.upgrade(self, key, protocol), session)
                return
            protocol = streaming.negotiate(offered, (streaming.PORT_FORWARD_PROTOCOL,))
            streaming.serve(streaming.upgrade(self, protocol), streaming.PortForwardSession(network))
            return
        if len(parts) != 4:
            raise Refused(404, "404 page not found\n")
        namespace, pod, container = parts[1:]
        options = streaming.Options.parse(url.query)
        find_container(owner.workers(), namespace, pod, container)  # the kubelet's 404s
        found = find_pod(owner.workers(), namespace, pod).exec_target(container)
        if found is None:
            raise Refused(500, f"container {_q(container)} in pod {_q(pod)} is not running\n")
        c, target = found
        if parts[0] == "exec":
            begin = lambda: streaming.start_exec(target, c.joined, options)  # noqa: E731
        else:
            begin = lambda: streaming.attach(c, options)  # noqa: E731
        protocol = streaming.negotiate(offered, streaming.EXEC_PROTOCOLS)
        streaming.serve(streaming.upgrade(self, protocol), streaming.ChannelSession(options, begin, owner.log))

    def _forward(self, url: urllib.parse.SplitResult) -> None:
        """A port on this machine's loopback that leads to a Service: ``/labkit/forward/{namespace}/{service}/{port}``."""
        parts = url.path.split("/")[3:]
        if len(parts) != 3 or not parts[2].isdigit():
            raise Refused(404, "404 page not found\n")
        networking = self._networking()
        try:
            port = networking.forwards.service(parts[0], parts[1], int(parts[2]))
        except LookupError as exc:
            raise Refused(404, f"{exc.args[0]}\n")
        except OSError as exc:
            raise Refused(503, f"cannot forward: {exc}\n")
        self._reply(200, json.dumps({"host": "127.0.0.1", "port": port}))

    def _stream(self, chunks: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except FileNotFoundError:  # the attempt's log was removed while it was read: end the body short
            self.close_connection = True
        except (OSError, ssl.SSLError):  # the client went away
            self.close_connection = True
        finally:
            if hasattr(chunks, "close"):
                chunks.close()

    def _client_gone(self) -> bool:
        """Whether the client hung up while a follow waits for lines: it sent EOF or a TLS alert."""
        if self.server.closing.is_set():
            return True
        try:
            readable, _, _ = select.select([self.request], [], [], 0)
            if not readable:
                return False
            peek = socket.socket.recv(self.request, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
        return not peek or peek[0] == 0x15  # 0x15: a TLS alert record, as close_notify

    def _reply(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _HTTPSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: NodeServer, context: ssl.SSLContext) -> None:
        self.owner = owner
        self.context = context
        self.closing = threading.Event()
        super().__init__(("127.0.0.1", owner.port), _Handler)

    def get_request(self) -> tuple[ssl.SSLSocket, tuple]:
        sock, address = self.socket.accept()
        # Streams send small frames (a SYN_REPLY, a line of output) one after another: Nagle's algorithm would hold
        # each behind the peer's delayed acknowledgement of the last.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection that reached this node another way (the API server's egress, ``ClusterEgress``)."""
        self.process_request(self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False),
                             ("egress", 0))  # fmt: skip

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that fails the TLS handshake (no certificate, another CA) or hangs up is no news."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ssl.SSLError, ConnectionError, TimeoutError)):
            self.owner.log(f"node {self.owner.node}: kubelet API request failed: {error!r}")


class NodeServer:
    """One node's kubelet API: HTTPS on 127.0.0.1:``port``; a client certificate or a bearer token."""

    def __init__(self, node: str, port: int, cert: Path, key: Path, ca: Path,
                 workers: Callable[[], Iterable], log: Callable[[str], None], networking: Any = None,
                 api: KubeAPI | None = None) -> None:  # fmt: skip
        """``api``: the node's own client, which asks the API server who a token is and what they may do."""
        self.node = node
        self.gate = authz.Gate(api)
        self.networking = networking  # the agent's network.Networking (None without a pod network)
        self.port = port
        self.workers = workers  # the node's pod workers, read at each request
        self.log = log
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(str(cert), str(key))
        self.context.load_verify_locations(str(ca))
        self.context.verify_mode = ssl.CERT_OPTIONAL  # a certificate, or a bearer token instead
        self.httpd: _HTTPSServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.httpd is not None

    def adopt(self, sock: socket.socket) -> bool:
        """Serve ``sock`` as if it had connected to the port: False (the caller refuses it) if the API is closed."""
        httpd = self.httpd
        if httpd is None:
            return False
        httpd.adopt(sock)
        return True

    def start(self) -> None:
        """Listen and serve; raises OSError if the port is taken."""
        self.httpd = _HTTPSServer(self, self.context)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                       name=f"kubelet-api-{self.node}", daemon=True)  # fmt: skip
        self.thread.start()

    def stop(self) -> None:
        """Stop listening; requests in progress (a follow) end within a second."""
        if self.httpd is None:
            return
        self.httpd.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join()
        self.httpd = self.thread = None
