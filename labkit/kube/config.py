"""Which cluster a notebook talks to, and one way of talking to it.

A lab runs unchanged in three places, and finds its cluster in this order:

1. **in-cluster**: on JupyterHub on Kubernetes the notebook's pod has a service
   account, and the trainee works in that account's namespace;
2. **kubeconfig**: ``$KUBECONFIG``, else ``~/.kube/config`` (``make lab`` and the
   graders point ``$KUBECONFIG`` at a sandbox);
3. **sandbox**: the local sandbox (``default``), started if it is not running.

``$LABKIT_CLUSTER`` chooses instead: ``in-cluster``, ``kubeconfig`` or
``sandbox`` (``sandbox:NAME`` for a named one).

Requests go through labkit's own small client (``labkit.kube.client``, which
the node agent uses too), so a kernel connects in milliseconds. Kubeconfigs are
read as kubectl reads them: the current context; certificate authorities, client
certificates and keys as files or inline data; bearer tokens and token files; and
exec credential plugins (the way cloud providers' kubeconfigs log in), run again
when their credential expires. API errors come back as ``labkit.kube.errors``
(``LabkitError``s) with the API server's own message.
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from labkit.errors import LabkitError
from labkit.kube.client import KubeAPI
from labkit.kube.errors import APIError, NotFound, Unreachable, with_hint
from labkit.paths import sandboxes_root

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

@dataclass
class Cluster:
    """A connected cluster: the client, where it came from, and how kubectl reaches it."""

    api: KubeAPI
    source: str  # "in-cluster", "kubeconfig" or "sandbox"
    description: str  # for people: which cluster this is
    kubeconfig: Path | None  # for kubectl (None in-cluster: kubectl finds the service account itself)
    namespace: str | None  # the namespace the credentials are for (a service account's, a context's)
    sandbox: str | None = None  # the local sandbox's name, when it is one
    _kubectl: str | None = field(default=None, repr=False)

    # -- requests --------------------------------------------------------------------------

    def send(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
             query: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:  # fmt: skip
        """One request, whatever its answer: (status, body). A cluster that does not answer raises Unreachable."""
        try:
            return self.api.send(method, path, body, content_type=content_type, query=query, timeout=timeout)
        except Unreachable as exc:
            raise Unreachable(exc.message, hint=self.unreachable_hint()) from None

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                query: dict[str, str] | None = None, timeout: float = 30) -> dict:  # fmt: skip
        """One API request; the decoded JSON answer. Refusals raise ``labkit.kube.errors``, with the server's message
        and a hint for the person at the notebook."""
        try:
            return self.api.request(method, path, body, content_type=content_type, query=query, timeout=timeout)
        except Unreachable as exc:
            raise Unreachable(exc.message, hint=self.unreachable_hint()) from None
        except APIError as exc:
            raise with_hint(exc) from None

    def get(self, path: str) -> dict | None:
        """The object at ``path``, None if there is none."""
        try:
            return self.request("GET", path)
        except NotFound:
            return None

    @property
    def server(self) -> str:
        return self.api.server

    def unreachable_hint(self) -> str:
        if self.sandbox:
            flag = "" if self.sandbox == "default" else f" --name {self.sandbox}"
            return (f"`labkit sandbox status{flag}` shows what runs; `labkit sandbox up{flag}` starts it again "
                    "(then run the lab's first cell again).")
        return "Check the cluster and your credentials with `kubectl cluster-info`."

    # -- the official client ---------------------------------------------------------------------

    def official_client(self) -> Any:
        """The official ``kubernetes`` Python client's ``ApiClient``, configured as this cluster is: the same
        service account in-cluster, the same kubeconfig (current context) elsewhere."""
        try:
            from kubernetes import client, config
        except ImportError:
            raise LabkitError("The official Kubernetes client is not installed here.",
                              hint="`pip install kubernetes` (`make setup` installs it).") from None  # fmt: skip
        if self.kubeconfig is None:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        try:
            return config.new_client_from_config(config_file=str(self.kubeconfig))
        except config.ConfigException as exc:
            raise LabkitError(f"The official client cannot use {self.kubeconfig}: {exc}") from None

    # -- kubectl ---------------------------------------------------------------------------

    def kubectl_command(self) -> list[str]:
        """kubectl, pointed at this cluster: the sandbox's pinned one if installed, else the one on PATH."""
        if self._kubectl is None:
            self._kubectl = _find_kubectl()
        command = [self._kubectl]
        if self.kubeconfig is not None:
            command.append(f"--kubeconfig={self.kubeconfig}")
        return command


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
        return in_cluster()
    path = _kubeconfig_path()
    if choice == "kubeconfig" or (not choice and path is not None):
        if path is None:
            raise LabkitError("LABKIT_CLUSTER=kubeconfig, but there is no kubeconfig ($KUBECONFIG is not set and "
                              "~/.kube/config does not exist).", hint="Set $KUBECONFIG to your cluster's kubeconfig.")  # fmt: skip
        return from_kubeconfig(path, sandbox=sandbox_of(path))
    if choice and not choice.startswith("sandbox"):
        raise LabkitError(f"LABKIT_CLUSTER={choice!r} is not a way to find a cluster.",
                          hint="Use in-cluster, kubeconfig, sandbox or sandbox:NAME (or leave it unset).")  # fmt: skip
    return sandbox_cluster(choice.partition(":")[2] or "default", say=say)


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT / "token").exists()


def _kubeconfig_path() -> Path | None:
    value = os.environ.get("KUBECONFIG", "").strip()
    if value:
        first = next((p for p in value.split(os.pathsep) if p), "")
        return Path(first).expanduser() if first else None
    default = Path.home() / ".kube" / "config"
    return default if default.exists() else None


def in_cluster() -> Cluster:
    """The cluster this pod runs in, as its service account (whose token rotates: read again each minute)."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (SERVICE_ACCOUNT / "token").exists():
        raise LabkitError("LABKIT_CLUSTER=in-cluster, but this is not a pod with a service account.")
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    token = _cached(lambda: ((SERVICE_ACCOUNT / "token").read_text().strip(), time.time() + 60))
    api = KubeAPI(server, SERVICE_ACCOUNT / "ca.crt", token=token)
    namespace_file = SERVICE_ACCOUNT / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else None
    return Cluster(api, "in-cluster", f"this Kubernetes cluster (service account in namespace {namespace})", None, namespace)


def from_kubeconfig(path: Path, *, sandbox: str | None = None, description: str | None = None,
                    source: str = "kubeconfig") -> Cluster:  # fmt: skip
    """The current context of the kubeconfig at ``path``."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise LabkitError(f"The kubeconfig {path} cannot be read: {exc.strerror}.",
                          hint="Set $KUBECONFIG to a kubeconfig that exists.") from None  # fmt: skip
    except yaml.YAMLError as exc:
        raise LabkitError(f"The kubeconfig {path} is not valid YAML: {exc}") from None
    try:
        name = document["current-context"]
        context = _named(document.get("contexts"), name, "context")
        cluster = _named(document.get("clusters"), context["cluster"], "cluster")
        user = _named(document.get("users"), context["user"], "user") if context.get("user") else {}
    except (KeyError, TypeError, ValueError) as exc:
        raise LabkitError(f"The kubeconfig {path} cannot be used: {exc}.",
                          hint="`kubectl config view` shows what is in it; it needs a current-context whose cluster "
                               "and user it defines.") from None  # fmt: skip
    api = _client(cluster, user, path.parent, f"the kubeconfig {path}")
    description = description or f"context {name!r} of {path} ({api.server})"
    return Cluster(api, source, description, path, context.get("namespace"), sandbox)


def _named(entries: Any, name: str, what: str) -> dict:
    for entry in entries or []:
        if entry.get("name") == name:
            return entry.get(what) or {}
    raise ValueError(f"it names {what} {name!r} but does not define it")


def _client(cluster: dict, user: dict, base: Path, where: str) -> KubeAPI:
    """A client for a kubeconfig's cluster and user entries (paths in it are relative to ``base``)."""
    if "server" not in cluster:
        raise LabkitError(f"{where}: its cluster has no server address.")
    if cluster.get("insecure-skip-tls-verify"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        authority = cluster.get("certificate-authority")
        data = cluster.get("certificate-authority-data")
        context = ssl.create_default_context(cafile=str(base / authority) if authority else None,
                                             cadata=base64.b64decode(data).decode() if data else None)  # fmt: skip
    token: Callable[[], str | None] | None = None
    if user.get("auth-provider"):
        provider = user["auth-provider"].get("name", "?")
        raise LabkitError(f"{where} logs in with the {provider!r} auth-provider, which labkit does not support.",
                          hint="Use a kubeconfig whose user logs in with a token, a client certificate or an exec "
                               "credential plugin (as current cloud kubeconfigs do).")  # fmt: skip
    if user.get("exec"):
        plugin = ExecPlugin(user["exec"], base)
        certificate = plugin.certificate()
        if certificate:
            context.load_cert_chain(*_files(*certificate))
        token = plugin.token
    certificate_file = _file_or_data(user, "client-certificate", base)
    key_file = _file_or_data(user, "client-key", base)
    if certificate_file and key_file:
        context.load_cert_chain(certificate_file, key_file)
    if user.get("token"):
        fixed = user["token"]
        token = lambda: fixed  # noqa: E731
    elif user.get("tokenFile"):
        token_file = base / user["tokenFile"]
        token = _cached(lambda: (token_file.read_text().strip(), time.time() + 60))
    return KubeAPI(cluster["server"], token=token, context=context)


def _file_or_data(user: dict, key: str, base: Path) -> str | None:
    if user.get(key):
        return str(base / user[key])
    if user.get(f"{key}-data"):
        return _files(base64.b64decode(user[f"{key}-data"]))[0]
    return None


_scratch: list[str] = []


def _files(*contents: bytes) -> list[str]:
    """Write credentials to private files (ssl loads certificates and keys from files only), removed at exit."""
    if not _scratch:
        _scratch.append(tempfile.mkdtemp(prefix="labkit-credentials-"))
        atexit.register(shutil.rmtree, _scratch[0], True)
    paths = []
    for content in contents:
        handle, path = tempfile.mkstemp(dir=_scratch[0])
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        paths.append(path)
    return paths


def _cached(fetch: Callable[[], tuple[str | None, float]]) -> Callable[[], str | None]:
    """A token from ``fetch`` (value, valid until), fetched again once it is no longer valid."""
    state: dict[str, Any] = {"value": None, "until": 0.0}
    lock = threading.Lock()

    def token() -> str | None:
        with lock:
            if time.time() >= state["until"]:
                state["value"], state["until"] = fetch()
            return state["value"]

    return token


class ExecPlugin:
    """A kubeconfig's exec credential plugin, run as kubectl runs it; its token is cached until it expires."""

    def __init__(self, spec: dict, base: Path) -> None:
        self.spec = spec
        command = spec.get("command", "")
        self.command = str(base / command) if "/" in command and not os.path.isabs(command) else command
        self.token = _cached(self._token)
        self._status: dict | None = None

    def _run(self) -> dict:
        env = {**os.environ, **{e["name"]: e["value"] for e in self.spec.get("env") or []}}
        env["KUBERNETES_EXEC_INFO"] = json.dumps({"apiVersion": self.spec.get("apiVersion", ""), "kind": "ExecCredential",
                                                  "spec": {"interactive": False}})  # fmt: skip
        try:
            done = subprocess.run([self.command, *(self.spec.get("args") or [])], capture_output=True, text=True,
                                  env=env, timeout=60)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LabkitError(f"The kubeconfig's credential plugin {self.command!r} could not run: {exc}.",
                              hint=self.spec.get("installHint") or "Install it, or log in again.") from None  # fmt: skip
        if done.returncode != 0:
            raise LabkitError(f"The kubeconfig's credential plugin {self.command!r} failed: "
                              f"{done.stderr.strip()[-500:] or done.returncode}", hint="Log in again, then rerun the cell.")  # fmt: skip
        try:
            return json.loads(done.stdout).get("status") or {}
        except ValueError:
            raise LabkitError(f"The kubeconfig's credential plugin {self.command!r} printed no ExecCredential.") from None

    def _token(self) -> tuple[str | None, float]:
        status = self._status if self._status is not None else self._run()
        self._status = None
        expires = status.get("expirationTimestamp")
        until = dt.datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() - 30 if expires else float("inf")
        return status.get("token"), until

    def certificate(self) -> tuple[bytes, bytes] | None:
        """The client certificate and key the plugin gives, if it gives one (kept for the first token)."""
        self._status = self._run()
        certificate, key = self._status.get("clientCertificateData"), self._status.get("clientKeyData")
        return (certificate.encode(), key.encode()) if certificate and key else None


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
    return from_kubeconfig(sandbox.state.kubeconfig, sandbox=name, description=description, source="sandbox")


def sandbox_of(path: Path | None) -> str | None:
    """The local sandbox whose kubeconfig ``path`` is, if it is one (graders point $KUBECONFIG at one)."""
    if path is None:
        return None
    try:
        relative = path.resolve().relative_to(sandboxes_root().resolve())
    except ValueError:
        return None
    return relative.parts[0] if len(relative.parts) == 2 and relative.parts[1] == "kubeconfig" else None
