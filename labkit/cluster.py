"""Which cluster a notebook talks to, and one way of talking to it.

A lab runs unchanged in three places, and finds its cluster in this order:

1. **in-cluster**: on JupyterHub on Kubernetes the notebook's pod has a service
   account, and the trainee works in that account's namespace;
2. **kubeconfig**: ``$KUBECONFIG``, else ``~/.kube/config`` (``make lab`` and the
   graders point ``$KUBECONFIG`` at a sandbox);
3. **sandbox**: the local sandbox (``default``), started if it is not running.

``$LABKIT_CLUSTER`` chooses instead: ``in-cluster``, ``kubeconfig`` or
``sandbox`` (``sandbox:NAME`` for a named one). Every request goes through the
official Kubernetes Python client, so every way of authenticating a kubeconfig
allows (certificates, tokens, exec plugins) works; API errors come back as
``LabkitError`` with the API server's own message.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from labkit.errors import LabkitError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class APIError(LabkitError):
    """A request the API server refused, with its own message (``status``: the HTTP status)."""

    def __init__(self, status: int, message: str, reason: str = "", hint: str | None = None) -> None:
        self.status = status
        self.reason = reason
        super().__init__(message, hint=hint)


@dataclass
class Cluster:
    """A connected cluster: the client, where it came from, and how kubectl reaches it."""

    api: Any  # kubernetes.client.ApiClient
    source: str  # "in-cluster", "kubeconfig" or "sandbox"
    description: str  # for people: which cluster this is
    kubeconfig: Path | None  # for kubectl (None in-cluster: kubectl finds the service account itself)
    namespace: str | None  # the namespace the credentials are for (a service account's, a context's)
    sandbox: str | None = None  # the local sandbox's name, when it is one
    _kubectl: str | None = field(default=None, repr=False)

    # -- requests --------------------------------------------------------------------------

    def send(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
             query: dict[str, str] | None = None, timeout: float = 30) -> Any:  # fmt: skip
        """One request, whatever its answer: the client's response (``status``, ``read()``, and
        ``response`` to stream). A cluster that does not answer is a LabkitError."""
        from urllib3.exceptions import HTTPError

        _, url, headers, data, _ = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), body=body,
            header_params={"Content-Type": content_type, "Accept": "application/json"}, auth_settings=["BearerToken"],
        )  # fmt: skip
        try:
            return self.api.call_api(method, url, header_params=headers, body=data, _request_timeout=timeout)
        except HTTPError as exc:
            raise LabkitError(f"The cluster at {self.server} does not answer ({exc}).", hint=self.unreachable_hint()) from None

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                query: dict[str, str] | None = None, timeout: float = 30) -> dict:  # fmt: skip
        """One API request; the decoded JSON answer. Refusals raise APIError with the server's message."""
        response = self.send(method, path, body, content_type=content_type, query=query, timeout=timeout)
        data = response.read()
        if response.status >= 400:
            raise api_error(response.status, data)
        return json.loads(data) if data else {}

    def get(self, path: str) -> dict | None:
        """The object at ``path``, None if there is none."""
        try:
            return self.request("GET", path)
        except APIError as exc:
            if exc.status == 404:
                return None
            raise

    def stream(self, path: str, query: dict[str, str], timeout: float = 60):  # noqa: ANN201 - a generator of events
        """The events of a watch (``watch=true`` is added), as decoded JSON, until the server ends it."""
        response = self.send("GET", path, query={**query, "watch": "true"}, timeout=timeout)
        if response.status >= 400:
            raise api_error(response.status, response.read())
        raw = response.response
        try:
            buffer = b""
            for chunk in raw.stream(4096):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            raw.release_conn()

    @property
    def server(self) -> str:
        return self.api.configuration.host

    def unreachable_hint(self) -> str:
        if self.sandbox:
            flag = "" if self.sandbox == "default" else f" --name {self.sandbox}"
            return (f"`labkit sandbox status{flag}` shows what runs; `labkit sandbox up{flag}` starts it again "
                    "(then run the lab's first cell again).")
        return "Check the cluster and your credentials with `kubectl cluster-info`."

    # -- kubectl ---------------------------------------------------------------------------

    def kubectl_command(self) -> list[str]:
        """kubectl, pointed at this cluster: the sandbox's pinned one if installed, else the one on PATH."""
        if self._kubectl is None:
            self._kubectl = _find_kubectl()
        command = [self._kubectl]
        if self.kubeconfig is not None:
            command.append(f"--kubeconfig={self.kubeconfig}")
        return command


def api_error(status: int, body: str | bytes) -> APIError:
    """The API server's refusal as one message (its ``Status.message``), with a hint where one helps."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = {}
    message = parsed.get("message") or text.strip() or f"HTTP {status}"
    reason = parsed.get("reason", "")
    hint = None
    if status == 403:
        hint = "Your credentials do not allow this here. Labs only act inside the lab's own namespace."
    elif status == 401:
        hint = "The cluster did not accept your credentials; they may have expired. Log in again, then rerun the cell."
    return APIError(status, message, reason, hint)


def _find_kubectl() -> str:
    try:
        from labkit.sandbox import binaries

        return str(binaries.toolset()["kubectl"])
    except LabkitError:
        found = shutil.which("kubectl")
        if found:
            return found
    raise LabkitError("kubectl is not installed here.",
                      hint="Run `labkit sandbox install` (or `make setup`), or install kubectl on your PATH.")  # fmt: skip


# ------------------------------------------------------------------------------------ finding it


def connect(*, say: Callable[[str], None] = print) -> Cluster:
    """The cluster this notebook should use (see the module's docstring for the order)."""
    choice = os.environ.get("LABKIT_CLUSTER", "").strip()
    if choice == "in-cluster" or (not choice and _in_cluster()):
        return _in_cluster_cluster()
    kubeconfig = _kubeconfig_path()
    if choice == "kubeconfig" or (not choice and kubeconfig is not None):
        if kubeconfig is None:
            raise LabkitError("LABKIT_CLUSTER=kubeconfig, but there is no kubeconfig ($KUBECONFIG is not set and "
                              "~/.kube/config does not exist).", hint="Set $KUBECONFIG to your cluster's kubeconfig.")  # fmt: skip
        return _kubeconfig_cluster(kubeconfig)
    if choice and not choice.startswith("sandbox"):
        raise LabkitError(f"LABKIT_CLUSTER={choice!r} is not a way to find a cluster.",
                          hint="Use in-cluster, kubeconfig, sandbox or sandbox:NAME (or leave it unset).")  # fmt: skip
    name = choice.partition(":")[2] or "default"
    return sandbox_cluster(name, say=say)


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT / "token").exists()


def _kubeconfig_path() -> Path | None:
    value = os.environ.get("KUBECONFIG", "").strip()
    if value:
        first = next((p for p in value.split(os.pathsep) if p), "")
        return Path(first).expanduser() if first else None
    default = Path.home() / ".kube" / "config"
    return default if default.exists() else None


def _in_cluster_cluster() -> Cluster:
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as exc:
        raise LabkitError(f"This looks like a pod on Kubernetes, but its service account cannot be used ({exc}).",
                          hint="Ask your instructor to check the notebook server's service account.") from None  # fmt: skip
    namespace_file = SERVICE_ACCOUNT / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else None
    return Cluster(client.ApiClient(configuration), "in-cluster",
                   f"this Kubernetes cluster (service account in namespace {namespace})", None, namespace)  # fmt: skip


def _kubeconfig_cluster(path: Path, sandbox: str | None = None, description: str | None = None) -> Cluster:
    from kubernetes import client, config

    if not path.exists():
        raise LabkitError(f"The kubeconfig {path} does not exist.", hint="Set $KUBECONFIG to a kubeconfig that does.")
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=str(path), client_configuration=configuration)
        _, context = config.list_kube_config_contexts(config_file=str(path))
    except (config.ConfigException, ValueError, TypeError, OSError) as exc:
        raise LabkitError(f"The kubeconfig {path} cannot be used: {exc}",
                          hint="`kubectl config view` shows what is in it.") from None  # fmt: skip
    namespace = (context or {}).get("context", {}).get("namespace")
    name = (context or {}).get("name", "?")
    return Cluster(client.ApiClient(configuration), "sandbox" if sandbox else "kubeconfig",
                   description or f"context {name!r} of {path} ({configuration.host})", path, namespace, sandbox)  # fmt: skip


def sandbox_cluster(name: str = "default", *, say: Callable[[str], None] = print) -> Cluster:
    """The local sandbox ``name``, started (with its default three nodes) if it is not running."""
    from labkit.sandbox.controlplane import Sandbox

    sandbox = Sandbox(name)
    config = sandbox.state.load()
    if config is None or not sandbox.state.supervisor_pid():
        say(f"Starting the local sandbox {name!r} (a minute the first time; seconds after that)...")
    config = sandbox.up(say=say if config is None else (lambda _: None))
    versions = config.get("versions", {})
    kube = next((v for k, v in versions.items() if "kubernetes" in k), "")
    description = f"the local sandbox {name!r} (Kubernetes {kube}, {config.get('nodes', 0)} nodes)"
    return _kubeconfig_cluster(sandbox.state.kubeconfig, sandbox=name, description=description)


def sandbox_of(path: Path | None) -> str | None:
    """The local sandbox whose kubeconfig ``path`` is, if it is one (graders point $KUBECONFIG at one)."""
    if path is None:
        return None
    from labkit.sandbox.state import sandboxes_root

    try:
        relative = path.resolve().relative_to(sandboxes_root().resolve())
    except ValueError:
        return None
    return relative.parts[0] if len(relative.parts) == 2 and relative.parts[1] == "kubeconfig" else None
