"""Pods as local processes: the pod workers of one node, and the watch that feeds them.

Mirrors the kubelet's decomposition: a ``PodSource`` lists and watches the Pods
bound to its node (with the node's own credentials), and hands every change to
that pod's ``PodWorker``, a thread that drives the pod toward its spec (start
containers, restart them per ``restartPolicy`` with the kubelet's back-off,
stop them gracefully when the pod is deleted) and writes the pod's status back
as the API documents it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from labkit.sandbox.kubeapi import STRATEGIC_MERGE_PATCH, APIError, KubeAPI, api_time, kubelet_event
from labkit.sandbox.node import images
from labkit.sandbox.node.logs import ContainerLog

BACKOFF_START = 10.0  # the kubelet's CrashLoopBackOff: 10 s, doubling, at most 5 min
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0  # a container that ran 10 min resets its back-off
PULL_BACKOFF_MAX = 300.0


@dataclass
class Container:
    """One container of a pod and the process that stands for it."""

    spec: dict
    process: subprocess.Popen | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    image_id: str = ""
    last_state: dict = field(default_factory=dict)
    next_start: float = 0.0
    backoff: float = 0.0  # the first restart is immediate, then 10 s, 20 s, 40 s ... 5 min
    done: bool = False  # terminated and not to be restarted
    restarting: bool = False  # exited, to be started again: the next start counts as a restart

    @property
    def name(self) -> str:
        return self.spec["name"]


class PodWorker(threading.Thread):
    """Drives one pod toward its spec and reports its status."""

    def __init__(self, pod: dict, api: KubeAPI, node: str, workdir: Path, log) -> None:  # noqa: ANN001
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}-{meta['name']}", daemon=True)
        self.pod = pod
        self.api = api
        self.node = node
        self.workdir = workdir
        self.log = log
        self.lock = threading.Lock()
        self.containers = [Container(spec) for spec in pod["spec"].get("containers", [])]
        self.start_time = api_time()
        self.finished = threading.Event()
        self.last_reported: str | None = None
        self.lost = False  # the node is gone: kill, but tell the API nothing

    # -- inputs ------------------------------------------------------------------------------

    def update(self, pod: dict) -> None:
        with self.lock:
            self.pod = pod

    @property
    def path(self) -> str:
        meta = self.pod["metadata"]
        return f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"

    def event(self, reason: str, message: str, kind: str = "Normal", container: str | None = None) -> None:
        meta = self.pod["metadata"]
        involved = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                    "uid": meta["uid"]}  # fmt: skip
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        try:
            self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events",
                             kubelet_event(involved, reason, message, kind=kind, node=self.node))
        except (APIError, OSError) as exc:
            self.log(f"event {reason} for {meta['name']}: {exc}")

    # -- the loop ----------------------------------------------------------------------------

    def unsupported(self) -> list[str]:
        """The parts of this pod's spec the agent does not honour yet: said, never silently dropped."""
        spec = self.pod["spec"]
        found = []
        if spec.get("initContainers"):
            found.append("initContainers")
        if spec.get("volumes"):
            found.append("volumes")
        for c in spec.get("containers", []):
            for key in ("livenessProbe", "readinessProbe", "startupProbe", "envFrom", "volumeMounts", "lifecycle"):
                if c.get(key):
                    found.append(f"{key} (container {c['name']})")
            if any("valueFrom" in e for e in c.get("env", [])):
                found.append(f"env valueFrom (container {c['name']})")
            if c.get("resources", {}).get("limits"):
                found.append(f"resource limits (container {c['name']})")
        return found

    def run(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        missing = self.unsupported()
        if missing:
            self.event("Unsupported", "labkit's node agent does not honour these yet, and runs the pod without "
                       "them: " + "; ".join(missing), kind="Warning")  # fmt: skip
        try:
            while True:
                with self.lock:
                    deleting = self.pod["metadata"].get("deletionTimestamp") is not None
                if deleting:
                    self._terminate()
                    return
                self._sync()
                self._report()
                time.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 - a bad pod must never take the agent down
            self.log(f"pod worker {self.name} failed: {exc!r}")
            self.event("FailedSync", f"labkit node agent error: {exc}", kind="Warning")
        finally:
            self._kill_all()
            self.finished.set()

    def _sync(self) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for container in self.containers:
            if container.process is not None:
                code = container.process.poll()
                if code is None:
                    continue
                self._exited(container, code, policy)
            if container.done or time.monotonic() < container.next_start:
                continue
            self._start(container)

    def _start(self, container: Container) -> None:
        image = images.resolve(container.spec.get("image", ""))
        if image is None:
            message = (f"Failed to pull image \"{container.spec.get('image')}\": labkit's image catalog has no "
                       "such image (the sandbox runs busybox, alpine, python and the course's own apps)")  # fmt: skip
            # A failed pull (ErrImagePull) and the wait before the next (ImagePullBackOff) alternate.
            previous = container.state.get("waiting", {}).get("reason")
            reason = "ImagePullBackOff" if previous == "ErrImagePull" else "ErrImagePull"
            container.state = {"waiting": {"reason": reason, "message": message}}
            if reason == "ErrImagePull":
                self.event("Failed", message, kind="Warning", container=container.name)
            else:
                self.event("BackOff", f"Back-off pulling image \"{container.spec.get('image')}\"",
                           container=container.name)  # fmt: skip
            delay = container.backoff
            container.backoff = min(PULL_BACKOFF_MAX, max(BACKOFF_START, container.backoff * 2))
            container.next_start = time.monotonic() + max(delay, 1.0)
            return
        container.image_id = image.image_id
        argv = image.argv(container.spec.get("command"), container.spec.get("args"))
        program = images.executable(argv[0]) if argv else None
        if program is None:
            message = f"exec: \"{argv[0] if argv else ''}\": executable file not found in $PATH"
            container.state = {"waiting": {"reason": "RunContainerError", "message": message}}
            self.event("Failed", f"Error: {message}", kind="Warning", container=container.name)
            container.next_start = time.monotonic() + container.backoff
            container.backoff = min(BACKOFF_MAX, max(BACKOFF_START, container.backoff * 2))
            return
        argv[0] = program
        stdout, stderr = ContainerLog(self.workdir / "logs" / container.name).open(
            container.restarts + (1 if container.restarting else 0))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": self.pod["metadata"]["name"]}
        for item in container.spec.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
        cwd = self.workdir / "root" / container.spec.get("workingDir", "").lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        if container.restarts == 0 and container.started_at is None:
            self.event("Pulled", f"Container image \"{image.reference}\" already present on machine",
                       container=container.name)  # fmt: skip
        try:
            container.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                                  stderr=stderr, env=env, cwd=cwd,
                                                  start_new_session=True)  # fmt: skip
        except OSError as exc:
            container.state = {"waiting": {"reason": "RunContainerError", "message": str(exc)}}
            self.event("Failed", f"Error: {exc}", kind="Warning", container=container.name)
            container.next_start = time.monotonic() + container.backoff
            return
        finally:
            os.close(stdout)
            os.close(stderr)
        if container.restarting:
            container.restarts += 1
            container.restarting = False
        container.started_at = api_time()
        container.started_mono = time.monotonic()
        container.state = {"running": {"startedAt": container.started_at}}
        self.event("Created", f"Created container: {container.name}", container=container.name)
        self.event("Started", f"Started container {container.name}", container=container.name)

    def _exited(self, container: Container, code: int, policy: str) -> None:
        exit_code = code if code >= 0 else 128 - code  # killed by signal N -> 128 + N
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": container.started_at,
            "finishedAt": api_time(),
            "containerID": f"labkit://{container.process.pid}" if container.process else "",
        }
        container.process = None
        restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if not restart:
            container.state = {"terminated": terminated}
            container.done = True
            return
        if time.monotonic() - container.started_mono >= BACKOFF_RESET_AFTER:
            container.backoff = 0.0
        container.last_state = {"terminated": terminated}
        container.restarting = True
        delay = container.backoff
        container.backoff = min(BACKOFF_MAX, max(BACKOFF_START, container.backoff * 2))
        container.next_start = time.monotonic() + delay
        message = f"back-off {delay:.0f}s restarting failed container={container.name} pod={self.pod['metadata']['name']}"
        container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        self.event("BackOff", "Back-off restarting failed container", kind="Warning", container=container.name)

    # -- status ------------------------------------------------------------------------------

    def _phase(self) -> str:
        if any("running" in c.state for c in self.containers):
            return "Running"
        if self.containers and all(c.done for c in self.containers):
            return "Succeeded" if all(c.state["terminated"]["exitCode"] == 0 for c in self.containers) else "Failed"
        if any(c.restarts or c.started_at for c in self.containers):
            return "Running"
        return "Pending"

    def status(self) -> dict:
        stamp = api_time()
        statuses = []
        for c in self.containers:
            running = "running" in c.state
            entry = {
                "name": c.name, "image": c.spec.get("image", ""),
                "imageID": c.image_id,
                "ready": running, "started": running, "restartCount": c.restarts,
                "state": c.state, "lastState": c.last_state,
            }  # fmt: skip
            if c.process is not None:
                entry["containerID"] = f"labkit://{c.process.pid}"
            statuses.append(entry)
        all_ready = bool(statuses) and all(s["ready"] for s in statuses)
        phase = self._phase()
        ready_reason = None if all_ready else ("PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady")

        def condition(kind: str, ok: bool, reason: str | None = None) -> dict:
            entry = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                     "lastTransitionTime": stamp}  # fmt: skip
            if reason:
                entry["reason"] = reason
            return entry

        return {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                condition("PodReadyToStartContainers", True),
                condition("Initialized", True),
                condition("ContainersReady", all_ready, ready_reason),
                condition("Ready", all_ready, ready_reason),
            ],
            "containerStatuses": statuses,
        }

    def _report(self, force: bool = False) -> None:
        if self.lost:
            return
        status = self.status()
        # Transition times are only written when something else changed, as the status manager does.
        key = json.dumps({**status, "conditions": [(c["type"], c["status"]) for c in status["conditions"]]},
                         sort_keys=True)  # fmt: skip
        if key == self.last_reported and not force:
            return
        try:
            self.api.request("PATCH", self.path + "/status",
                             {"metadata": {"uid": self.pod["metadata"]["uid"]}, "status": status},
                             content_type=STRATEGIC_MERGE_PATCH)  # fmt: skip
            self.last_reported = key
        except APIError as exc:
            if exc.status != 404:
                self.log(f"status of {self.name}: {exc}")
        except OSError as exc:
            self.log(f"status of {self.name}: {exc}")

    # -- stopping ----------------------------------------------------------------------------

    def _terminate(self) -> None:
        """Graceful deletion: SIGTERM, the grace period, SIGKILL; then the final delete."""
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        running = [c for c in self.containers if c.process is not None and c.process.poll() is None]
        for c in running:
            if not self.lost:
                self.event("Killing", f"Stopping container {c.name}", container=c.name)
            _signal_group(c.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.process.poll() is None for c in running):
            time.sleep(0.1)
        self._kill_all()
        for c in running:
            code = c.process.returncode if c.process else -9
            c.state = {"terminated": {"exitCode": code if code >= 0 else 128 - code,
                                      "reason": "Error" if code else "Completed",
                                      "startedAt": c.started_at, "finishedAt": api_time()}}  # fmt: skip
            c.done = True
        self._report(force=True)
        if self.lost:
            return
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}  # fmt: skip
        try:
            self.api.request("DELETE", self.path, body)
        except APIError as exc:
            if exc.status not in (404, 409):
                self.log(f"final delete of {self.name}: {exc}")

    def _kill_all(self) -> None:
        for c in self.containers:
            if c.process is not None and c.process.poll() is None:
                _signal_group(c.process, signal.SIGKILL)
                c.process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


class PodSource(threading.Thread):
    """Lists and watches the pods bound to one node; keeps one worker per pod."""

    def __init__(self, node: str, api: KubeAPI, root: Path, stopping: threading.Event, log) -> None:  # noqa: ANN001
        super().__init__(name=f"pods-{node}", daemon=True)
        self.node = node
        self.api = api
        self.root = root
        self.stopping = stopping
        self.log = log
        self.workers: dict[str, PodWorker] = {}
        self.paused = threading.Event()  # set while the node is "lost"

    def _selector(self) -> str:
        return urllib.parse.quote(f"spec.nodeName={self.node}")

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.paused.is_set():
                self.stop_all()
                self.stopping.wait(0.5)
                continue
            try:
                listing = self.api.request("GET", f"/api/v1/pods?fieldSelector={self._selector()}")
                seen = set()
                for pod in listing.get("items", []):
                    seen.add(pod["metadata"]["uid"])
                    self._handle("MODIFIED", pod)
                for uid in set(self.workers) - seen:
                    self._forget(uid)
                self._watch(listing["metadata"]["resourceVersion"])
            except (APIError, OSError, ValueError) as exc:
                self.log(f"pods of {self.node}: {exc}; listing again")
                self.stopping.wait(1.0)

    def _watch(self, version: str) -> None:
        path = (f"/api/v1/pods?fieldSelector={self._selector()}&watch=1&resourceVersion={version}"
                "&timeoutSeconds=60&allowWatchBookmarks=true")  # fmt: skip
        for event in self.api.stream(path):
            if self.stopping.is_set() or self.paused.is_set():
                return
            kind, pod = event["type"], event["object"]
            if kind == "ERROR":
                return  # e.g. 410 Gone: list again
            if kind != "BOOKMARK":
                self._handle(kind, pod)

    def _handle(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            self._forget(uid)
            return
        if worker is None:
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):
                return  # finished before this agent started: nothing to run
            folder = self.root / f"{pod['metadata']['namespace']}_{pod['metadata']['name']}_{uid}"
            worker = PodWorker(pod, self.api, self.node, folder, self.log)
            self.workers[uid] = worker
            worker.start()
        else:
            worker.update(pod)

    def _forget(self, uid: str, lost: bool = False) -> None:
        worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.lost = lost
            with worker.lock:
                worker.pod["metadata"].setdefault("deletionTimestamp", api_time())
                worker.pod["metadata"]["deletionGracePeriodSeconds"] = 0

    def stop_all(self) -> None:
        """The node is lost: its processes die with it, with no grace."""
        for uid in list(self.workers):
            self._forget(uid, lost=True)
