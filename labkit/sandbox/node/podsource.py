"""The pods bound to one node: listed and watched with the node's credentials, one pod worker each.

As the kubelet's config source feeds its pod workers: every change of a pod bound to the
node reaches that pod's ``PodWorker`` (``pods.py``), which is made for a pod the node has
not seen, and told to forget a pod that is gone. A lost node (``lose``) forgets them all
at once; found again (``resume``), it lists its pods and runs them anew.
"""

from __future__ import annotations

import shutil
import threading
import urllib.parse
from pathlib import Path

from labkit.kube.cache import ObjectCache
from labkit.kube.client import KubeAPI
from labkit.kube.events import EventSink
from labkit.kube.watch import ListWatch
from labkit.sandbox.node import logs, namespaces, probes, runtime, usage
from labkit.sandbox.node.context import NodeContext
from labkit.sandbox.node.network import Networking
from labkit.sandbox.node.pods import PodWorker

OBJECT_TTL = 1.0  # ConfigMaps and Secrets read for a node's pods are reused this long


class PodSource(threading.Thread):
    """Lists and watches the pods bound to one node; keeps one worker per pod."""

    def __init__(self, node: str, api: KubeAPI, root: Path, stopping: threading.Event, log,  # noqa: ANN001
                 allocatable: dict | None = None, networking: Networking | None = None,
                 monitor: usage.Monitor | None = None, capture: logs.Capture | None = None) -> None:  # fmt: skip
        super().__init__(name=f"pods-{node}", daemon=True)
        self.monitor = monitor or usage.Monitor.start_new()  # the agent's, shared by its nodes
        self.capture = capture or logs.Capture.start_new()
        self.allocatable = allocatable or {}
        self.node = node
        self.api = api
        self.root = root
        self.stopping = stopping
        self.log = log
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.RLock()  # the workers, changed by the watch and by a lost node
        self.paused = threading.Event()  # set while the node is "lost"
        self.events = EventSink(api, log)
        self.objects = ObjectCache(api, OBJECT_TTL)
        self.relist = probes.Relist()  # when this node's probes see a new container
        self.context: NodeContext | None = None  # made once it is known whether containers get namespaces
        self.networking = networking  # the agent's pod network, shared by its nodes (None: pods have no addresses)
        self._cidr: str | None = None

    def pod_cidr(self) -> str | None:
        """The node's pod address range, as the controller manager assigned it (read until it has)."""
        if self._cidr is None:
            node = self.api.get(f"/api/v1/nodes/{self.node}") or {}
            self._cidr = node.get("spec", {}).get("podCIDR")
        return self._cidr

    def _selector(self) -> str:
        return urllib.parse.quote(f"spec.nodeName={self.node}")

    def run(self) -> None:
        self.context = NodeContext(self.node, self.api, self.log, self.events, self.objects, self.relist,
                                   self.allocatable, runtime.for_this_machine(namespaces.available()), self.monitor,
                                   self.capture, self.networking, self.pod_cidr)  # fmt: skip
        while not self.stopping.is_set():
            if self.paused.is_set():
                self.stop_all()
                self.stopping.wait(0.5)
                continue
            pods = ListWatch(self.api, "/api/v1/pods", query={"fieldSelector": f"spec.nodeName={self.node}"},
                             stop=lambda: self.stopping.is_set() or self.paused.is_set(), wait=self.stopping.wait,
                             log=lambda m: self.log(f"pods of {self.node}: {m}"))  # fmt: skip
            for change, found in pods:
                if change != "LISTED":
                    self._handle(change, found)
                    continue
                seen = set()
                for pod in found:
                    seen.add(pod["metadata"]["uid"])
                    self._handle("MODIFIED", pod)
                for uid in set(self.workers) - seen:
                    self._forget(uid)
                self._collect(seen)

    def _collect(self, live: set[str]) -> None:
        """Remove the folders of pods that no longer exist (deleted while the agent was away)."""
        for folder in self.root.iterdir() if self.root.is_dir() else []:
            uid = folder.name.rsplit("_", 1)[-1]
            if uid not in live and uid not in self.workers:
                shutil.rmtree(folder, ignore_errors=True)

    def _handle(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            if self.paused.is_set():
                return
            worker = self.workers.get(uid)
            if kind == "DELETED":
                self._forget(uid)
                return
            if worker is None:
                phase = pod.get("status", {}).get("phase")
                if phase in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):
                    return  # finished before this agent started: nothing to run
                folder = self.root / f"{pod['metadata']['namespace']}_{pod['metadata']['name']}_{uid}"
                worker = PodWorker(pod, self.context, folder)
                self.workers[uid] = worker
                worker.start()
            else:
                worker.update(pod)

    def _forget(self, uid: str, lost: bool = False) -> None:
        with self.lock:
            worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.lost = worker.lost or lost  # at once: a lost node's pods report nothing more
            worker.forget(lost)

    def current(self) -> list[PodWorker]:
        with self.lock:
            return list(self.workers.values())

    def lose(self) -> None:
        """The node is lost: no more pods start, and its processes die at once, with no grace."""
        self.paused.set()
        self.stop_all()

    def resume(self) -> None:
        """The node is back: run its pods again (listed now: the watch may be idle for a while yet)."""
        listing = self.api.request("GET", f"/api/v1/pods?fieldSelector={self._selector()}")
        self.paused.clear()
        for pod in listing.get("items", []):
            self._handle("MODIFIED", pod)

    def stop_all(self) -> None:
        with self.lock:
            for uid in list(self.workers):
                self._forget(uid, lost=True)
