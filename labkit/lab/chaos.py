"""Chaos experiments from a notebook: ``lab.chaos``, in Chaos Mesh's own terms.

Every experiment is a Chaos Mesh object (PodChaos, NetworkChaos, StressChaos) in
the lab's namespace, so a lab that injects faults this way runs unchanged on a
cluster with Chaos Mesh, and ``kubectl get podchaos`` shows the same thing the
notebook does. In the sandbox the node agent carries them out::

    kill = lab.chaos.pod_kill("deployment/worker")                # one of its pods, at random
    lab.chaos.pod_failure("app=api", duration="20s", mode="all")   # pods that serve nothing for 20 s
    lab.chaos.delay("deployment/worker", "100ms", jitter="10ms", to="deployment/store")
    lab.chaos.partition("pod/etcd-0", "app=etcd")                 # cut one pod off from the others
    lab.chaos.stress_memory("deployment/worker", "200MB", duration="30s")
    kill.wait_injected(); kill.status(); kill.delete()
    lab.chaos.apply(yaml_text)                                     # any Chaos Mesh manifest

A target is a workload (``deployment/web``: the pods it selects), a pod
(``pod/web-0``), a label selector (``app=web``), or a list of those (their pods,
by name: ``lab.chaos.partition("pod/etcd-0", ["pod/etcd-1", "pod/etcd-2"])``).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from labkit import display, manifests
from labkit.errors import LabkitError
from labkit.kube import chaosmesh
from labkit.kube.chaosmesh import GROUP_VERSION, PLURALS

if TYPE_CHECKING:
    from labkit.lab.context import LabContext


class Experiment:
    """One chaos experiment in the lab's namespace: its status as the chaos controller writes it."""

    def __init__(self, lab: LabContext, kind: str, name: str) -> None:
        self.lab = lab
        self.kind = kind
        self.name = name
        self.created = time.time()

    @property
    def path(self) -> str:
        return chaosmesh.path(self.kind, self.lab.namespace, self.name)

    def object(self) -> dict | None:
        try:
            return self.lab.request("GET", self.path)
        except LabkitError:
            return None

    def status(self) -> dict:
        return (self.object() or {}).get("status") or {}

    def conditions(self) -> dict[str, bool]:
        """Selected, AllInjected, AllRecovered, Paused: whether each is True."""
        return {c["type"]: c.get("status") == "True" for c in self.status().get("conditions", [])}

    def records(self) -> list[dict]:
        """One per target: its id (namespace/pod[/container]), phase (Injected, NotInjected) and history."""
        return (self.status().get("experiment") or {}).get("containerRecords") or []

    @property
    def phase(self) -> str:
        """Run while it is in force (or being put in force), Stop once it has ended."""
        return (self.status().get("experiment") or {}).get("desiredPhase") or "Pending"

    def problem(self) -> str:
        """Why it failed, in the controller's words ('' if it did not)."""
        for c in self.status().get("conditions", []):
            if c.get("status") == "False" and c.get("reason"):
                return c["reason"]
        return ""

    def wait_injected(self, timeout: float = 30) -> Experiment:
        """Wait until every target has the fault; fails, saying why, if the controller could not inject it."""
        return self._wait("AllInjected", timeout)

    def wait_recovered(self, timeout: float = 120) -> Experiment:
        """Wait until it has ended (its duration ran out, or it was deleted) and every fault is removed."""
        return self._wait("AllRecovered", timeout)

    def _wait(self, condition: str, timeout: float) -> Experiment:
        deadline = time.monotonic() + timeout
        line = display.StatusLine()
        while True:
            state = self.conditions()
            problem = self.problem()
            if state.get(condition) and not (condition == "AllInjected" and problem):
                line.finish(f"{self.kind}/{self.name}: {condition}")
                return self
            if problem:
                line.finish(f"{self.kind}/{self.name}: failed", ok=False)
                raise LabkitError(f"{self.kind} {self.name} failed: {problem}",
                                  hint=f"`lab.kubectl('describe {PLURALS[self.kind]} {self.name}')` shows its events.")  # fmt: skip
            if time.monotonic() > deadline:
                line.finish(f"{self.kind}/{self.name}: not {condition} after {timeout:.0f} s", ok=False)
                raise LabkitError(f"{self.kind} {self.name} was not {condition} after {timeout:.0f} s.",
                                  hint=self.lab.chaos.controller_hint())  # fmt: skip
            line.update(f"{self.kind}/{self.name}: waiting for {condition}")
            time.sleep(0.1)

    def delete(self, quiet: bool = False) -> None:
        """End it now: its faults are removed before the object goes."""
        try:
            self.lab.request("DELETE", self.path)
        except LabkitError:
            pass  # gone already (or with the namespace)
        self.lab.chaos.experiments.pop(self.name, None)
        if not quiet:
            self.lab.say(f"{self.kind}/{self.name} deleted")

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}: {self.phase}>"


class Chaos:
    """The lab's chaos experiments (``lab.chaos``)."""

    def __init__(self, lab: LabContext) -> None:
        self.lab = lab
        self.experiments: dict[str, Experiment] = {}

    # -- any manifest ---------------------------------------------------------------------------

    def apply(self, manifest: Any) -> Experiment | list[Experiment]:
        """Create the Chaos Mesh objects in ``manifest`` (YAML text, a dict, a file); the experiment(s)."""
        made = []
        for obj in manifests.load(manifest):
            if obj.get("apiVersion") != GROUP_VERSION or obj.get("kind") not in PLURALS:
                raise LabkitError(f"{obj.get('kind')} ({obj.get('apiVersion')}) is not a chaos experiment.",
                                  hint=f"Use {', '.join(PLURALS)} of {GROUP_VERSION}; lab.apply() takes anything else.")  # fmt: skip
            self.lab.apply(obj, action=False)  # a fault, not the trainee's remedy
            experiment = Experiment(self.lab, obj["kind"], obj["metadata"]["name"])
            self.experiments[experiment.name] = experiment
            made.append(experiment)
        return made[0] if len(made) == 1 else made

    def _make(self, kind: str, action: str | None, target: str | list[str], spec: dict, name: str | None) -> Experiment:
        body = {"selector": self.selector(target), **spec}
        if action:
            body["action"] = action
        body = {k: v for k, v in body.items() if v is not None}
        slug = (action or kind.lower().replace("chaos", "")).replace("-", "")
        return self.apply({"apiVersion": GROUP_VERSION, "kind": kind,
                           "metadata": {"name": name or f"{slug}-{secrets.token_hex(2)}"}, "spec": body})  # fmt: skip

    def selector(self, target: str | list[str]) -> dict:
        """A Chaos Mesh selector for ``target``: a workload's pods, one pod, or a label selector; or, for a list of
        those, all their pods by name (a selector's fields narrow each other, so a union is named pod by pod)."""
        if isinstance(target, (list, tuple)):
            names: set[str] = set()
            for one in target:
                pods = self.lab.pods(one) if "=" in one and "/" not in one else self.lab.pods_of(one)
                names |= {p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")}
            if not names:
                raise LabkitError(f"{', '.join(target)}: no pods to aim at.", hint="`lab.wait_ready(...)` first.")
            return {"pods": {self.lab.namespace: sorted(names)}}
        if "=" in target and "/" not in target:
            labels = dict(part.split("=", 1) for part in target.split(","))
            return {"labelSelectors": {k.strip(): v.strip() for k, v in labels.items()}}
        kind, name = self.lab.locate(target)
        if kind.kind == "Pod":
            return {"pods": {self.lab.namespace: [name]}}
        obj = self.lab.get(target)
        if obj is None:
            raise LabkitError(f"There is no {target} in the lab's namespace to aim at.",
                              hint="Apply it first, or aim at a label selector such as 'app=web'.")  # fmt: skip
        labels = (obj.get("spec", {}).get("selector") or {}).get("matchLabels")
        if not labels:
            raise LabkitError(f"{target} has no matchLabels selector to aim at.", hint="Aim at a label selector instead.")
        return {"labelSelectors": dict(labels)}

    # -- PodChaos -------------------------------------------------------------------------------

    def pod_kill(self, target: str | list[str], *, mode: str = "one", value: str | int | None = None, grace_period: int = 0,
                 name: str | None = None) -> Experiment:  # fmt: skip
        """Delete ``target``'s pods (``mode``: one, all, fixed, fixed-percent, random-max-percent)."""
        return self._make("PodChaos", "pod-kill", target, {"mode": mode, "value": _str(value),
                                                           "gracePeriod": grace_period}, name)  # fmt: skip

    def pod_failure(self, target: str | list[str], *, duration: str = "30s", mode: str = "one", value: str | int | None = None,
                    name: str | None = None) -> Experiment:  # fmt: skip
        """Make ``target``'s pods serve nothing for ``duration`` (their containers run the pause image)."""
        return self._make("PodChaos", "pod-failure", target, {"mode": mode, "value": _str(value),
                                                              "duration": duration}, name)  # fmt: skip

    def container_kill(self, target: str | list[str], containers: list[str] | str, *, mode: str = "one",
                       value: str | int | None = None, name: str | None = None) -> Experiment:  # fmt: skip
        """Kill the named containers of ``target``'s pods (they restart per the pod's restartPolicy)."""
        names = [containers] if isinstance(containers, str) else list(containers)
        return self._make("PodChaos", "container-kill", target, {"mode": mode, "value": _str(value),
                                                                 "containerNames": names}, name)  # fmt: skip

    # -- NetworkChaos ---------------------------------------------------------------------------

    def _network(self, action: str, target: str | list[str], spec: dict, to: str | list[str] | None, direction: str,
                 duration: str | None, mode: str, name: str | None) -> Experiment:  # fmt: skip
        extra = {"mode": mode, "direction": direction, "duration": duration, **spec}
        if to is not None:
            extra["target"] = {"mode": "all", "selector": self.selector(to)}
        return self._make("NetworkChaos", action, target, extra, name)

    def delay(self, target: str | list[str], latency: str = "100ms", *, jitter: str = "0ms", to: str | list[str] | None = None,
              direction: str = "to", duration: str | None = None, mode: str = "all",
              name: str | None = None) -> Experiment:  # fmt: skip
        """Delay what ``target``'s pods send (only to ``to``'s pods if given) by ``latency`` ± ``jitter``."""
        return self._network("delay", target, {"delay": {"latency": latency, "jitter": jitter}}, to, direction,
                             duration, mode, name)  # fmt: skip

    def loss(self, target: str | list[str], percent: float, *, to: str | list[str] | None = None, direction: str = "to",
             duration: str | None = None, mode: str = "all", name: str | None = None) -> Experiment:  # fmt: skip
        """Drop ``percent`` of what ``target``'s pods send."""
        return self._network("loss", target, {"loss": {"loss": f"{percent:g}"}}, to, direction, duration, mode, name)

    def bandwidth(self, target: str | list[str], rate: str, *, to: str | list[str] | None = None, direction: str = "to",
                  duration: str | None = None, mode: str = "all", name: str | None = None) -> Experiment:  # fmt: skip
        """Limit what ``target``'s pods send to ``rate`` (``"1mbit"`` bits, ``"1mbps"`` bytes a second)."""
        return self._network("bandwidth", target, {"bandwidth": {"rate": rate}}, to, direction, duration, mode, name)

    def partition(self, target: str | list[str], other: str | list[str], *, direction: str = "both", duration: str | None = None,
                  mode: str = "all", name: str | None = None) -> Experiment:  # fmt: skip
        """Cut ``target``'s pods off from ``other``'s (both ways, or ``direction`` to / from); either side may be a
        list (``["pod/etcd-1", "pod/etcd-2"]``)."""
        return self._network("partition", target, {}, other, direction, duration, mode, name)

    # -- StressChaos ----------------------------------------------------------------------------

    def stress_cpu(self, target: str | list[str], *, workers: int = 1, load: int = 100, duration: str = "30s", mode: str = "one",
                   name: str | None = None) -> Experiment:  # fmt: skip
        """Keep ``workers`` CPUs busy at ``load`` percent inside ``target``'s pods."""
        return self._make("StressChaos", None, target, {"mode": mode, "duration": duration,
                                                        "stressors": {"cpu": {"workers": workers, "load": load}}}, name)  # fmt: skip

    def stress_memory(self, target: str | list[str], size: str = "256MB", *, workers: int = 1, duration: str = "30s",
                      mode: str = "one", name: str | None = None) -> Experiment:  # fmt: skip
        """Hold ``size`` of memory (per worker) inside ``target``'s pods: it counts toward their limit."""
        return self._make("StressChaos", None, target, {"mode": mode, "duration": duration,
                                                        "stressors": {"memory": {"workers": workers, "size": size}}}, name)  # fmt: skip

    # -- all of them ----------------------------------------------------------------------------

    def list(self) -> None:
        """Show the namespace's experiments: kind, name, action, phase, targets."""
        rows = []
        for kind in PLURALS:
            for obj in self.lab.request("GET", chaosmesh.path(kind, self.lab.namespace)).get("items", []):
                status = obj.get("status") or {}
                records = (status.get("experiment") or {}).get("containerRecords") or []
                rows.append((kind, obj["metadata"]["name"], obj["spec"].get("action", "stress"),
                             (status.get("experiment") or {}).get("desiredPhase", "Pending"),
                             ", ".join(f"{r['id'].split('/', 1)[1]} ({r['phase']})" for r in records) or "-"))  # fmt: skip
        display.table(rows, ("KIND", "NAME", "ACTION", "PHASE", "TARGETS"))

    def clear(self, quiet: bool = False) -> None:
        """Delete every experiment this lab made (their faults are removed)."""
        for experiment in list(self.experiments.values()):
            experiment.delete(quiet=quiet)

    def controller_hint(self) -> str:
        if self.lab.cluster.sandbox:
            return "The sandbox's node agent carries experiments out: `labkit sandbox status` shows whether it runs."
        return "Is Chaos Mesh installed on this cluster? `kubectl get crd podchaos.chaos-mesh.org` tells."


def _str(value: str | int | None) -> str | None:
    return None if value is None else str(value)

