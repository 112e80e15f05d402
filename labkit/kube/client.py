"""A very small Kubernetes API client, for labkit's own processes and for notebooks.

The node agent speaks to the API server as each of its nodes (``system:node:NAME``),
so that the Node authorizer and the NodeRestriction admission plugin judge it
exactly as they judge a kubelet; a lab notebook speaks to it with whatever its
kubeconfig or service account gives (``labkit.kube.config``). Both need a handful of
JSON requests and watches, which this does with the standard library: the agent's
memory stays small, and a notebook's kernel starts without importing a large
generated client. Refusals raise ``labkit.kube.errors``, told apart by the API's
reason; a server that does not answer raises ``Unreachable``.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from labkit.kube.errors import NotFound, Unreachable, api_error

STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply
MERGE_PATCH = "application/merge-patch+json"


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
            return self._new_connection(timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _new_connection(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.context)

    def _drop_idle(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

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
        """One request, whatever the answer: its status and body. A kept-alive connection the server had closed
        (it closes idle ones after a while) is retried once, on a new connection: the other idle ones are as old,
        and are dropped too."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = self.headers("application/json, */*")
        if data is not None:
            headers["Content-Type"] = content_type
        target = self.prefix + self._target(path, query)
        for attempt in (1, 2):
            conn = self._connection(timeout) if attempt == 1 else self._new_connection(timeout)
            try:
                conn.request(method, target, body=data, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                break
            except (http.client.HTTPException, ConnectionError, ssl.SSLError) as exc:
                conn.close()
                self._drop_idle()
                if attempt == 2:
                    raise Unreachable(f"The API server at {self.server} does not answer ({method} {path}: {exc}).") from exc
            except OSError as exc:
                conn.close()
                raise Unreachable(f"The API server at {self.server} does not answer ({method} {path}: {exc}).") from exc
        self._release(conn)
        return response.status, answer

    def request(
        self, method: str, path: str, body: dict | None = None, *, content_type: str = "application/json",
        query: dict[str, str] | None = None, timeout: float = 10.0,
    ) -> dict:  # fmt: skip
        """One API request; the decoded JSON answer. A refusal raises the error its reason names."""
        status, answer = self.send(method, path, body, content_type=content_type, query=query, timeout=timeout)
        if status >= 400:
            raise api_error(status, answer)
        return json.loads(answer) if answer else {}

    def stream(self, path: str, timeout: float = 90.0, query: dict[str, str] | None = None) -> Iterator[dict]:
        """The events of a watch request, one JSON object per line, until the server ends it."""
        request = urllib.request.Request(self.server + self._target(path, query), method="GET",
                                         headers=self.headers())  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.context) as response:
                for line in response:
                    if line.strip():
                        yield json.loads(line)
        except urllib.error.HTTPError as exc:
            raise api_error(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, Unreachable):
                raise
            raise Unreachable(f"The API server at {self.server} does not answer ({path}: {getattr(exc, 'reason', exc)}).") from None

    def get(self, path: str) -> dict | None:
        """The object at ``path``, or None if it does not exist."""
        try:
            return self.request("GET", path)
        except NotFound:
            return None
