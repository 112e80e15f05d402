"""Chaos experiments as Chaos Mesh defines them, carried out by the node agent.

A lab writes PodChaos, NetworkChaos and StressChaos objects (``chaos-mesh.org/v1alpha1``)
through the Kubernetes API, so the same lab runs on a real cluster with Chaos Mesh
installed. There, Chaos Mesh's controller watches them and its chaos daemon on each
node injects the faults. In the sandbox the node agent plays both parts:
``ChaosController`` watches the three kinds in every namespace with an identity of its
own (``labkit:chaos-controller``, whose ClusterRole allows just this), selects the
target pods as Chaos Mesh does (``selector`` and ``mode``), and injects:

* PodChaos ``pod-kill``: deletes the pods (``gracePeriod``, default 0);
* PodChaos ``pod-failure``: sets the containers' image to the pause image for the
  ``duration``, through the API, as Chaos Mesh does: they restart into a process that
  serves nothing, so their probes fail; the images are put back at the end;
* PodChaos ``container-kill``: SIGKILLs the ``containerNames``, which restart per the
  pod's restartPolicy;
* NetworkChaos ``delay``, ``loss``, ``bandwidth``, ``partition``: the pod network's
  faults on the selected pods' traffic (to a ``target``'s pods, or all of it), in
  the ``direction`` asked (``to``, ``from``, ``both``);
* StressChaos: CPU and memory stressors inside the first container (or
  ``containerNames``), counted as the container's own use, so a memory stressor can
  push a pod past its limit.

Each experiment ends by itself after its ``duration`` (none: until deleted); deleting
it ends it at once. A finalizer keeps the object until its faults are removed. Its
``status`` reads as Chaos Mesh's: the conditions Selected, AllInjected, AllRecovered
and Paused, and ``experiment.desiredPhase`` (Run, then Stop) with a record per target
saying whether it is injected and when. Events on it: Applied, Recovered, TimeUp, and
Failed with the reason (a selector that matches nothing, a bad field, a pod already
under another experiment's network fault).
"""

from __future__ import annotations

import json
import math
import queue
import random
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

from labkit.kube import chaosmesh
from labkit.kube.chaosmesh import FINALIZER
from labkit.kube.client import MERGE_PATCH, STRATEGIC_MERGE_PATCH, KubeAPI
from labkit.kube.errors import APIError, Unreachable
from labkit.kube.events import api_time, component_event
from labkit.kube.quantity import duration_seconds, parse as parse_quantity, rate_bits
from labkit.kube.watch import ListWatch

PAUSE_IMAGE = "gcr.io/google-containers/pause:latest"  # what Chaos Mesh's pod-failure runs
ORIGINAL_IMAGE = "chaos-mesh.org/original-image-"  # + container name: the pod's annotation while it fails
MODES = ("one", "all", "fixed", "fixed-percent", "random-max-percent")
POD_ACTIONS = ("pod-kill", "pod-failure", "container-kill")
NETWORK_ACTIONS = ("delay", "loss", "bandwidth", "partition")
SHAPING = ("delay", "loss", "bandwidth")  # one of these at a time on a pod's traffic


class Invalid(ValueError):
    """What is wrong with an experiment's spec, in words for its status and Events."""


@dataclass
class Target:
    """One pod (or container) an experiment acts on, and what was done to it."""

    namespace: str
    pod: str
    uid: str
    container: str = ""
    phase: str = "NotInjected"  # Injected once done, NotInjected again once recovered
    injected: int = 0
    recovered: int = 0
    events: list[dict] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)  # what recovers it
    shaped: set[str] = field(default_factory=set)  # addresses whose traffic its delay, loss or bandwidth shapes

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.pod}" + (f"/{self.container}" if self.container else "")

    def record(self) -> dict:
        return {"id": self.id, "selectorKey": ".", "phase": self.phase, "injectedCount": self.injected,
                "recoveredCount": self.recovered, "events": self.events[-6:]}  # fmt: skip

    def note(self, operation: str, ok: bool, message: str = "") -> None:
        entry = {"type": "Succeeded" if ok else "Failed", "operation": operation, "timestamp": api_time()}
        if message:
            entry["message"] = message
        self.events.append(entry)


@dataclass
class Run:
    """An experiment the controller is carrying out."""

    kind: str
    namespace: str
    name: str
    uid: str
    deadline: float | None  # time.monotonic() when it ends by itself
    targets: list[Target] = field(default_factory=list)
    failure: str = ""
    stopped: bool = False

    @property
    def path(self) -> str:
        return chaosmesh.path(self.kind, self.namespace, self.name)


class ChaosController(threading.Thread):
    """Watches the chaos kinds and carries them out on the agent's nodes (``workers``: the pod workers of
    every node, by pod uid; ``faults``: the pod network's faults, None without one)."""

    def __init__(self, api: KubeAPI, workers: Callable[[], dict], faults, log: Callable[[str], None],  # noqa: ANN001
                 stopping: threading.Event) -> None:  # fmt: skip
        super().__init__(name="chaos", daemon=True)
        self.api = api
        self.workers = workers
        self.faults = faults
        self.log = log
        self.stopping = stopping
        self.changes: queue.Queue[dict] = queue.Queue()
        self.runs: dict[str, Run] = {}  # by uid
        self.done: set[str] = set()  # uids ended by this controller: not started again

    # -- watching --------------------------------------------------------------------------------

    def run(self) -> None:
        for kind, plural in chaosmesh.PLURALS.items():
            threading.Thread(target=self._watch, args=(kind, plural), name=f"chaos-{plural}", daemon=True).start()
        while not self.stopping.is_set():
            due = min((r.deadline for r in self.runs.values() if r.deadline and not r.stopped), default=None)
            wait = 1.0 if due is None else max(0.0, min(1.0, due - time.monotonic()))
            try:
                obj = self.changes.get(timeout=wait)
            except queue.Empty:
                obj = None
            try:
                if obj is not None:
                    self._reconcile(obj)
                self._expire()
            except Unreachable as exc:  # the API server away for a moment: that change is reconciled again
                self.log(f"chaos controller: {exc}; trying again")
                if obj is not None:
                    threading.Timer(1.0, self.changes.put, args=(obj,)).start()
            except Exception:  # noqa: BLE001 - one bad experiment never ends the controller
                self.log(f"chaos controller: {traceback.format_exc()}")
        for run in list(self.runs.values()):  # the agent stops: its faults go with it
            self._recover(run, "the sandbox's node agent stopped")

    def _watch(self, kind: str, plural: str) -> None:
        experiments = ListWatch(self.api, f"/apis/{chaosmesh.GROUP_VERSION}/{plural}", stop=self.stopping.is_set,
                                wait=self.stopping.wait, log=lambda m: self.log(f"chaos controller: {m}"))  # fmt: skip
        for change, found in experiments:  # a kind not installed yet is waited for, quietly
            for obj in found if change == "LISTED" else [found]:
                self.changes.put({**obj, "kind": kind, "deleted": change == "DELETED"})

    # -- reconciling ------------------------------------------------------------------------------

    def _reconcile(self, obj: dict) -> None:
        meta = obj["metadata"]
        uid = meta["uid"]
        run = self.runs.get(uid)
        if meta.get("deletionTimestamp") or obj.get("deleted"):
            if run is not None:
                self._recover(run, "the experiment was deleted")
                self.runs.pop(uid, None)
            if not obj.get("deleted"):
                self._release(obj)
            return
        if run is not None or uid in self.done:
            return
        status = obj.get("status") or {}
        if (status.get("experiment") or {}).get("desiredPhase") == "Stop":
            return  # ended before this agent started
        if FINALIZER not in meta.get("finalizers", []):
            self._patch(obj, {"metadata": {"finalizers": [*meta.get("finalizers", []), FINALIZER]}})
        if status.get("experiment"):  # it ran under an agent that has gone: its faults went with it
            self._end_orphan(obj)
            return
        self._start(obj)

    def _start(self, obj: dict) -> None:
        meta, spec, kind = obj["metadata"], obj.get("spec") or {}, obj["kind"]
        run = Run(kind, meta["namespace"], meta["name"], meta["uid"], None)
        self.runs[run.uid] = run
        try:
            duration = spec.get("duration")
            if duration:
                try:
                    run.deadline = time.monotonic() + duration_seconds(str(duration))
                except ValueError as exc:
                    raise Invalid(f"duration: {exc}") from None
            run.targets = self._select(run, spec)
            self._inject(run, spec)
            if not any(t.injected for t in run.targets):
                reasons = sorted({e.get("message", "") for t in run.targets for e in t.events if e["type"] == "Failed"})
                raise Invalid("nothing could be injected: " + "; ".join(reasons))
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, nothing of it stays in force, and its status says why
            if not isinstance(exc, Invalid):
                self.log(f"chaos {run.kind} {run.namespace}/{run.name}: {traceback.format_exc()}")
            run.failure = str(exc)
            self._event(run, "Failed", f"Failed to apply chaos: {exc}", "Warning")
            self._recover(run, str(exc))
            return
        self._write_status(run)

    def _expire(self) -> None:
        now = time.monotonic()
        for run in list(self.runs.values()):
            if run.deadline is not None and now >= run.deadline and not run.stopped:
                self._event(run, "TimeUp", "Time up according to the duration")
                self._recover(run, "")

    def _recover(self, run: Run, why: str) -> None:
        if run.stopped:
            return
        run.stopped = True
        self.done.add(run.uid)
        for target in run.targets:
            if target.phase != "Injected":
                continue
            problems = []
            for undo in reversed(target.undo):
                try:
                    undo()
                except (APIError, OSError, ValueError) as exc:
                    problems.append(str(exc))
            target.phase = "NotInjected"
            target.recovered += 1
            target.note("Recover", not problems, "; ".join(problems))
            if not problems:
                self._event(run, "Recovered", f"Successfully recover chaos for {target.id}")
        if why:
            self.log(f"chaos {run.kind} {run.namespace}/{run.name} ended: {why}")
        self._write_status(run)

    def _end_orphan(self, obj: dict) -> None:
        """An experiment whose agent went away mid-run: its network faults and stressors went with that agent;
        images a pod-failure swapped are put back. It is over (Chaos Mesh would inject it again)."""
        meta = obj["metadata"]
        run = Run(obj["kind"], meta["namespace"], meta["name"], meta["uid"], None, stopped=True)
        for record in ((obj.get("status") or {}).get("experiment") or {}).get("containerRecords") or []:
            namespace, _, rest = record.get("id", "").partition("/")
            pod = rest.partition("/")[0]
            target = Target(namespace, pod, "", phase="NotInjected", injected=record.get("injectedCount", 0),
                            recovered=record.get("recoveredCount", 0) + (record.get("phase") == "Injected"))  # fmt: skip
            if obj["kind"] == "PodChaos" and record.get("phase") == "Injected":
                self._restore_images(namespace, pod)
            run.targets.append(target)
        self.done.add(run.uid)
        self._event(run, "Recovered", "The sandbox's node agent restarted during the experiment, so its faults "
                    "were removed: the experiment is over")  # fmt: skip
        self._write_status(run)

    def _release(self, obj: dict) -> None:
        finalizers = [f for f in obj["metadata"].get("finalizers", []) if f != FINALIZER]
        if len(finalizers) != len(obj["metadata"].get("finalizers", [])):
            self._patch(obj, {"metadata": {"finalizers": finalizers}})

    # -- choosing targets -------------------------------------------------------------------------

    def _select(self, run: Run, spec: dict, key: str = "selector", mode_key: str = "mode",
                value_key: str = "value", holder: dict | None = None) -> list[Target]:  # fmt: skip
        """The pods ``spec``'s selector and mode pick (``holder``: where they are, for a NetworkChaos's target)."""
        holder = spec if holder is None else holder
        selector = holder.get(key) or {}
        unsupported = sorted(set(selector) - {"namespaces", "labelSelectors", "expressionSelectors", "pods",
                                              "nodes", "nodeSelectors", "podPhaseSelectors", "fieldSelectors",
                                              "annotationSelectors"})  # fmt: skip
        if unsupported:
            raise Invalid(f"unknown selector fields: {', '.join(unsupported)}")
        pods = self._pods(run.namespace, selector)
        mode = holder.get(mode_key) or "one"
        if mode not in MODES:
            raise Invalid(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        chosen = pick(pods, mode, holder.get(value_key))
        if not chosen:
            raise Invalid(f"no pod is selected: nothing running matches {json.dumps(selector, sort_keys=True)}"
                          + (f" (mode {mode}, value {holder.get(value_key)!r})" if pods else ""))  # fmt: skip
        return [Target(p["metadata"]["namespace"], p["metadata"]["name"], p["metadata"]["uid"]) for p in chosen]

    def _pods(self, namespace: str, selector: dict) -> list[dict]:
        namespaces = selector.get("namespaces") or [namespace]
        named = selector.get("pods") or {}
        if named:
            namespaces = list(named)
        labels = [f"{k}={v}" for k, v in sorted((selector.get("labelSelectors") or {}).items())]
        for expression in selector.get("expressionSelectors") or []:
            labels.append(_expression(expression))
        query = {}
        if labels:
            query["labelSelector"] = ",".join(labels)
        fields = [f"{k}={v}" for k, v in sorted((selector.get("fieldSelectors") or {}).items())]
        if fields:
            query["fieldSelector"] = ",".join(fields)
        phases = selector.get("podPhaseSelectors") or ["Running"]
        found = []
        for ns in namespaces:
            path = f"/api/v1/namespaces/{ns}/pods" + (f"?{urllib.parse.urlencode(query)}" if query else "")
            try:
                items = self.api.request("GET", path).get("items", [])
            except APIError as exc:
                raise Invalid(f"the pods of namespace {ns} cannot be listed: {exc}") from None
            for pod in items:
                meta, status = pod["metadata"], pod.get("status") or {}
                if meta.get("deletionTimestamp") or ("all" not in phases and status.get("phase") not in phases):
                    continue
                if named and meta["name"] not in named.get(ns, []):
                    continue
                if selector.get("nodes") and pod["spec"].get("nodeName") not in selector["nodes"]:
                    continue
                annotations = meta.get("annotations") or {}
                if any(annotations.get(k) != v for k, v in (selector.get("annotationSelectors") or {}).items()):
                    continue
                found.append(pod)
        return found

    # -- injecting ---------------------------------------------------------------------------------

    def _inject(self, run: Run, spec: dict) -> None:
        action = spec.get("action")
        if run.kind == "PodChaos":
            if action not in POD_ACTIONS:
                raise Invalid(f"action must be one of {', '.join(POD_ACTIONS)}, not {action!r}")
            inject = {"pod-kill": self._pod_kill, "pod-failure": self._pod_failure,
                      "container-kill": self._container_kill}[action]  # fmt: skip
        elif run.kind == "NetworkChaos":
            if action not in NETWORK_ACTIONS:
                raise Invalid(f"action must be one of {', '.join(NETWORK_ACTIONS)}, not {action!r}")
            if self.faults is None:
                raise Invalid("the sandbox has no pod network here, so network faults cannot be injected "
                              "(`labkit sandbox status` says why)")  # fmt: skip
            if action in SHAPING:
                shaping(action, spec)  # said wrong: refused before anything is injected
            inject = self._network
        else:
            stressors(spec.get("stressors") or {})
            inject = self._stress
        for target in list(run.targets):
            try:
                done = inject(run, spec, target)
            except (APIError, OSError, ValueError) as exc:
                if isinstance(exc, Invalid):
                    raise
                target.note("Apply", False, str(exc))
                self._event(run, "Failed", f"Failed to apply chaos for {target.id}: {exc}", "Warning")
                continue
            for extra in done:  # container-kill and stress act per container: one record each
                extra.phase, extra.injected = "Injected", extra.injected + 1
                extra.note("Apply", True)
                self._event(run, "Applied", f"Successfully apply chaos for {extra.id}")
            if done and target not in done:
                run.targets.remove(target)
                run.targets.extend(done)

    def _pod_kill(self, run: Run, spec: dict, target: Target) -> list[Target]:
        grace = int(spec.get("gracePeriod", 0))
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": grace,
                "preconditions": {"uid": target.uid}}  # fmt: skip
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{target.namespace}/pods/{target.pod}", body)
        except APIError as exc:
            if exc.status not in (404, 409):
                raise
        return [target]

    def _pod_failure(self, run: Run, spec: dict, target: Target) -> list[Target]:
        pod = self.api.request("GET", f"/api/v1/namespaces/{target.namespace}/pods/{target.pod}")
        annotations, containers = {}, []
        for c in pod["spec"]["containers"]:
            annotations[ORIGINAL_IMAGE + c["name"]] = c.get("image", "")
            containers.append({"name": c["name"], "image": PAUSE_IMAGE})
        self._patch_pod(target.namespace, target.pod, {"metadata": {"annotations": annotations},
                                                       "spec": {"containers": containers}})  # fmt: skip
        target.undo.append(lambda: self._restore_images(target.namespace, target.pod))
        return [target]

    def _restore_images(self, namespace: str, pod_name: str) -> None:
        pod = self.api.get(f"/api/v1/namespaces/{namespace}/pods/{pod_name}")
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return  # gone: its replacement runs the real image
        annotations = pod["metadata"].get("annotations") or {}
        saved = {k[len(ORIGINAL_IMAGE):]: v for k, v in annotations.items() if k.startswith(ORIGINAL_IMAGE)}
        if saved:
            self._patch_pod(namespace, pod_name, {"metadata": {"annotations": {ORIGINAL_IMAGE + k: None for k in saved}},
                                                  "spec": {"containers": [{"name": k, "image": v} for k, v in saved.items()]}})  # fmt: skip

    def _patch_pod(self, namespace: str, name: str, body: dict) -> None:
        self.api.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}", body,
                      content_type=STRATEGIC_MERGE_PATCH)  # fmt: skip

    def _worker(self, target: Target):  # noqa: ANN202 - the pod's PodWorker, on one of this agent's nodes
        worker = self.workers().get(target.uid)
        if worker is None:
            raise ValueError(f"pod {target.namespace}/{target.pod} runs on no node of this agent")
        return worker

    def _containers(self, spec: dict, target: Target, default_all: bool) -> list[Target]:
        worker = self._worker(target)
        names = [c.name for c in worker.containers]
        wanted = spec.get("containerNames") or (names if default_all else names[:1])
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise Invalid(f"pod {target.id} has no container {', '.join(unknown)} (it has {', '.join(names)})")
        return [Target(target.namespace, target.pod, target.uid, container=n) for n in wanted]

    def _container_kill(self, run: Run, spec: dict, target: Target) -> list[Target]:
        if not spec.get("containerNames"):
            raise Invalid("container-kill needs containerNames")
        worker = self._worker(target)
        chosen = self._containers(spec, target, default_all=False)
        for each in chosen:
            if not worker.kill_container(each.container):
                raise ValueError(f"container {each.container} of {target.id} is not running")
        return chosen

    def _stress(self, run: Run, spec: dict, target: Target) -> list[Target]:
        argv = stressors(spec.get("stressors") or {})
        worker = self._worker(target)
        chosen = self._containers(spec, target, default_all=False)
        for each in chosen:
            for command in argv:
                if not worker.stress(each.container, command):
                    raise ValueError(f"container {each.container} of {target.id} is not running")
            each.undo.append(lambda name=each.container: worker.unstress(name))
        return chosen

    def _network(self, run: Run, spec: dict, target: Target) -> list[Target]:
        action = spec["action"]
        address = self._address(target)
        others: list[str] = []
        if spec.get("target"):
            others = [self._address(t) for t in self._select(run, spec, holder=spec["target"])]
        direction = spec.get("direction") or "to"
        if direction not in ("to", "from", "both"):
            raise Invalid(f"direction must be to, from or both, not {direction!r}")
        if direction != "to" and not others:
            raise Invalid(f"direction {direction} needs a target (the pods on the other side)")
        if action == "partition":
            if not others:
                raise Invalid("a partition needs a target: the pods on the other side")
            sources, to = ([address], others) if direction != "from" else (others, [address])
            ids = [self.faults.add({"kind": "partition", "sources": sources, "to": to, "both": direction == "both"}).id]
        else:
            busy = self._shaped(address)
            if busy:
                raise ValueError(f"its traffic is already under {busy} (the sandbox shapes a pod's traffic with "
                                 "one delay, loss or bandwidth fault at a time)")  # fmt: skip
            shape = shaping(action, spec)
            pairs = []
            if direction in ("to", "both"):
                pairs.append(([address], others))
            if direction in ("from", "both"):
                pairs.append((others, [address]))
            ids = [self.faults.add({"kind": action, "sources": s, "to": t, **shape}).id for s, t in pairs]
            target.shaped = {a for s, _ in pairs for a in s}
        target.undo.append(lambda: [self.faults.remove(i) for i in ids])
        return [target]

    def _address(self, target: Target) -> str:
        pod = self.api.get(f"/api/v1/namespaces/{target.namespace}/pods/{target.pod}") or {}
        address = (pod.get("status") or {}).get("podIP")
        if not address:
            raise ValueError(f"pod {target.id} has no address yet")
        return address

    def _shaped(self, address: str) -> str:
        """Which experiment's delay, loss or bandwidth already acts on ``address``'s traffic ('' if none)."""
        for run in self.runs.values():
            if any(t.phase == "Injected" and address in t.shaped for t in run.targets):
                return f"NetworkChaos {run.namespace}/{run.name}"
        return ""

    # -- writing back -------------------------------------------------------------------------------

    def _write_status(self, run: Run) -> None:
        selected = bool(run.targets)
        injected = selected and not run.failure and all(t.injected for t in run.targets)
        recovered = run.stopped and all(t.phase != "Injected" for t in run.targets)

        def condition(kind: str, ok: bool, reason: str = "") -> dict:
            entry = {"type": kind, "status": "True" if ok else "False"}
            if reason:
                entry["reason"] = reason
            return entry

        status = {
            "conditions": [condition("Selected", selected, "" if selected else run.failure),
                           condition("AllInjected", injected, run.failure if run.failure and selected else ""),
                           condition("AllRecovered", recovered), condition("Paused", False)],
            "experiment": {"desiredPhase": "Stop" if run.stopped else "Run",
                           "containerRecords": [t.record() for t in run.targets]},
        }  # fmt: skip
        try:
            self.api.request("PATCH", run.path + "/status", {"status": status}, content_type=MERGE_PATCH)
        except APIError as exc:
            if exc.status != 404:
                self.log(f"chaos {run.namespace}/{run.name}: status: {exc}")

    def _patch(self, obj: dict, body: dict) -> None:
        path = chaosmesh.path(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        try:
            self.api.request("PATCH", path, body, content_type=MERGE_PATCH)
        except APIError as exc:
            if exc.status != 404:
                raise

    def _event(self, run: Run, reason: str, message: str, kind: str = "Normal") -> None:
        involved = {"apiVersion": chaosmesh.GROUP_VERSION, "kind": run.kind, "name": run.name, "namespace": run.namespace,
                    "uid": run.uid}  # fmt: skip
        event = component_event(involved, reason, message, kind=kind, component="chaos-controller-manager")
        try:
            self.api.request("POST", f"/api/v1/namespaces/{run.namespace}/events", event)
        except (APIError, OSError) as exc:
            self.log(f"chaos {run.namespace}/{run.name}: event {reason}: {exc}")


def pick(pods: list[dict], mode: str, value: object) -> list[dict]:
    """Chaos Mesh's modes: ``one`` pod at random, ``all``, ``fixed`` N, ``fixed-percent`` P% (at least one),
    ``random-max-percent`` up to P% (at least one)."""
    if not pods:
        return []
    if mode == "all":
        return pods
    if mode == "one":
        return [random.choice(pods)]
    try:
        number = float(str(value))
    except ValueError:
        raise Invalid(f"mode {mode} needs a numeric value, not {value!r}") from None
    if mode == "fixed":
        count = int(number)
    else:
        if not 0 < number <= 100:
            raise Invalid(f"mode {mode} needs a value from 1 to 100 (percent), not {value!r}")
        top = max(1, math.floor(len(pods) * number / 100))
        count = top if mode == "fixed-percent" else random.randint(1, top)
    if count < 1:
        raise Invalid(f"mode fixed needs a value of at least 1, not {value!r}")
    return random.sample(pods, min(count, len(pods)))


def shaping(action: str, spec: dict) -> dict:
    """A NetworkChaos's delay, loss or bandwidth in the pod network's fault terms."""
    try:
        if action == "delay":
            delay = spec.get("delay") or {}
            if "latency" not in delay:
                raise Invalid("a delay needs delay.latency (such as \"100ms\")")
            return {"delay_ms": duration_seconds(str(delay["latency"])) * 1000,
                    "jitter_ms": duration_seconds(str(delay.get("jitter") or "0s")) * 1000}  # fmt: skip
        if action == "loss":
            loss = spec.get("loss") or {}
            if "loss" not in loss:
                raise Invalid("a loss needs loss.loss, a percentage (such as \"25\")")
            return {"loss_percent": float(str(loss["loss"]))}
        bandwidth = spec.get("bandwidth") or {}
        if "rate" not in bandwidth:
            raise Invalid("a bandwidth limit needs bandwidth.rate (such as \"1mbps\")")
        return {"rate_bps": rate_bits(str(bandwidth["rate"]))}
    except Invalid:
        raise
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def stressors(spec: dict) -> list[list[str]]:
    """The stressor processes a StressChaos's ``stressors`` ask for (``cpu``: workers at a load percent;
    ``memory``: workers each holding a size)."""
    commands = []
    cpu, memory = spec.get("cpu"), spec.get("memory")
    if not cpu and not memory:
        raise Invalid("stressors needs cpu (workers, load) or memory (workers, size)")
    runner = [sys.executable, "-m", "labkit.sandbox.node.stress"]
    try:
        if cpu:
            load = int(cpu.get("load", 100))
            if not 0 < load <= 100:
                raise Invalid("stressors.cpu.load is a percentage, 1 to 100")
            commands += [[*runner, "cpu", str(load)] for _ in range(int(cpu.get("workers", 1)))]
        if memory:
            size = str(memory.get("size") or "256MB")
            if size.endswith("%"):
                raise Invalid("the sandbox takes stressors.memory.size in bytes (\"256MB\", \"1GB\"), not a percentage")
            count = int(parse_quantity(size[:-1] if size.endswith("B") else size))  # "256MB", "1GiB", "64Mi"
            commands += [[*runner, "memory", str(count)] for _ in range(int(memory.get("workers", 1)))]
    except Invalid:
        raise
    except ValueError as exc:
        raise Invalid(f"stressors: {exc}") from None
    return commands


def _expression(expression: dict) -> str:
    key, operator, values = expression.get("key", ""), expression.get("operator", ""), expression.get("values") or []
    if operator == "In":
        return f"{key} in ({','.join(values)})"
    if operator == "NotIn":
        return f"{key} notin ({','.join(values)})"
    if operator == "Exists":
        return key
    if operator == "DoesNotExist":
        return f"!{key}"
    raise Invalid(f"expressionSelectors: operator must be In, NotIn, Exists or DoesNotExist, not {operator!r}")
