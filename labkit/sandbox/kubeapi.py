"""A very small Kubernetes API client, for labkit's own processes and for notebooks.

The node agent speaks to the API server as each of its nodes (``system:node:NAME``),
so that the Node authorizer and the NodeRestriction admission plugin judge it
exactly as they judge a kubelet; a lab notebook speaks to it with whatever its
kubeconfig or service account gives (``labkit.cluster``). Both need a handful of
JSON requests and watches, which this does with the standard library: the agent's
memory stays small, and a notebook's kernel starts without importing a large
generated client.
"""

from __future__ import annotations

import collections
import datetime as dt
import http.client
import json
import queue
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply
MERGE_PATCH = "application/merge-patch+json"
EVENT_BURST, EVENT_DELAY = 5, 1.0  # Events a second beyond which each waits EVENT_DELAY s to be posted (EventSink)


def api_time(moment: dt.datetime | None = None) -> str:
    """A Time as the API writes it (seconds, UTC): condition and container timestamps."""
    return (moment or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_micro_time(moment: dt.datetime | None = None) -> str:
    """A MicroTime (microseconds, UTC), as a Lease's renewTime."""
    return (moment or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class APIError(Exception):
    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            message = json.loads(body).get("message", body)
        except ValueError:
            message = body
        super().__init__(f"HTTP {status}: {message}")


class KubeAPI:
    """Access to one API server with a client certificate or a bearer token.

    Requests reuse kept-alive connections from a small pool shared by all threads: the
    agent's pod workers make a few small requests each, and a TLS handshake for each
    request (or for each new worker) would cost more than the requests themselves.
    ``token`` is called before each request (a rotating service-account token, an exec
    plugin's cached credential); ``context`` replaces the TLS set-up (ca, cert, key).
    """

    POOL = 8  # idle connections kept

    def __init__(self, server: str, ca: Path | None = None, cert: Path | None = None, key: Path | None = None, *,
                 token: Callable[[], str | None] | None = None, context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.server = server.rstrip("/")
        if context is None:
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None:
                context.load_cert_chain(str(cert), str(key))
        self.context = context
        self.token = token
        parsed = urllib.parse.urlsplit(self.server)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 443
        self.prefix = parsed.path.rstrip("/")  # a server URL may have a path (a proxy in front of the API)
        self._idle: list[http.client.HTTPSConnection] = []
        self._pool_lock = threading.Lock()

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.context)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _release(self, conn: http.client.HTTPSConnection) -> None:
        with self._pool_lock:
            if len(self._idle) < self.POOL:
                self._idle.append(conn)
                return
        conn.close()

    def headers(self, accept: str = "application/json") -> dict[str, str]:
        headers = {"Accept": accept}
        token = self.token() if self.token else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @staticmethod
    def _target(path: str, query: dict[str, str] | None) -> str:
        return f"{path}{'&' if '?' in path else '?'}{urllib.parse.urlencode(query)}" if query else path

    def send(self, method: str, path: str, body: dict | bytes | None = None, *, content_type: str = "application/json",
             query: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:  # fmt: skip
        """One request, whatever the answer: its status and body. A dead connection is retried once."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = self.headers("application/json, */*")
        if data is not None:
            headers["Content-Type"] = content_type
        target = self.prefix + self._target(path, query)
        for attempt in (1, 2):
            conn = self._connection(timeout)
            try:
                conn.request(method, target, body=data, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                break
            except (http.client.HTTPException, ConnectionError, ssl.SSLError) as exc:
                conn.close()  # a kept-alive connection the server closed: once more on a fresh one
                if attempt == 2:
                    raise OSError(f"{method} {path}: {exc}") from exc
            except OSError:
                conn.close()
                raise
        self._release(conn)
        return response.status, answer

    def request(
        self, method: str, path: str, body: dict | None = None, *, content_type: str = "application/json",
        query: dict[str, str] | None = None, timeout: float = 10.0,
    ) -> dict:  # fmt: skip
        status, answer = self.send(method, path, body, content_type=content_type, query=query, timeout=timeout)
        text = answer.decode(errors="replace")
        if status >= 400:
            raise APIError(status, text)
        return json.loads(text) if text else {}

    def stream(self, path: str, timeout: float = 90.0, query: dict[str, str] | None = None):  # noqa: ANN201
        """The events of a watch request, one JSON object per line, until the server ends it."""
        request = urllib.request.Request(self.server + self._target(path, query), method="GET",
                                         headers=self.headers())  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.context) as response:
                for line in response:
                    if line.strip():
                        yield json.loads(line)
        except urllib.error.HTTPError as exc:
            raise APIError(exc.code, exc.read().decode(errors="replace")) from None

    def get(self, path: str) -> dict | None:
        """The object at ``path``, or None if it does not exist."""
        try:
            return self.request("GET", path)
        except APIError as exc:
            if exc.status == 404:
                return None
            raise


class ObjectCache:
    """Objects read through ``api``, kept for ``ttl`` seconds: the ConfigMaps and Secrets a node's
    pods refer to, as the kubelet's object managers keep them. Twenty pods of one namespace starting
    at once read its ``kube-root-ca.crt`` once, not twenty times; a change is seen within ``ttl``."""

    def __init__(self, api: KubeAPI, ttl: float) -> None:
        self.api = api
        self.ttl = ttl
        self._entries: dict[str, tuple[float, dict | None]] = {}
        self._fetching: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> dict | None:
        """The object at ``path`` (None if it does not exist), read at most ``ttl`` seconds ago."""
        with self._lock:
            fetching = self._fetching.setdefault(path, threading.Lock())
        with fetching:  # readers of one object wait for one request, not one each
            now = time.monotonic()
            entry = self._entries.get(path)
            if entry is not None and now - entry[0] < self.ttl:
                return entry[1]
            value = self.api.get(path)
            with self._lock:
                for stale in [p for p, (at, _) in self._entries.items() if now - at >= self.ttl and p != path]:
                    del self._entries[stale]
                    self._fetching.pop(stale, None)
                self._entries[path] = (time.monotonic(), value)
            return value


def kubelet_event(involved: dict, reason: str, message: str, *, kind: str, node: str) -> dict:
    """An Event as a kubelet on ``node`` reports one about ``involved`` (a Node or a Pod)."""
    return component_event(involved, reason, message, kind=kind, component="kubelet", host=node)


def component_event(involved: dict, reason: str, message: str, *, kind: str, component: str,
                    host: str | None = None) -> dict:  # fmt: skip
    """An Event ``component`` (on ``host``) reports about ``involved``."""
    namespace = involved.get("namespace", "default")  # events about nodes live in `default`
    stamp = api_time()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": component, **({"host": host} if host else {})},
        "reportingComponent": component,
        "reportingInstance": host or component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventSink(threading.Thread):
    """Posts Events in the background, in order, as the kubelet's event broadcaster does: a pod's
    start is never held up by the API round trips of its Pulled, Created and Started events.

    In a burst (more than ``EVENT_BURST`` Events raised within a second) each further Event is posted a
    second after it was raised, with the timestamps of the moment it was raised: when twenty pods start at
    once their sixty Events reach the API server after the burst instead of competing with the pods' own
    status updates for its CPU (pod start-up p99 0.61 s -> 0.50 s in benchmarks/pod_startup.py)."""

    def __init__(self, api: KubeAPI, log) -> None:  # noqa: ANN001
        super().__init__(name="events", daemon=True)
        self.api = api
        self.log = log
        self.raised: collections.deque[float] = collections.deque()  # when the last second's Events were raised
        self.lock = threading.Lock()
        self.queue: queue.Queue[tuple[float, dict]] = queue.Queue(maxsize=1000)  # (when to post, event)
        self.start()

    def post(self, event: dict) -> None:
        with self.lock:
            now = time.monotonic()
            while self.raised and self.raised[0] < now - 1.0:
                self.raised.popleft()
            self.raised.append(now)
            burst = len(self.raised) > EVENT_BURST
        try:
            self.queue.put_nowait((now + (EVENT_DELAY if burst else 0.0), event))
        except queue.Full:
            self.log(f"event {event['reason']} dropped: too many waiting")

    def run(self) -> None:
        while True:
            due, event = self.queue.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                self.api.request("POST", f"/api/v1/namespaces/{event['metadata']['namespace']}/events", event)
            except APIError as exc:
                if exc.status not in (403, 404):  # the pod's namespace is being deleted (403) or gone (404)
                    self.log(f"event {event['reason']} for {event['involvedObject']['name']}: {exc}")
            except OSError as exc:
                self.log(f"event {event['reason']} for {event['involvedObject']['name']}: {exc}")
