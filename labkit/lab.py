"""A lab: one run of one lab notebook, in a namespace of its own, on whichever cluster is at hand.

``start_lab("01-deploy-and-scale")`` connects (see ``labkit.cluster``), makes a
fresh namespace for this run and returns the ``Lab`` that every later cell uses:
``apply`` manifests, ``wait_ready`` for rollouts with a live status line, run
real ``kubectl`` in the lab's namespace, read ``events`` as a timeline, reach a
pod's HTTP port with ``http``, and watch nodes and pods in a live ``view``.

Running the first cell again is harmless: the lab carries on in its namespace.
The namespace goes when the lab is closed or the kernel exits, so every run
(a trainee's, or nbgrader's re-execution of a submission) starts from nothing
and builds what it is graded on. Where the credentials may not create
namespaces (a trainee's service account on JupyterHub), the lab works in the
account's own namespace and removes what it made, by label, instead.
"""

from __future__ import annotations

import atexit
import copy
import datetime as dt
import difflib
import json as _json  # `json` is also lab.http's argument, as in requests
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from labkit import display, manifests, readiness, scorecard
from labkit.chaos import Chaos
from labkit.cluster import APPLY_PATCH, MERGE_PATCH, APIError, Cluster, connect
from labkit.errors import LabkitError
from labkit.recovery import Measurement, Recovery, timeline, workload_steady
from labkit.sandbox.node.quantity import rate_bits

LAB_LABEL = "labkit.io/lab"
RUN_LABEL = "labkit.io/run"
LOST_NODES = "labkit.io/lost-nodes"  # sandbox nodes a lab stopped, for the sweep after a killed kernel
OWNER = "labkit.io/owner"  # host:pid:start of the kernel that made a namespace, so a dead one's can be swept
FIELD_MANAGER = "labkit"
DEFAULT_TIMEOUT = 120.0
# kubectl verbs that change the cluster: a trainee's action, for time-to-recover figures
WRITING_VERBS = {"apply", "create", "delete", "edit", "patch", "replace", "scale", "autoscale", "set", "label",
                 "annotate", "rollout", "cordon", "uncordon", "drain", "taint", "expose", "run"}  # fmt: skip
VALUED_FLAGS = {"-n", "--namespace", "-l", "--selector", "-o", "--output", "-f", "--filename", "-c", "--container",
                "--context", "--kubeconfig"}  # fmt: skip

_labs: dict[str, Lab] = {}


def start_lab(lab_id: str, *, fresh: bool = False, cluster: Cluster | None = None) -> Lab:
    """Begin (or carry on with) lab ``lab_id`` in this kernel; ``fresh=True`` starts over in a new namespace."""
    scorecard.install()
    lab = _labs.get(lab_id)
    if lab is not None and not lab.closed and not fresh:
        if lab.namespace_alive():
            lab.say(f"Lab {lab_id} goes on in namespace {lab.namespace} on {lab.cluster.description}.")
            return lab
        lab.say(f"The lab's namespace {lab.namespace} is gone (deleted); starting again in a new one.")
    if lab is not None:
        lab.close(quiet=True)
    lab = Lab(lab_id, cluster or connect())
    _labs[lab_id] = lab
    return lab


def slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return slug[:45].strip("-") or "lab"


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


class Output(str):
    """kubectl's output, already shown: a cell that ends with it does not show it twice."""

    def _ipython_display_(self) -> None:
        pass


class Applied(list):
    """The names ``apply`` applied, already said: a cell that ends with it does not show them twice."""

    def _ipython_display_(self) -> None:
        pass


class NetworkFault:
    """A fault a lab injected into the sandbox's pod network; ``remove()`` ends it."""

    def __init__(self, lab: Lab, description: dict, what: str) -> None:
        self.lab = lab
        self.id = description["id"]
        self.description = description
        self.what = what

    def remove(self, quiet: bool = False) -> None:
        if self.lab.faults.pop(self.id, None) is None:
            return
        answer = self.lab._agent("DELETE", f"/labkit/faults/{self.id}")
        if not quiet:
            self.lab.say(f"fault {self.id} removed ({self.what})" if answer.ok else f"fault {self.id} was already gone")

    def __repr__(self) -> str:
        return f"<fault {self.id}: {self.what}>"


def _rate(rate: str | float) -> float:
    """Bits a second from ``"1mbit"``, ``"500kbit"``, ``"1mbps"`` (bytes) or a number."""
    if isinstance(rate, (int, float)):
        return float(rate)
    try:
        return rate_bits(rate)
    except ValueError as exc:
        raise LabkitError(str(exc), hint='Write it as tc does: "1mbit", "500kbit", "2gbit".') from None


class Lab:
    """One run of a lab (see the module's docstring)."""

    def __init__(self, lab_id: str, cluster: Cluster) -> None:
        self.id = lab_id
        self.slug = slug(lab_id)
        self.cluster = cluster
        self.kinds = manifests.Kinds(cluster)
        self.run_id = secrets.token_hex(3)
        self.closed = False
        self.shared = False  # True: working in a namespace this lab did not make
        self.grading = os.environ.get("LABKIT_GRADER") == "1"  # the grader's kernel (labkit.course.execute)
        self.applied: set[manifests.Kind] = set()
        self.views: list[Any] = []
        self.faults: dict[str, NetworkFault] = {}
        self.actions: list[float] = []  # when the trainee changed something (time.time()), for recovery figures
        self.recoveries: list[Recovery] = []
        self.lost_nodes: set[str] = set()
        self._chaos: Chaos | None = None
        self._api_client: Any = None
        self.namespace = self._make_namespace()
        atexit.register(self.close, quiet=True)
        where = "its own namespace" if not self.shared else "your namespace"
        self.say(f"Lab {lab_id}: connected to {cluster.description}; working in {where} {self.namespace}.")

    # -- the namespace ----------------------------------------------------------------------

    def _make_namespace(self) -> str:
        given = os.environ.get("LABKIT_NAMESPACE", "").strip()
        if given:  # a namespace made for this run (a grading run's): work in it, as in a trainee's own
            if self.cluster.get(f"/api/v1/namespaces/{given}") is None:
                raise LabkitError(f"$LABKIT_NAMESPACE names {given}, which does not exist.",
                                  hint="Unset it to let the lab make a namespace of its own.")  # fmt: skip
            self.shared = True
            return given
        self._sweep_dead_kernels()
        name = f"{self.slug}-{self.run_id}"
        body = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {LAB_LABEL: self.slug, RUN_LABEL: self.run_id},
                             "annotations": {OWNER: _owner()}}}  # fmt: skip
        try:
            self.cluster.request("POST", "/api/v1/namespaces", body)
        except APIError as exc:
            if exc.status != 403 or not self.cluster.namespace:
                raise LabkitError(f"Cannot create the lab's namespace: {exc.message}", hint=exc.hint) from None
            self.shared = True  # a trainee's service account: its own namespace, cleaned by label
            return self.cluster.namespace
        # Pods are refused until the namespace's controller has made its default ServiceAccount.
        deadline = time.monotonic() + 30
        while self.cluster.get(f"/api/v1/namespaces/{name}/serviceaccounts/default") is None:
            if time.monotonic() > deadline:
                raise LabkitError(f"The namespace {name} got no default ServiceAccount within 30 s.",
                                  hint="The cluster's controller manager may be down: `kubectl get --raw /readyz`.")  # fmt: skip
            time.sleep(0.02)
        return name

    def _sweep_dead_kernels(self) -> None:
        """Delete lab namespaces that kernels on this machine made and could not remove (they were killed)."""
        try:
            listing = self.cluster.request("GET", "/api/v1/namespaces", query={"labelSelector": LAB_LABEL})
        except LabkitError:
            return  # not allowed to list namespaces: nothing of ours to sweep
        host = socket.gethostname()
        for ns in listing.get("items", []):
            meta = ns["metadata"]
            owner = (meta.get("annotations") or {}).get(OWNER, "")
            if owner.startswith(host + ":") and not _owner_alive(owner) and "deletionTimestamp" not in meta:
                try:
                    self.cluster.request("DELETE", f"/api/v1/namespaces/{meta['name']}")
                    lost = (meta.get("annotations") or {}).get(LOST_NODES, "")
                    if lost and self.cluster.sandbox:  # nodes that kernel stopped come back
                        for node in lost.split(","):
                            self._local_sandbox().set_node_running(node, True, say=lambda _: None)
                except LabkitError:
                    pass

    def namespace_alive(self) -> bool:
        ns = self.cluster.get(f"/api/v1/namespaces/{self.namespace}")
        return ns is not None and "deletionTimestamp" not in ns["metadata"]

    def close(self, quiet: bool = False) -> None:
        """End the lab: its watches stop and its namespace (or, in a shared one, what it made) is deleted."""
        if self.closed:
            return
        self.closed = True
        for view in self.views:
            view.stop()
        try:
            for fault in list(self.faults.values()):
                fault.remove(quiet=True)
            for node in list(self.lost_nodes):
                self.restore_node(node, quiet=True)
        except LabkitError:
            pass
        try:
            if self._chaos is not None and self.shared:  # in its own namespace they go with it
                for experiment in list(self._chaos.experiments.values()):
                    self.cluster.request("DELETE", experiment.path)
            if not self.shared:
                self.cluster.request("DELETE", f"/api/v1/namespaces/{self.namespace}")
            elif not self.grading:  # the grader's lab leaves the objects: the run's namespace goes with them
                for kind in self.applied:
                    self.cluster.request("DELETE", kind.path(self.namespace), query={"labelSelector": f"{RUN_LABEL}={self.run_id}"})
        except LabkitError:
            pass  # already gone, or the cluster is: nothing left to clean
        if not quiet:
            scorecard.show()
            self.say(f"Lab {self.id} closed; {'namespace ' + self.namespace if not self.shared else 'what it made'} is being deleted.")

    # -- requests, with the lab's own explanations ------------------------------------------

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> dict:
        """An API request; a refusal because the lab's namespace is gone says so, and what to do."""
        if self.closed:
            raise LabkitError(f"Lab {self.id} is closed.", hint=f"Run `lab = labkit.start_lab({self.id!r})` to start it again.")
        try:
            return self.cluster.request(method, path, body, **options)
        except APIError as exc:
            if exc.status in (403, 404) and self.namespace in exc.message and (
                    "being terminated" in exc.message or f'namespaces "{self.namespace}" not found' in exc.message):  # fmt: skip
                raise LabkitError(
                    f"The lab's namespace {self.namespace} has been deleted, so nothing more can be made in it.",
                    hint=f"Run the lab's first cell again (`lab = labkit.start_lab({self.id!r})`): it makes a new "
                         "namespace. Then run the cells above this one again, to recreate what they made.",
                ) from None  # fmt: skip
            raise

    def say(self, message: str) -> None:
        print(message, flush=True)

    # -- objects ----------------------------------------------------------------------------

    def apply(self, manifest: Any) -> Applied:
        """Create or update the objects in ``manifest`` (YAML text, a file, a dict or a list) in the lab's
        namespace, as ``kubectl apply --server-side`` does; the names applied, as ``kind/name``."""
        return self._apply(manifest, action=True)

    def _apply(self, manifest: Any, action: bool) -> Applied:
        """``apply``; ``action``: a trainee's change (injecting a fault is not one)."""
        applied = Applied()
        for obj in manifests.load(manifest):
            kind = self.kinds.of(obj["apiVersion"], obj["kind"])
            body = copy.deepcopy(obj)
            meta = body["metadata"]
            name = meta["name"]
            if kind.namespaced:
                if meta.get("namespace") not in (None, self.namespace):
                    raise LabkitError(f"{kind.kind} {name} asks for namespace {meta['namespace']!r}, but this lab works "
                                      f"in {self.namespace}.", hint="Remove metadata.namespace from the manifest.")  # fmt: skip
                meta["namespace"] = self.namespace
            if self.shared:
                meta.setdefault("labels", {})[RUN_LABEL] = self.run_id
            try:
                self.request("PATCH", kind.path(self.namespace, name), body, content_type=APPLY_PATCH,
                             query={"fieldManager": FIELD_MANAGER, "force": "true"})  # fmt: skip
            except APIError as exc:
                raise LabkitError(f"The API server refused {kind.label}/{name}: {exc.message}", hint=exc.hint) from None
            self.applied.add(kind)
            if action:
                self.actions.append(time.time())
            applied.append(f"{kind.kind.lower()}/{name}")
            self.say(f"{kind.label}/{name} applied")
        return applied

    def _locate(self, target: str) -> tuple[manifests.Kind, str]:
        kind_name, name = manifests.split_target(target)
        return self.kinds.named(kind_name), name

    def get(self, target: str) -> dict | None:
        """The object ``target`` (``deployment/web``; a bare name is a pod) as the API returns it, or None."""
        kind, name = self._locate(target)
        try:
            return self.request("GET", kind.path(self.namespace, name))
        except APIError as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, target: str, wait: bool = True, timeout: float = 60) -> None:
        """Delete ``target`` (its pods go with it); wait until it is gone unless ``wait`` is False."""
        kind, name = self._locate(target)
        self.actions.append(time.time())
        try:
            self.request("DELETE", kind.path(self.namespace, name), {"propagationPolicy": "Foreground"})
        except APIError as exc:
            if exc.status != 404:
                raise
        self.say(f"{kind.label}/{name} deleted")
        deadline = time.monotonic() + timeout
        while wait and self.get(target) is not None:
            if time.monotonic() > deadline:
                raise LabkitError(f"{target} was not gone {timeout:.0f} s after its deletion.",
                                  hint="Its pods may still be stopping: `lab.kubectl('get pods')` shows them.")  # fmt: skip
            time.sleep(0.2)

    def pods(self, selector: str | None = None) -> list[dict]:
        """The lab's pods (optionally those matching a label selector such as ``app=web``), oldest first."""
        query = {"labelSelector": selector} if selector else None
        items = self.request("GET", f"/api/v1/namespaces/{self.namespace}/pods", query=query).get("items", [])
        return sorted(items, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))

    def nodes(self) -> list[dict]:
        """The cluster's nodes (on JupyterHub, only if your account may list them)."""
        return self.request("GET", "/api/v1/nodes").get("items", [])

    def pods_of(self, target: str) -> list[dict]:
        """The pods a workload (``deployment/web``) selects, or the one pod ``target`` names."""
        kind, name = self._locate(target)
        if kind.kind == "Pod":
            pod = self.get(target)
            return [pod] if pod else []
        obj = self.get(target)
        selector = readiness.selector_of(obj) if obj else None
        return self.pods(selector) if selector else []

    # -- waiting ----------------------------------------------------------------------------

    def wait_ready(self, *targets: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until each target is ready as ``kubectl rollout status`` / ``kubectl wait`` judge it (a
        Deployment rolled out and available, a Pod Ready, a Job complete), showing progress as it goes.
        Fails early, saying why, when it cannot get there by itself (a rollout past its deadline)."""
        for target in targets:
            self._wait(target, timeout)

    def _wait(self, target: str, timeout: float) -> None:
        kind, name = self._locate(target)
        line = display.StatusLine()
        started = time.monotonic()
        summary = "waiting"
        problem: str | None = None
        next_look = 0.0
        try:
            while True:
                obj = self.get(target)
                elapsed = time.monotonic() - started
                if obj is None:  # as kubectl rollout status and kubectl wait: nothing to wait for
                    line.finish(f"{target}: not found", ok=False)
                    raise LabkitError(f"There is no {target} in the lab's namespace {self.namespace}.",
                                      hint=self._missing_hint(kind, name))
                state = readiness.progress(kind.kind, obj)
                summary = state.summary
                if state.done:
                    line.finish(f"{target}: {summary} ({elapsed:.1f} s)")
                    return
                if state.failure:
                    line.finish(f"{target}: {summary}", ok=False)
                    raise LabkitError(f"{target} will not become ready: {state.failure.rstrip('.')}.", hint=self._diagnose(target))
                if time.monotonic() >= next_look and kind.kind != "Pod":  # the pods say why, once a second
                    problem = next((p for p in map(readiness.pod_problem, self.pods_of(target)) if p), None)
                    next_look = time.monotonic() + 1.0
                why = f" — {problem}" if problem else ""
                if elapsed > timeout:  # the line and the error keep the last reason the pods gave
                    line.finish(f"{target}: {summary}{why} after {timeout:.0f} s", ok=False)
                    raise LabkitError(f"{target} was not ready after {timeout:.0f} s ({summary}{why}).",
                                      hint=self._diagnose(target))  # fmt: skip
                line.update(f"{target}: {summary}{why} ({elapsed:.0f} s)")
                time.sleep(0.05)
        except KeyboardInterrupt:
            line.finish(f"{target}: {summary} (interrupted)", ok=False)
            raise LabkitError(
                f"Interrupted while waiting for {target} ({summary}). The cluster carries on without you: "
                "nothing was undone.",
                hint=f"Run `lab.wait_ready({target!r})` to wait again, or `lab.kubectl('get pods')` to look.",
            ) from None

    def _missing_hint(self, kind: manifests.Kind, name: str) -> str:
        """What to do about an object that is not there: the name it may have been meant to be, else apply it."""
        try:
            names = [o["metadata"]["name"] for o in self.request("GET", kind.path(self.namespace)).get("items", [])]
        except LabkitError:
            names = []
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            return f"Did you mean {kind.kind.lower()}/{close[0]}? (`lab.kubectl('get {kind.plural}')` lists them.)"
        return "Apply it first (a cell above may have failed: look for its error)."

    def _diagnose(self, target: str) -> str:
        """Why ``target``'s pods are not ready, and the warnings about them: what a trainee should read next."""
        lines = []
        for pod in self.pods_of(target):
            problem = readiness.pod_problem(pod)
            if problem:
                lines.append(f"pod {pod['metadata']['name']}: {problem}")
        names = {p["metadata"]["name"] for p in self.pods_of(target)} | {target.rpartition("/")[2]}
        warnings = [e for e in self.event_list() if e.get("type") == "Warning" and e["involvedObject"].get("name") in names]
        for event in warnings[-3:]:
            lines.append(f"event {event['reason']} on {event['involvedObject']['name']}: {event.get('message', '')}")
        lines.append("`lab.events()` shows the whole timeline; `lab.kubectl('describe " + target + "')` the details.")
        return "\n".join(lines)

    # -- kubectl ----------------------------------------------------------------------------

    def kubectl(self, args: str | list[str], *, check: bool = False, show: bool = True, input: str | None = None,
                timeout: float = 120) -> Output:  # fmt: skip
        """Run the real kubectl against the lab's namespace (``-n`` is added unless given) and show what it
        prints; its output. ``check=True`` raises if kubectl fails."""
        argv = shlex.split(args) if isinstance(args, str) else list(args)
        if argv and argv[0] == "kubectl":
            argv = argv[1:]
        if not any(a in ("-n", "-A", "--all-namespaces") or a.startswith("--namespace") for a in argv):
            argv = ["-n", self.namespace, *argv]
        command = [*self.cluster.kubectl_command(), *argv]
        if _writes(argv):
            self.actions.append(time.time())
        try:
            done = subprocess.run(command, capture_output=True, text=True, input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabkitError(f"kubectl {' '.join(argv)} did not finish within {timeout:.0f} s.") from None
        except KeyboardInterrupt:
            raise LabkitError(f"Interrupted: kubectl {' '.join(argv)} was stopped.",
                              hint="What it changed before it stopped stays changed.") from None  # fmt: skip
        if show:
            if done.stdout:
                print(done.stdout, end="" if done.stdout.endswith("\n") else "\n", flush=True)
            if done.stderr:
                print(done.stderr, end="" if done.stderr.endswith("\n") else "\n", file=sys.stderr, flush=True)
        if check and done.returncode != 0:
            raise LabkitError(f"kubectl {' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")
        return Output(done.stdout)

    # -- the official client ----------------------------------------------------------------

    def api_client(self) -> Any:
        """The official ``kubernetes`` Python client, for your own automation, with the lab's credentials:
        ``client.AppsV1Api(lab.api_client()).read_namespaced_deployment("web", lab.namespace)``. It works where
        the lab works (its namespace is ``lab.namespace``), and what it changes counts as your action."""
        if self._api_client is None:
            self._api_client = self.cluster.official_client()
            rest, record = self._api_client.rest_client, self.actions.append
            send = rest.request

            def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
                if method.upper() not in ("GET", "HEAD", "OPTIONS"):
                    record(time.time())
                return send(method, url, *args, **kwargs)

            rest.request = request
        return self._api_client

    # -- events -----------------------------------------------------------------------------

    def event_list(self) -> list[dict]:
        """The lab namespace's Events in the order they first happened (``in_time_order``)."""
        return in_time_order(self.request("GET", f"/api/v1/namespaces/{self.namespace}/events").get("items", []))

    def events(self, last: int | None = 30) -> None:
        """Show the lab's Events as a timeline: the ``last`` ones (None for all), each at the clock time it first
        happened and the seconds since the first of them, a repeated one with its count and span, as
        ``kubectl describe`` shows them. ``event_list`` returns them."""
        items = self.event_list()
        shown = items[-last:] if last else items
        origin = _event_time(shown[0]) if shown else 0.0
        rows = [(time.strftime("%H:%M:%S", time.localtime(_event_time(e))), f"+{_event_time(e) - origin:.0f}s",
                 e.get("type", ""), e.get("reason", ""),
                 f"{e['involvedObject'].get('kind', '').lower()}/{e['involvedObject'].get('name', '')}",
                 (e.get("message") or "").strip()[:160] + _repeats(e))
                for e in shown]  # fmt: skip
        display.table(rows, ["time", "since", "type", "reason", "object", "message"])

    # -- reaching a pod ---------------------------------------------------------------------

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
        pods = self.pods_of(target)
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
        if self._sandbox_node(required=False):  # through the pod's own node, which runs it
            node = self.cluster.get(f"/api/v1/nodes/{pod['spec']['nodeName']}")
            return self._agent(method, f"/labkit/proxy/{meta['namespace']}/{meta['name']}/{port}/{path.lstrip('/')}",
                               body, content_type=content_type, timeout=timeout, node=node)  # fmt: skip
        # elsewhere through the API server's pods/proxy, as on any real cluster
        api_path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}:{port}/proxy/{path.lstrip('/')}"
        status, answer = self.cluster.send(method, api_path, body, content_type=content_type, timeout=timeout)
        return Response(status, answer.decode(errors="replace"))

    # -- the sandbox's node agent -----------------------------------------------------------

    def _sandbox_node(self, required: bool = True) -> dict | None:
        """A ready node of the local sandbox (whose agent serves labkit's own endpoints), or None elsewhere."""
        if not hasattr(self, "_agent_node"):
            try:
                nodes = self.nodes()
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

    def _agent(self, method: str, path: str, body: dict | bytes | None = None, *, content_type: str = "application/json",
               timeout: float = 10, node: dict | None = None) -> Response:  # fmt: skip
        """A request to the sandbox's node agent, through the kubelet API of ``node`` (default: any; its serving
        certificate is the cluster CA's, for 127.0.0.1; the lab's credentials are the admin's)."""
        node = node or self._sandbox_node()
        endpoint = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        data = _json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"https://127.0.0.1:{endpoint}{path}", data=data, method=method,
                                         headers={**self.cluster.api.headers("*/*"), "Content-Type": content_type})  # fmt: skip
        try:
            with urllib.request.urlopen(request, context=self.cluster.api.context, timeout=timeout) as answer:
                return Response(answer.status, answer.read().decode(errors="replace"), dict(answer.headers))
        except urllib.error.HTTPError as exc:
            return Response(exc.code, exc.read().decode(errors="replace"), dict(exc.headers or {}))
        except (urllib.error.URLError, OSError) as exc:
            raise LabkitError(f"The sandbox's node agent could not be reached: {getattr(exc, 'reason', exc)}.",
                              hint=self.cluster.unreachable_hint()) from None  # fmt: skip

    def service_url(self, name: str, port: int | None = None) -> str:
        """A URL this notebook can use to reach Service ``name`` (on ``port``, default its first): in the
        sandbox a forward on this machine's loopback; on JupyterHub in the cluster, its DNS name."""
        service = self.get(f"service/{name}")
        if service is None:
            raise LabkitError(f"There is no service/{name} in the lab's namespace {self.namespace}.")
        ports = service["spec"].get("ports", [])
        port = port or (ports[0]["port"] if ports else None)
        if port is None:
            raise LabkitError(f"Service {name} has no ports.")
        if self.cluster.source == "in-cluster":
            return f"http://{name}.{self.namespace}.svc.cluster.local:{port}"
        answer = self._agent("GET", f"/labkit/forward/{self.namespace}/{name}/{port}")
        if not answer.ok:
            raise LabkitError(f"Service {name} cannot be reached from here: {answer.text.strip()}")
        return f"http://127.0.0.1:{answer.json()['port']}"

    # -- network faults ---------------------------------------------------------------------

    def _addresses(self, target: str) -> list[str]:
        addresses = [p["status"]["podIP"] for p in self.pods_of(target)
                     if p.get("status", {}).get("podIP") and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        if not addresses:
            raise LabkitError(f"{target} has no running pod with an address to aim a fault at.",
                              hint=f"`lab.wait_ready({target!r})` first.")  # fmt: skip
        return addresses

    def _fault(self, spec: dict, what: str) -> NetworkFault:
        answer = self._agent("POST", "/labkit/faults", spec)
        if answer.status != 201:
            raise LabkitError(f"The fault could not be injected: {answer.text.strip()}")
        fault = NetworkFault(self, answer.json(), what)
        self.faults[fault.id] = fault
        self.say(f"fault {fault.id}: {what}")
        return fault

    def delay(self, target: str, ms: float, *, jitter: float = 0, to: str | None = None) -> NetworkFault:
        """Delay the packets ``target``'s pods send (to ``to``'s pods only, if given) by ``ms`` ± ``jitter`` ms."""
        where = f" to {to}" if to else ""
        return self._fault({"kind": "delay", "sources": self._addresses(target), "delay_ms": ms, "jitter_ms": jitter,
                            "to": self._addresses(to) if to else []},
                           f"{target}'s packets{where} delayed {ms:g} ms" + (f" ± {jitter:g}" if jitter else ""))  # fmt: skip

    def loss(self, target: str, percent: float, *, to: str | None = None) -> NetworkFault:
        """Drop ``percent`` % of the packets ``target``'s pods send (to ``to``'s pods only, if given)."""
        return self._fault({"kind": "loss", "sources": self._addresses(target), "loss_percent": percent,
                            "to": self._addresses(to) if to else []},
                           f"{percent:g}% of {target}'s packets lost" + (f" to {to}" if to else ""))  # fmt: skip

    def bandwidth(self, target: str, rate: str | float, *, to: str | None = None) -> NetworkFault:
        """Limit what ``target``'s pods send to ``rate`` (``"1mbit"``, ``"500kbit"``, or bits a second)."""
        bits = _rate(rate)
        return self._fault({"kind": "bandwidth", "sources": self._addresses(target), "rate_bps": bits,
                            "to": self._addresses(to) if to else []},
                           f"{target} limited to {rate}" + (f" to {to}" if to else ""))  # fmt: skip

    def partition(self, a: str, b: str, *, both: bool = True) -> NetworkFault:
        """Cut ``a``'s pods off from ``b``'s: packets from a to b are dropped, and (``both``) from b to a."""
        arrow = "<->" if both else "->"
        return self._fault({"kind": "partition", "sources": self._addresses(a), "to": self._addresses(b), "both": both},
                           f"partition {a} {arrow} {b}")  # fmt: skip

    def heal(self) -> None:
        """Remove every network fault this lab injected."""
        for fault in list(self.faults.values()):
            fault.remove()

    # -- chaos, node loss and recovery --------------------------------------------------------

    @property
    def chaos(self) -> Chaos:
        """Chaos Mesh experiments in the lab's namespace: ``lab.chaos.pod_kill("deployment/web")`` and more."""
        if self._chaos is None:
            self._chaos = Chaos(self)
        return self._chaos

    def lose_node(self, node: str | None = None) -> str:
        """Stop a node of the local sandbox as if its machine were lost (its processes die, no heartbeats);
        by default the node running most of the lab's pods. Its name; ``restore_node`` brings it back."""
        sandbox = self._local_sandbox()
        if node is None:
            counts: dict[str, int] = {}
            for pod in self.pods():
                if pod["spec"].get("nodeName"):
                    counts[pod["spec"]["nodeName"]] = counts.get(pod["spec"]["nodeName"], 0) + 1
            if not counts:
                raise LabkitError("No pod of the lab runs on a node yet, so there is no node to choose.",
                                  hint="Name one: `lab.lose_node('node-2')`.")  # fmt: skip
            node = max(sorted(counts), key=counts.get)
        sandbox.set_node_running(node, False, say=self.say)
        self.lost_nodes.add(node)
        self._note_lost_nodes()
        return node

    def restore_node(self, node: str, quiet: bool = False) -> None:
        """Bring back a node ``lose_node`` stopped."""
        self._local_sandbox().set_node_running(node, True, say=(lambda _: None) if quiet else self.say)
        self.lost_nodes.discard(node)
        self._note_lost_nodes()

    def _note_lost_nodes(self) -> None:
        """Keep the stopped nodes on the lab's namespace, so that if this kernel is killed the next lab brings
        them back when it sweeps the namespace."""
        if self.shared:
            return
        body = {"metadata": {"annotations": {LOST_NODES: ",".join(sorted(self.lost_nodes)) or None}}}
        try:
            self.cluster.request("PATCH", f"/api/v1/namespaces/{self.namespace}", body, content_type=MERGE_PATCH)
        except LabkitError:
            pass  # the namespace is going: the nodes come back with close()

    def _local_sandbox(self):  # noqa: ANN202 - a labkit.sandbox.controlplane.Sandbox
        if not self.cluster.sandbox:
            raise LabkitError("Losing a node works on the local sandbox only.",
                              hint="On a real cluster, drain the node (`kubectl drain`) or stop its machine.")  # fmt: skip
        from labkit.sandbox.controlplane import Sandbox

        return Sandbox(self.cluster.sandbox)

    def measure(self, fault: str, target: str | list[str], *, steady: Callable[[], bool] | None = None,
                symptom: Callable[[], bool] | None = None, within: float = 120) -> Measurement:  # fmt: skip
        """Time to detect and to recover a fault injected in the ``with`` block (see ``labkit.recovery``):
        ``steady`` is the steady state (default: ``target``, or each of a list of targets, has every replica
        ready), ``symptom`` an extra sign of trouble (an error rate above a threshold)."""
        targets = [target] if isinstance(target, str) else list(target)
        check = steady or (lambda: all(workload_steady(self, t) for t in targets))
        return Measurement(self, fault, ", ".join(targets), check, symptom, within)

    def experiment(self, title: str, target: str | list[str], inject: Callable[[], Any], *,
                   steady: Callable[[], bool] | None = None, symptom: Callable[[], bool] | None = None,
                   within: float = 120) -> Recovery:  # fmt: skip
        """A chaos experiment as a method: check the steady-state hypothesis, inject (``inject()``, e.g.
        ``lambda: lab.chaos.pod_kill("deployment/worker")``), measure detection and recovery, roll back (the
        experiments ``inject`` made are deleted), and verify the steady state holds again. The measurement."""
        measurement = self.measure(title, target, steady=steady, symptom=symptom, within=within)
        check = measurement.steady
        if not check():
            raise LabkitError(f"The steady state of {measurement.record.target} does not hold before the experiment "
                              f"{title!r}, so its outcome would mean nothing.",
                              hint="`lab.wait_ready(...)` on what it watches first.")  # fmt: skip
        before = set(self.chaos.experiments)
        try:
            with measurement as record:
                inject()
        finally:
            for name in set(self.chaos.experiments) - before:  # the roll back
                self.chaos.experiments[name].delete()
        if not check():
            record.notes.append("the steady state did not hold after the roll back")
        return record

    def timeline(self) -> Any:
        """The lab's measurements as a picture: time to detect and to recover for each fault."""
        return timeline(self.recoveries)

    # -- watching ---------------------------------------------------------------------------

    def view(self) -> Any:
        """A live view of the cluster's nodes and the lab's pods, updated from watches while the lab runs."""
        from labkit.view import LiveView

        view = LiveView(self)
        self.views.append(view)
        return view.widget


def _writes(argv: list[str]) -> bool:
    """Whether a kubectl command line changes the cluster (``scale``, ``rollout undo``; not ``get``)."""
    words = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in VALUED_FLAGS)]
    if not words or words[0] not in WRITING_VERBS:
        return False
    return words[0] != "rollout" or (len(words) > 1 and words[1] in ("undo", "restart", "pause", "resume"))


# Within one whole second (most Events carry whole seconds), the order a pod's start takes: its owner's scaling and
# creation, its scheduling, then the kubelet's pull, create and start. Components post Events asynchronously, so
# the order the API server stored them in does not say which came first.
_STAGES = {reason: rank for rank, reason in enumerate(
    ("ScalingReplicaSet", "SuccessfulCreate", "Scheduled", "Pulling", "Pulled", "Created", "Started"))}


def in_time_order(events: list[dict]) -> list[dict]:
    """Events oldest first, by when each first happened; within a second, by the stage of a pod's start, then by
    the finer time where there is one (the scheduler's microseconds), then by the order they were stored."""
    return sorted(events, key=lambda e: (int(_event_time(e)), _STAGES.get(e.get("reason", ""), len(_STAGES)),
                                         _event_time(e), int(e["metadata"].get("resourceVersion") or 0)))  # fmt: skip


def _event_time(event: dict) -> float:
    """When an Event first happened, in seconds: kubelets and controllers set firstTimestamp (whole seconds),
    the scheduler eventTime (microseconds)."""
    stamp = event.get("firstTimestamp") or event.get("eventTime") or event.get("lastTimestamp") or \
        event["metadata"].get("creationTimestamp", "")
    return _seconds(stamp)


def _seconds(stamp: str | None) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else 0.0


def _repeats(event: dict) -> str:
    """A repeated Event's count and span, as ``kubectl describe`` writes it: " (x3 over 12s)"."""
    count = (event.get("series") or {}).get("count") or event.get("count") or 1
    if count <= 1:
        return ""
    last = event.get("lastTimestamp") or (event.get("series") or {}).get("lastObservedTime")
    span = max(0.0, _seconds(last) - _event_time(event)) if last else 0.0
    return f" (x{count} over {span:.0f}s)"


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(owner: str) -> bool:
    _, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not start or _start_time(int(pid)) == start

