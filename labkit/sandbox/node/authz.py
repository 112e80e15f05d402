"""Who calls a node's kubelet API, and whether they may: the kubelet's webhook authentication and authorization.

As a kubelet run with ``--authentication-token-webhook`` and ``--authorization-mode=Webhook``:

* **who**: a client certificate the cluster CA signed (user = its CN, groups = its O), or a bearer token
  the API server vouches for in a ``TokenReview``; neither is 401;
* **may they**: a ``SubjectAccessReview`` of what the request means. For the kubelet's own paths, the node
  itself: ``nodes/proxy`` (``/containerLogs``, ``/healthz``...), ``nodes/metrics`` or ``nodes/stats`` (with
  ``proxy`` as the fallback the kubelet allows). For labkit's own paths, what the API server would ask for
  the same request: ``pods/proxy`` on the pod (``/labkit/proxy/NS/POD/PORT/...``), ``services/proxy`` on the
  Service (``/labkit/forward/NS/SVC/PORT``); the network faults are ``nodes/proxy``. Refused is 403, in the
  kubelet's words.

The API server's kubelet client and ``system:masters`` are let through without asking, as the default RBAC
policy would answer. Answers are kept as the kubelet keeps them: tokens 2 minutes; allowed 5 minutes,
refused 30 seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from labkit.kube.client import KubeAPI
from labkit.kube.errors import APIError

APISERVER_CLIENT = "kube-apiserver-kubelet-client"
ADMIN_GROUP = "system:masters"
TOKEN_TTL, ALLOWED_TTL, REFUSED_TTL = 120.0, 300.0, 30.0
VERBS = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Access:
    """What a request asks to do, as a SubjectAccessReview's resource attributes (the first that allows, wins)."""

    verb: str
    resource: str
    subresources: tuple[str, ...]
    name: str
    namespace: str = ""
    group: str = ""

    def reviews(self) -> list[dict]:
        return [{"verb": self.verb, "resource": self.resource, "subresource": sub, "name": self.name,
                 "namespace": self.namespace, "group": self.group, "version": "v1"}
                for sub in self.subresources]  # fmt: skip

    def refusal(self, who: Identity) -> str:
        return (f"Forbidden (user={who.user}, verb={self.verb}, resource={self.resource}, "
                f"subresource(s)=[{' '.join(self.subresources)}])\n")  # fmt: skip


def access(method: str, path: str, node: str) -> Access:
    """What ``method path`` on ``node``'s kubelet API asks to do (see the module's docstring)."""
    verb = VERBS.get(method, method.lower())
    parts = path.split("/")
    if path.startswith("/labkit/proxy/") and len(parts) >= 5:
        return Access(verb, "pods", ("proxy",), parts[4], parts[3])
    if path.startswith("/labkit/forward/") and len(parts) >= 5:
        return Access(verb, "services", ("proxy",), parts[4], parts[3])
    if path.startswith("/metrics"):
        return Access(verb, "nodes", ("metrics", "proxy"), node)
    if path.startswith("/stats"):
        return Access(verb, "nodes", ("stats", "proxy"), node)
    if path.startswith("/healthz"):
        return Access(verb, "nodes", ("healthz", "proxy"), node)
    return Access(verb, "nodes", ("proxy",), node)


@dataclass
class Gate:
    """The node's gate: identities and decisions, asked of the API server as the node, and kept a while."""

    api: KubeAPI | None  # the node's own client; None: only certificates of the trusted few get in
    tokens: dict[str, tuple[float, Identity | None]] = field(default_factory=dict)
    decisions: dict[tuple[Identity, Access], tuple[float, bool]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def identify(self, certificate: dict | None, authorization: str | None) -> Identity | None:
        """Who is calling: the verified client certificate's subject, else the bearer token's user; None: nobody."""
        if certificate:
            names = [(key, value) for rdn in certificate.get("subject", ()) for key, value in rdn]
            user = next((value for key, value in names if key == "commonName"), "")
            return Identity(user, tuple(value for key, value in names if key == "organizationName"))
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip() or self.api is None:
            return None
        return self._reviewed(token.strip())

    def allows(self, who: Identity, wanted: Access) -> bool:
        if who.user == APISERVER_CLIENT or ADMIN_GROUP in who.groups:
            return True
        if self.api is None:
            return False
        key = (who, wanted)
        with self.lock:
            kept = self.decisions.get(key)
        if kept and kept[0] > time.monotonic():
            return kept[1]
        allowed = any(self._review(who, attributes) for attributes in wanted.reviews())
        with self.lock:
            self.decisions[key] = (time.monotonic() + (ALLOWED_TTL if allowed else REFUSED_TTL), allowed)
        return allowed

    def _reviewed(self, token: str) -> Identity | None:
        with self.lock:
            kept = self.tokens.get(token)
        if kept and kept[0] > time.monotonic():
            return kept[1]
        try:
            status = self.api.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews",
                                      {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                       "spec": {"token": token}}).get("status") or {}  # fmt: skip
        except (OSError, APIError):
            return None  # the API server is away (or refuses the node): nobody is let in meanwhile
        user = status.get("user") or {}
        who = Identity(user.get("username", ""), tuple(user.get("groups") or ()), user.get("uid", ""),
                       tuple(sorted((k, tuple(v)) for k, v in (user.get("extra") or {}).items()))) \
            if status.get("authenticated") else None  # fmt: skip
        with self.lock:
            self.tokens[token] = (time.monotonic() + TOKEN_TTL, who)
        return who

    def _review(self, who: Identity, attributes: dict) -> bool:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": who.user, "groups": list(who.groups), "uid": who.uid,
                           "extra": {k: list(v) for k, v in who.extra}, "resourceAttributes": attributes}}  # fmt: skip
        try:
            answer = self.api.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        except (OSError, APIError):
            return False
        return bool((answer.get("status") or {}).get("allowed"))
