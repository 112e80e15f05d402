"""Reaching what runs in the lab: a pod's HTTP port (``lab.http``), a Service from this machine
(``lab.service_url``), and the sandbox's node agent, which serves labkit's own endpoints."""

from __future__ import annotations

import json as _json  # `json` is also lab.http's argument, as in requests
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit import readiness
from labkit.errors import LabkitError

if TYPE_CHECKING:
    from labkit.lab.context import LabContext


@dataclass
class Response:
    """A pod's answer to ``Lab.http``."""

    status: int
    text: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    def json(self) -> Any:
        return _json.loads(self.text)

    def __repr__(self) -> str:
        return f"<Response {self.status}: {self.text[:200]!r}>"


class Reach:
    """``lab.http`` and ``lab.service_url``; ``agent`` for the parts that talk to the sandbox's node agent."""

    def __init__(self, lab: LabContext) -> None:
        self.lab = lab
        self._agent_node: dict | None | bool = False  # not looked for yet

    def http(self, target: str, path: str = "/", *, method: str = "GET", json: Any = None, data: str | bytes | None = None,
             port: int | None = None, timeout: float = 10) -> Response:  # fmt: skip
        """An HTTP request (GET unless ``method`` says otherwise) for ``path`` on a ready pod of ``target``
        (``deployment/web``, ``pod/web-abc``, or a pod's name), on ``port`` (default: the pod's first declared
        container port). ``json`` sends a value as JSON, ``data`` text or bytes as they are."""
        method = method.upper()
        if method not in ("GET", "POST", "PUT", "DELETE"):
            raise LabkitError(f"lab.http sends GET, POST, PUT or DELETE, not {method}.")
        if json is not None and data is not None:
            raise LabkitError("Give lab.http either json= or data=, not both.")
        body, content_type = None, "application/json"
        if json is not None:
            body = _json.dumps(json).encode()
        elif data is not None:
            body, content_type = (data.encode() if isinstance(data, str) else data), "application/octet-stream"
        pods = self.lab.pods_of(target)
        # As a Service would: ready pods that are not shutting down.
        ready = [p for p in pods if readiness.condition(p, "Ready").get("status") == "True"
                 and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        if not ready:
            raise LabkitError(f"{target} has no ready pod to answer." + (" It has no pods." if not pods else ""),
                              hint=f"`lab.wait_ready({target!r})` waits for one.")  # fmt: skip
        pod = ready[0]
        if port is None:
            ports = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
            if not ports:
                raise LabkitError(f"Pod {pod['metadata']['name']} declares no container port.",
                                  hint=f"Say which: `lab.http({target!r}, {path!r}, port=8080)`.")  # fmt: skip
            port = ports[0]
        meta = pod["metadata"]
        if self.sandbox_node(required=False):  # through the pod's own node, which runs it
            node = self.lab.cluster.get(f"/api/v1/nodes/{pod['spec']['nodeName']}")
            return self.agent(method, f"/labkit/proxy/{meta['namespace']}/{meta['name']}/{port}/{path.lstrip('/')}",
                               body, content_type=content_type, timeout=timeout, node=node)  # fmt: skip
        # elsewhere through the API server's pods/proxy, as on any real cluster
        api_path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}:{port}/proxy/{path.lstrip('/')}"
        status, answer = self.lab.cluster.send(method, api_path, body, content_type=content_type, timeout=timeout)
        return Response(status, answer.decode(errors="replace"))

    def sandbox_node(self, required: bool = True) -> dict | None:
        """A ready node of the local sandbox (whose agent serves labkit's own endpoints), or None elsewhere."""
        if self._agent_node is False:
            try:
                nodes = self.lab.nodes()
            except LabkitError:
                nodes = []
            self._agent_node = next((n for n in nodes if n["status"].get("nodeInfo", {}).get(
                "containerRuntimeVersion", "").startswith("labkit://")
                and readiness.condition(n, "Ready").get("status") == "True"), None)  # fmt: skip
        if self._agent_node is None and required:
            raise LabkitError("This works on the local sandbox only, whose node agent does it.",
                              hint="On another cluster, use the cluster's own tools (kubectl port-forward; Chaos Mesh "
                                   "for faults).")  # fmt: skip
        return self._agent_node

    def agent(self, method: str, path: str, body: dict | bytes | None = None, *, content_type: str = "application/json",
               timeout: float = 10, node: dict | None = None) -> Response:  # fmt: skip
        """A request to the sandbox's node agent, through the kubelet API of ``node`` (default: any; its serving
        certificate is the cluster CA's, for 127.0.0.1; the lab's credentials are the admin's)."""
        node = node or self.sandbox_node()
        endpoint = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        data = _json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"https://127.0.0.1:{endpoint}{path}", data=data, method=method,
                                         headers={**self.lab.cluster.api.headers("*/*"), "Content-Type": content_type})  # fmt: skip
        try:
            with urllib.request.urlopen(request, context=self.lab.cluster.api.context, timeout=timeout) as answer:
                return Response(answer.status, answer.read().decode(errors="replace"), dict(answer.headers))
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.read().decode(errors="replace"), dict(exc.headers or {}))
        except (urllib.error.URLError, OSError) as exc:
            raise LabkitError(f"The sandbox's node agent could not be reached: {getattr(exc, 'reason', exc)}.",
                              hint=self.lab.cluster.unreachable_hint()) from None  # fmt: skip

    def service_url(self, name: str, port: int | None = None) -> str:
        """A URL this notebook can use to reach Service ``name`` (on ``port``, default its first): in the
        sandbox a forward on this machine's loopback; on JupyterHub in the cluster, its DNS name."""
        service = self.lab.get(f"service/{name}")
        if service is None:
            raise LabkitError(f"There is no service/{name} in the lab's namespace {self.lab.namespace}.")
        ports = service["spec"].get("ports", [])
        port = port or (ports[0]["port"] if ports else None)
        if port is None:
            raise LabkitError(f"Service {name} has no ports.")
        if self.lab.cluster.source == "in-cluster":
            return f"http://{name}.{self.lab.namespace}.svc.cluster.local:{port}"
        answer = self.agent("GET", f"/labkit/forward/{self.lab.namespace}/{name}/{port}")
        if not answer.ok:
            raise LabkitError(f"Service {name} cannot be reached from here: {answer.text.strip()}")
        return f"http://127.0.0.1:{answer.json()['port']}"
