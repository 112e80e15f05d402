"""``Lab``: one run of one lab, in a namespace of its own; it reads and applies objects, and composes the parts.

The objects it reads and applies and the requests behind them (which explain a
deleted namespace) are the ``LabContext`` every part works through; the parts are
waiting, kubectl, events, reaching pods, the sandbox's faults and nodes, chaos
experiments, recovery measurements and the live view. Each ``Lab`` method a
notebook calls is the part's, in a line.
"""

from __future__ import annotations

import atexit
import copy
import os
import re
import secrets
import time
from typing import Any, Callable

from labkit import manifests, readiness, scorecard
from labkit.errors import LabkitError
from labkit.kube.client import APPLY_PATCH
from labkit.kube.config import Cluster, connect
from labkit.kube.errors import APIError, NamespaceGone, NotFound
from labkit.lab import namespaces
from labkit.lab.chaos import Chaos
from labkit.lab.events import Events
from labkit.lab.faults import NetworkFault, NetworkFaults
from labkit.lab.kubectl import Kubectl, Output
from labkit.lab.namespaces import RUN_LABEL
from labkit.lab.nodes import Nodes
from labkit.lab.reach import Reach, Response
from labkit.lab.recovery import Measurement, Recovery, timeline, workload_steady
from labkit.lab.waiting import DEFAULT_TIMEOUT, Waits

FIELD_MANAGER = "labkit"

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


class Applied(list):
    """The names ``apply`` applied, already said: a cell that ends with it does not show them twice."""

    def _ipython_display_(self) -> None:
        pass


class Lab:
    """One run of a lab (see ``labkit.lab``)."""

    def __init__(self, lab_id: str, cluster: Cluster) -> None:
        self.id = lab_id
        self.slug = slug(lab_id)
        self.cluster = cluster
        self.kinds = manifests.Kinds(cluster)
        self.run_id = secrets.token_hex(3)
        self.closed = False
        self.grading = os.environ.get("LABKIT_GRADER") == "1"  # the grader's kernel (labkit.course.execute)
        self.applied: set[manifests.Kind] = set()
        self.views: list[Any] = []
        self.actions: list[float] = []  # when the trainee changed something (time.time()), for recovery figures
        self.recoveries: list[Recovery] = []
        self._api_client: Any = None
        self.namespace, self.shared = namespaces.make(cluster, self.slug, self.run_id)
        self._events = Events(self)
        self._waits = Waits(self, self._events.list)
        self._kubectl = Kubectl(self)
        self._reach = Reach(self)
        self._faults = NetworkFaults(self, self._reach)
        self._nodes = Nodes(self)
        self.chaos = Chaos(self)
        atexit.register(self.close, quiet=True)
        where = "its own namespace" if not self.shared else "your namespace"
        self.say(f"Lab {lab_id}: connected to {cluster.description}; working in {where} {self.namespace}.")

    # -- the namespace ----------------------------------------------------------------------

    def namespace_alive(self) -> bool:
        return namespaces.alive(self.cluster, self.namespace)

    def close(self, quiet: bool = False) -> None:
        """End the lab: its watches stop and its namespace (or, in a shared one, what it made) is deleted."""
        if self.closed:
            return
        for view in self.views:
            view.stop()
        try:
            self._faults.heal(quiet=True)
            for node in list(self._nodes.lost):
                self._nodes.restore(node, quiet=True)
        except LabkitError:
            pass
        try:
            if self.shared:  # in its own namespace they go with it
                self.chaos.clear(quiet=True)
            if not self.shared:
                self.cluster.request("DELETE", f"/api/v1/namespaces/{self.namespace}")
            elif not self.grading:  # the grader's lab leaves the objects: the run's namespace goes with them
                for kind in self.applied:
                    self.cluster.request("DELETE", kind.path(self.namespace), query={"labelSelector": f"{RUN_LABEL}={self.run_id}"})
        except LabkitError:
            pass  # already gone, or the cluster is: nothing left to clean
        self.closed = True
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
        except NamespaceGone as exc:
            if exc.details.get("name") not in (self.namespace, None) and self.namespace not in path:
                raise
            raise LabkitError(
                f"The lab's namespace {self.namespace} has been deleted, so nothing more can be made in it.",
                hint=f"Run the lab's first cell again (`lab = labkit.start_lab({self.id!r})`): it makes a new "
                     "namespace. Then run the cells above this one again, to recreate what they made.",
            ) from None  # fmt: skip

    def say(self, message: str) -> None:
        print(message, flush=True)

    # -- objects ----------------------------------------------------------------------------

    def apply(self, manifest: Any, *, action: bool = True) -> Applied:
        """Create or update the objects in ``manifest`` (YAML text, a file, a dict or a list) in the lab's
        namespace, as ``kubectl apply --server-side`` does; the names applied, as ``kind/name``. ``action``:
        whether it is the trainee's change (a fault the lab injects is not)."""
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

    def locate(self, target: str) -> tuple[manifests.Kind, str]:
        """The kind and name ``target`` means (``deployment/web``, ``deploy/web``, a bare name: a pod)."""
        kind_name, name = manifests.split_target(target)
        return self.kinds.named(kind_name), name

    def get(self, target: str) -> dict | None:
        """The object ``target`` (``deployment/web``; a bare name is a pod) as the API returns it, or None."""
        kind, name = self.locate(target)
        try:
            return self.request("GET", kind.path(self.namespace, name))
        except NotFound:
            return None

    def delete(self, target: str, wait: bool = True, timeout: float = 60) -> None:
        """Delete ``target`` (its pods go with it); wait until it is gone unless ``wait`` is False."""
        kind, name = self.locate(target)
        self.actions.append(time.time())
        try:
            self.request("DELETE", kind.path(self.namespace, name), {"propagationPolicy": "Foreground"})
        except NotFound:
            pass
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
        kind, _ = self.locate(target)
        if kind.kind == "Pod":
            pod = self.get(target)
            return [pod] if pod else []
        obj = self.get(target)
        selector = readiness.selector_of(obj) if obj else None
        return self.pods(selector) if selector else []

    # -- the parts ----------------------------------------------------------------------------

    def wait_ready(self, *targets: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until each target is ready as ``kubectl rollout status`` / ``kubectl wait`` judge it (a
        Deployment rolled out and available, a Pod Ready, a Job complete), showing progress as it goes.
        Fails early, saying why, when it cannot get there by itself (a rollout past its deadline)."""
        self._waits.wait_ready(*targets, timeout=timeout)

    def kubectl(self, args: str | list[str], *, check: bool = False, show: bool = True, input: str | None = None,
                timeout: float = 120) -> Output:  # fmt: skip
        """Run the real kubectl against the lab's namespace (``-n`` is added unless given) and show what it
        prints; its output. ``check=True`` raises if kubectl fails."""
        return self._kubectl.run(args, check=check, show=show, input=input, timeout=timeout)

    def event_list(self) -> list[dict]:
        """The lab namespace's Events, in the order they first happened."""
        return self._events.list()

    def events(self, last: int | None = 30) -> None:
        """Show the lab's Events as a timeline: the ``last`` ones (None for all), each at the clock time it first
        happened and the seconds since the first of them, a repeated one with its count and span."""
        self._events.show(last)

    def http(self, target: str, path: str = "/", *, method: str = "GET", json: Any = None, data: str | bytes | None = None,
             port: int | None = None, timeout: float = 10) -> Response:  # fmt: skip
        """An HTTP request (GET unless ``method`` says otherwise) for ``path`` on a ready pod of ``target``
        (``deployment/web``, ``pod/web-abc``, or a pod's name), on ``port`` (default: the pod's first declared
        container port). ``json`` sends a value as JSON, ``data`` text or bytes as they are."""
        return self._reach.http(target, path, method=method, json=json, data=data, port=port, timeout=timeout)

    def service_url(self, name: str, port: int | None = None) -> str:
        """A URL this notebook can use to reach Service ``name`` (on ``port``, default its first): in the
        sandbox a forward on this machine's loopback; on JupyterHub in the cluster, its DNS name."""
        return self._reach.service_url(name, port)

    def delay(self, target: str, ms: float, *, jitter: float = 0, to: str | None = None) -> NetworkFault:
        """Delay the packets ``target``'s pods send (to ``to``'s pods only, if given) by ``ms`` ± ``jitter`` ms."""
        return self._faults.delay(target, ms, jitter=jitter, to=to)

    def loss(self, target: str, percent: float, *, to: str | None = None) -> NetworkFault:
        """Drop ``percent`` % of the packets ``target``'s pods send (to ``to``'s pods only, if given)."""
        return self._faults.loss(target, percent, to=to)

    def bandwidth(self, target: str, rate: str | float, *, to: str | None = None) -> NetworkFault:
        """Limit what ``target``'s pods send to ``rate`` (``"1mbit"``, ``"500kbit"``, or bits a second)."""
        return self._faults.bandwidth(target, rate, to=to)

    def partition(self, a: str, b: str, *, both: bool = True) -> NetworkFault:
        """Cut ``a``'s pods off from ``b``'s: packets from a to b are dropped, and (``both``) from b to a."""
        return self._faults.partition(a, b, both=both)

    def heal(self) -> None:
        """Remove every network fault this lab injected."""
        self._faults.heal()

    @property
    def faults(self) -> dict[str, NetworkFault]:
        """The network faults this lab injected (and has not removed), by id."""
        return self._faults.injected

    def lose_node(self, node: str | None = None) -> str:
        """Stop a node of the local sandbox as if its machine were lost (its processes die, no heartbeats);
        by default the node running most of the lab's pods. Its name; ``restore_node`` brings it back."""
        return self._nodes.lose(node)

    def restore_node(self, node: str, quiet: bool = False) -> None:
        """Bring back a node ``lose_node`` stopped."""
        self._nodes.restore(node, quiet)

    @property
    def lost_nodes(self) -> set[str]:
        return self._nodes.lost

    def measure(self, fault: str, target: str | list[str], *, steady: Callable[[], bool] | None = None,
                symptom: Callable[[], bool] | None = None, within: float = 120) -> Measurement:  # fmt: skip
        """Time to detect and to recover a fault injected in the ``with`` block (see ``labkit.lab.recovery``):
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

    def view(self) -> Any:
        """A live view of the cluster's nodes and the lab's pods, updated from watches while the lab runs."""
        from labkit.lab.view import LiveView

        view = LiveView(self)
        self.views.append(view)
        return view.widget

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
