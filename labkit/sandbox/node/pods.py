"""Pods as local processes: one ``PodWorker`` per pod, as the kubelet's pod workers.

A worker is a thread that drives its pod toward its spec (start containers,
restart them per ``restartPolicy`` with the kubelet's back-off, stop them
gracefully when the pod is deleted) and writes the pod's status back as the API
documents it (``podstatus.py``). It is fed by a queue of work (``work.py``) from
the node's watch (``podsource.py``), chaos experiments, its containers' ended
processes and their probes; the container runtime (``runtime.py``: isolated or
plain) makes sandboxes and processes; what the node's workers share comes in one
``NodeContext``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from labkit.sandbox import procs
from labkit.kube import quantity
from labkit.kube.client import STRATEGIC_MERGE_PATCH
from labkit.kube.errors import APIError
from labkit.kube.events import api_time, kubelet_event
from labkit.sandbox.node import cpuweight, envvars, images, podstatus, probes, runtime, usage
from labkit.sandbox.node.context import NodeContext
from labkit.sandbox.node.work import Forget, Kill, Stress, Unstress, Update, Wake, Work
from labkit.sandbox.node.logs import ContainerLog
from labkit.sandbox.node.dns import pod_files
from labkit.sandbox.node.network import NetworkError
from labkit.sandbox.node.volumes import MountError, PodVolumes

BACKOFF_START = 10.0  # the kubelet's CrashLoopBackOff: 10 s, doubling, at most 5 min
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0  # a container that ran 10 min resets its back-off
PULL_BACKOFF_MAX = 300.0
CONFIG_RETRY = 2.0  # a container waiting for a ConfigMap or Secret is tried again this often
SYNC_RETRY = 2.0  # a pod whose sync failed unexpectedly is synced again after this
AUTHORIZER_RETRIES, AUTHORIZER_RETRY_SECONDS = 10, 0.05  # a node's request the API server refuses (as_node)
STANDARD_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
UNSUPPORTED_FEATURES = ("resizePolicy",)
TICK = 0.5  # a pod worker looks at its pod at least this often (memory is sampled as often: usage.INTERVAL)
ASK_TIMEOUT = 10.0  # what chaos asks of a pod worker is answered within this, or taken as refused
T = TypeVar("T")


@dataclass
class Container:
    """One container of a pod and the process that stands for it."""

    spec: dict
    init: bool = False
    ephemeral: bool = False  # added to the running pod (``kubectl debug``): run once, never restarted, never ready
    announced: bool = False  # an ephemeral container's unsupported parts have been said
    process: subprocess.Popen | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    started_wall: float = 0.0
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    image_id: str = ""
    last_state: dict = field(default_factory=dict)
    next_start: float = 0.0
    backoff: float = 0.0  # the first restart is immediate, then 10 s, 20 s, 40 s ... 5 min
    done: bool = False  # terminated and not to be restarted
    restarting: bool = False  # exited, to be started again: the next start counts as a restart
    prober: probes.Prober | None = None
    env: dict = field(default_factory=dict)
    cwd: str = "/"
    kill_deadline: float = 0.0  # being stopped: SIGKILL at this time
    oom: bool = False
    measured: usage.Usage | None = None  # CPU and memory, from the last sample
    container_id: str = ""  # the last attempt's, kept after it ends (as a runtime's container record is)
    changed: bool = False  # its image was changed in the pod's spec: restart it with the new one
    joined: runtime.Joined = field(default_factory=runtime.Joined)  # execs and injected load (StressChaos)
    console: runtime.Console | None = None  # its stdin and terminal, with ``stdin`` or ``tty`` (attach)
    log: ContainerLog | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def memory_limit(self) -> float | None:
        limit = self.spec.get("resources", {}).get("limits", {}).get("memory")
        return quantity.parse(limit) if limit else None

    @property
    def succeeded(self) -> bool:
        return self.done and self.state.get("terminated", {}).get("exitCode") == 0


class PodWorker(threading.Thread):
    """Drives one pod toward its spec and reports its status."""

    def __init__(self, pod: dict, context: NodeContext, workdir: Path) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}-{meta['name']}", daemon=True)
        self.pod = pod
        self.context = context  # the node's: its API client, events, caches, runtime, network
        self.runtime = context.runtime
        self.isolated = context.isolated
        self.api, self.node, self.log = context.api, context.node, context.log
        self.allocatable, self.events, self.objects = context.allocatable, context.events, context.objects
        self.workdir = workdir
        self.inbox: queue.Queue[Work] = queue.Queue()  # what to do besides driving the pod: in order, in this thread
        self.lock = threading.Lock()
        spec = pod["spec"]
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers", [])]
        waiting = {"waiting": {"reason": "PodInitializing"}} if self.init_containers else None
        self.containers = [Container(c) for c in spec.get("containers", [])]
        for c in self.containers:
            c.state = dict(waiting or c.state)
        self.ephemeral: list[Container] = []
        self._add_ephemeral(spec)
        self.volumes = PodVolumes(pod, workdir / "volumes", self._lookup, self._token, self.allocatable)
        self.mounted = False
        self.mount_error = ""
        self.pause: subprocess.Popen | None = None  # holds the pod's network and UTS namespaces
        self.pause_ready = False  # its namespaces are made
        self.sandbox_maker: threading.Thread | None = None  # makes them ready, and the pod's address
        self.ip: str | None = None  # its address on the pod network
        self.network_error = ""
        self.start_time = api_time()
        self.taken = time.monotonic()  # the probes tick from here
        self.finished = threading.Event()
        self.last_reported: str | None = None
        self.last_status: dict | None = pod.get("status")  # as the API server last took it (its conditions' times)
        self.held: list[dict] | None = None  # Events of the pass under way, sent once its status is
        self.lost = False  # the node is gone: kill, but tell the API nothing

    # -- inputs ------------------------------------------------------------------------------

    def update(self, pod: dict) -> None:
        """The pod as the API server has it now (from the node's watch): taken in the worker's own thread."""
        self.inbox.put(Update(pod))

    def forget(self, lost: bool = False) -> None:
        """The pod is gone from the node (deleted while the agent was away, or the node is lost): kill it at once
        (and with ``lost``, tell the API nothing)."""
        self.inbox.put(Forget(lost))

    def _handle(self, work: Work) -> None:
        if isinstance(work, Update):
            self._take(work.pod)
        elif isinstance(work, Forget):
            self.lost = self.lost or work.lost
            with self.lock:
                self.pod["metadata"].setdefault("deletionTimestamp", api_time())
                self.pod["metadata"]["deletionGracePeriodSeconds"] = 0
        elif isinstance(work, Kill):
            work.reply.set_result(self._kill_container(work.container))
        elif isinstance(work, Stress):
            work.reply.set_result(self._stress(work.container, work.argv))
        elif isinstance(work, Unstress):
            c = self.container(work.container)
            if c:
                c.joined.end("stress")

    def _wait_for_work(self, timeout: float) -> None:
        """Wait at most ``timeout`` for work (a process that ended or a probe that changed its verdict is work too),
        then do all there is."""
        try:
            work = self.inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        while True:
            self._handle(work)
            try:
                work = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _ask(self, work: Kill | Stress) -> bool:
        """Hand ``work`` to the worker's thread and wait for its answer (False if the worker has ended)."""
        if self.finished.is_set():
            return False
        self.inbox.put(work)
        try:
            return work.reply.result(timeout=ASK_TIMEOUT)
        except concurrent.futures.TimeoutError:
            return False

    def _take(self, pod: dict) -> None:
        with self.lock:
            self.pod = pod
            self.volumes.pod = pod  # labels and annotations feed downward API volumes
            # A container's image is the one field of its spec an update may change: the kubelet restarts
            # the container with the new image (`kubectl set image` on a pod; Chaos Mesh's pod-failure).
            images_now = {spec["name"]: spec.get("image", "") for spec in pod["spec"].get("containers", [])}
            for c in self.containers:
                image = images_now.get(c.name)
                if image is not None and image != c.spec.get("image", ""):
                    c.spec = {**c.spec, "image": image}
                    c.changed = True
            self._add_ephemeral(pod["spec"])

    def _add_ephemeral(self, spec: dict) -> None:
        """Ephemeral containers new in ``spec`` (the ``ephemeralcontainers`` subresource only ever adds them)."""
        known = {c.name for c in self.ephemeral}
        for entry in spec.get("ephemeralContainers", []):
            if entry["name"] not in known:
                self.ephemeral.append(Container(entry, ephemeral=True))
    # -- what chaos experiments do to containers (the node's part of Chaos Mesh's chaos daemon) -------------

    def container(self, name: str) -> Container | None:
        return next((c for c in self.containers if c.name == name), None)

    def kill_container(self, name: str) -> bool:
        """SIGKILL a running container, as a runtime's container kill does; it restarts per the pod's
        restartPolicy. False if it does not run."""
        return self._ask(Kill(name, concurrent.futures.Future()))

    def stress(self, name: str, argv: list[str]) -> bool:
        """Run ``argv`` as load inside a running container (its namespaces): its CPU and memory count as the
        container's, so a memory stressor can push it past its limit. False if the container does not run."""
        return self._ask(Stress(name, concurrent.futures.Future(), argv))

    def unstress(self, name: str) -> None:
        self.inbox.put(Unstress(name))

    def _kill_container(self, name: str) -> bool:
        c = self.container(name)
        if c is None or c.process is None or c.process.poll() is not None:
            return False
        _signal_group(c.process, signal.SIGKILL)
        return True

    def _stress(self, name: str, argv: list[str]) -> bool:
        c = self.container(name)
        if c is None or c.process is None or c.process.poll() is not None:
            return False
        target = runtime.Target(self.runtime.join_pid(c.process), {"PATH": _path(()), "PYTHONPATH": images.SOURCE_ROOT},
                                "/")  # fmt: skip
        started = runtime.start(target, argv, report=False)
        c.joined.add("stress", started.process)
        return True

    def exec_target(self, name: str) -> tuple[Container, runtime.Target] | None:
        """Where ``kubectl exec`` into container ``name`` runs: the container and how to join it (None if it
        does not run)."""
        c = next((c for c in self.all_containers() if c.name == name), None)
        if c is None or c.process is None or c.process.poll() is not None or not c.running:
            return None
        return c, runtime.Target(self.runtime.join_pid(c.process), dict(c.env), c.cwd, cpuweight.level(c.spec))

    @property
    def path(self) -> str:
        meta = self.pod["metadata"]
        return f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"

    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers, *self.ephemeral]

    def _lookup(self, kind: str, name: str) -> dict | None:
        """A ConfigMap or Secret of the pod's namespace, read with the node's credentials (None if it does not
        exist); ConfigError if the API server cannot be asked or refuses."""
        namespace = self.pod["metadata"]["namespace"]
        try:
            return as_node(lambda: self.objects.get(f"/api/v1/namespaces/{namespace}/{kind}/{name}"))
        except (APIError, OSError) as exc:
            raise envvars.ConfigError(f"couldn't get {kind[:-1]} {namespace}/{name}: {exc}") from exc

    def _token(self, account: str, spec: dict) -> dict:
        namespace = self.pod["metadata"]["namespace"]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        return as_node(lambda: self.api.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                                                body))["status"]  # fmt: skip

    def event(self, reason: str, message: str, kind: str = "Normal", container: Container | None = None) -> None:
        meta = self.pod["metadata"]
        involved = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                    "uid": meta["uid"]}  # fmt: skip
        if container:
            section = "initContainers" if container.init else "ephemeralContainers" if container.ephemeral else "containers"
            involved["fieldPath"] = f"spec.{section}{{{container.name}}}"
        event = kubelet_event(involved, reason, message, kind=kind, node=self.node)
        if self.held is not None and threading.current_thread() is self:
            self.held.append(event)
        else:
            self.events.post(event)

    def _pass(self) -> None:
        """One pass toward the spec, then its status; the Events the pass raised are sent after the status,
        so that a burst of starting pods reaches Ready before the API server takes their Events."""
        self.held = []
        try:
            self._sync()
            self._report()
        finally:
            held, self.held = self.held, None
            for event in held:
                self.events.post(event)

    # -- the loop ----------------------------------------------------------------------------

    def unsupported(self) -> list[str]:
        """The parts of this pod's spec the agent does not honour: said, never silently dropped."""
        spec = self.pod["spec"]
        found = [key for key in UNSUPPORTED_FEATURES if spec.get(key)]
        for c in spec.get("initContainers", []):
            if c.get("restartPolicy") == "Always":
                found.append(f"sidecar init container {c['name']} (runs as an ordinary init container)")
        for c in spec.get("containers", []):
            for key, kind in probes.KINDS:
                if c.get(key, {}).get("grpc"):
                    found.append(f"grpc {kind.lower()} probe (container {c['name']})")
            if c.get("resources", {}).get("limits", {}).get("cpu"):
                found.append(f"CPU limit (container {c['name']}: CPU use is reported, not throttled)")
        if not self.isolated and (spec.get("volumes") or spec.get("hostname")):
            found.append("volume mounts and the pod's hostname (this machine refuses Linux namespaces to the "
                         "node agent, so containers see the host's files)")  # fmt: skip
        return found

    def unsupported_ephemeral(self, c: Container) -> list[str]:
        """What the agent does not honour of an ephemeral container added to the running pod."""
        found = []
        if not self.isolated:
            found.append(f"ephemeral container {c.name} joins no namespaces: this machine refuses Linux namespaces "
                         "to the node agent, so it sees the host's files and network")  # fmt: skip
        if c.spec.get("targetContainerName") and not self.isolated:
            found.append(f"targetContainerName {c.spec['targetContainerName']} (no process namespace to share)")
        return found

    def run(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        missing = self.unsupported()
        if missing:
            self.event("Unsupported", "labkit's node agent does not honour these, and runs the pod without "
                       "them: " + "; ".join(missing), kind="Warning")  # fmt: skip
        failure = ""
        try:
            while True:
                with self.lock:
                    deleting = self.pod["metadata"].get("deletionTimestamp") is not None
                if deleting:
                    self._terminate()
                    return
                try:
                    self._pass()
                except Exception as exc:  # noqa: BLE001 - a bad pass never takes the agent down; tried again
                    if str(exc) != failure:
                        failure = str(exc)
                        self.log(f"pod worker {self.name}: {traceback.format_exc()}")
                        self.event("FailedSync", f"error syncing pod, will retry: {exc}", kind="Warning")
                    self._wait_for_work(SYNC_RETRY)
                    continue
                failure = ""
                self._wait_for_work(self._next_due())
        except Exception as exc:  # noqa: BLE001 - a bad pod must never take the agent down
            self.log(f"pod worker {self.name} failed: {traceback.format_exc()}")
            self.event("FailedSync", f"labkit node agent error: {exc}", kind="Warning")
        finally:
            self._kill_all()
            if self.context.networking is not None:
                self.context.networking.network.release(self.pod["metadata"]["uid"])
            self.finished.set()
            while not self.inbox.empty():  # answer what was asked meanwhile: the containers are gone
                work = self.inbox.get_nowait()
                if isinstance(work, (Kill, Stress)):
                    work.reply.set_result(False)

    def _next_due(self) -> float:
        """Seconds until something of the pod falls due unasked: a back-off or retry ending, a grace period's
        end; at most TICK, at which running containers' memory is looked at (sampled as often) and waits
        (the pod's address range, its sandbox) are tried again."""
        now = time.monotonic()
        due = [c.next_start - now for c in self.all_containers() if c.process is None and not c.done and c.next_start]
        due += [c.kill_deadline - now for c in self.all_containers() if c.kill_deadline]
        return min([TICK, *due])

    def _sync(self) -> None:
        self._spawn_pause()  # it makes the pod's namespaces while the volumes are set up
        if not self._mount() or not self._sandbox() or not self._network():
            return
        self.volumes.refresh()
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for c in self.init_containers:
            if not c.done:
                self._drive(c, "Never" if policy == "Never" else "OnFailure")
            if not c.succeeded:
                return  # the next init container, or the app containers, wait for this one
        for c in self.containers:
            self._drive(c, policy)
        for c in list(self.ephemeral):
            if not c.announced:
                c.announced = True
                missing = self.unsupported_ephemeral(c)
                if missing:
                    self.event("Unsupported", "labkit's node agent does not honour these, and runs the container "
                               "without them: " + "; ".join(missing), kind="Warning", container=c)  # fmt: skip
            if not c.done:
                self._drive(c, "Never")

    def _mount(self) -> bool:
        """Set the pod's volumes up (once); a failure is a FailedMount event and a pod left waiting."""
        if self.mounted:
            return True
        try:
            self.volumes.setup()
        except MountError as exc:
            if str(exc) != self.mount_error:
                self.mount_error = str(exc)
                self.event("FailedMount", f"MountVolume.SetUp failed: {exc}", kind="Warning")
            return False
        self.mounted = True
        return True

    def _spawn_pause(self) -> None:
        """Start the pod's pause process, which makes and holds its namespaces: once, and again if it dies."""
        if not self.isolated or (self.pause is not None and self.pause.poll() is None):
            return
        if self.pause is not None:
            self.log(f"pause process of {self.name} exited ({self.pause.returncode}); making the pod's namespaces again")
            self._kill_all()
            self.pause = None
        self.pause_ready = False
        self.ip = None  # its network went with its namespaces: joined again, at the same address
        folder = self.workdir / "containers"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.pause = subprocess.Popen(self.runtime.sandbox_command(self._hostname()), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)  # fmt: skip
        except OSError as exc:
            self.event("FailedCreatePodSandBox", f"Failed to create pod sandbox: {exc}", kind="Warning")
            return
        procs.record(self.pause.pid, folder / "pause.pid")
        # Its namespaces are made, and joined to the pod network, while the volumes are set up.
        self.sandbox_maker = threading.Thread(target=self._make_sandbox, args=(self.pause,), daemon=True,
                                              name=f"sandbox-{self.name}")  # fmt: skip
        self.sandbox_maker.start()

    def _make_sandbox(self, pause: subprocess.Popen) -> None:
        """Wait until ``pause`` has made the pod's namespaces, then give the pod its address."""
        deadline = time.monotonic() + 10
        own = procs.namespace(os.getpid(), "net")
        while pause.poll() is None and time.monotonic() < deadline:
            if procs.namespace(pause.pid, "net") not in (None, own):
                self.pause_ready = True
                self._network()
                return
            time.sleep(0.005)

    def _sandbox(self) -> bool:
        """Whether the pod's namespaces are ready for its containers (waiting for the pause process to make them)."""
        if not self.isolated:
            return True
        if self.pause is None:
            return False
        self.sandbox_maker.join(15)
        if self.pause_ready:
            return True
        self.event("FailedCreatePodSandBox", "Failed to create pod sandbox: the pod's namespaces could not be "
                   f"made (pause process exit code {self.pause.poll()})", kind="Warning")  # fmt: skip
        _signal_group(self.pause, signal.SIGKILL)
        return False

    def _network(self) -> bool:
        """The pod's address on the pod network (given once its namespaces exist); False while it waits."""
        networking = self.context.networking
        if self.ip or networking is None or not self.isolated:
            return True
        cidr = self.context.pod_cidr()
        problem = ""
        if cidr is None:
            problem = f"node {self.node} has no pod address range (spec.podCIDR) yet"
        else:
            try:
                self.ip = networking.network.attach(self.pod["metadata"]["uid"], cidr, self.pause.pid)
                return True
            except NetworkError as exc:
                problem = str(exc)
        if problem != self.network_error:
            self.network_error = problem
            self.event("FailedCreatePodSandBox", f"Failed to create pod sandbox: {problem}", kind="Warning")
        return False

    def _service_env(self) -> dict[str, str]:
        """The Services' variables the kubelet gives a container (``enableServiceLinks``; the API's always)."""
        networking = self.context.networking
        if networking is None:
            return {}
        networking.proxy.wait_synced(5.0)
        env = networking.proxy.environment(self.pod["metadata"]["namespace"])
        if self.pod["spec"].get("enableServiceLinks", True) is False:
            env = {k: v for k, v in env.items() if k.startswith("KUBERNETES_")}
        return env

    def _network_files(self) -> list[dict]:
        """The pod's resolv.conf and hosts, as mounts, once it has its address."""
        networking = self.context.networking
        if networking is None or not self.ip:
            return []
        return pod_files(self.workdir / "etc", self.pod, self.ip, networking.dns_ip)

    def network_pid(self) -> int | None:
        """The pause process, whose network namespace is the pod's (None without namespaces)."""
        return self.pause.pid if self.pause else None

    def probe_host(self) -> str:
        """Where probes and hooks connect unless they name a host: the pod's IP, as the kubelet does (so an app
        that listens on loopback only fails its probes, as on a real node), or loopback without a pod network."""
        return self.ip or "127.0.0.1"

    def _hidden(self) -> list[str]:
        """What a container must not see: every sandbox's state folder (keys, other pods), and the
        runtime folder that holds the pods' volumes when it lies elsewhere (state/pods is a link)."""
        sandboxes = self.workdir.parents[3]  # <sandboxes>/<name>/pods/<node>/<pod>
        return list(dict.fromkeys([str(sandboxes), str(self.workdir.resolve().parents[2])]))

    def _hostname(self) -> str:
        return self.pod["spec"].get("hostname") or self.pod["metadata"]["name"]

    def _drive(self, c: Container, policy: str) -> None:
        if c.process is not None:
            code = c.process.poll()
            if code is None:
                self._watch(c)
                return
            self._exited(c, code, policy)
        if not c.done and time.monotonic() >= c.next_start:
            self._start(c)

    def _watch(self, c: Container) -> None:
        """A running container: its memory limit, its probes, the end of its grace period."""
        monitor = self.context.monitor
        c.measured = usage.total([monitor.of(c.process.pid), *(monitor.of(pid) for pid in c.joined.pids())])
        limit = c.memory_limit
        if limit and c.measured and c.measured.memory_bytes > limit:
            c.oom = True
            _signal_group(c.process, signal.SIGKILL)
        if c.kill_deadline and time.monotonic() >= c.kill_deadline:
            _signal_group(c.process, signal.SIGKILL)
        elif c.prober and c.prober.restart_reason and not c.kill_deadline:
            self.event("Killing", c.prober.restart_reason, container=c)
            self._stop(c, self._grace(c))
        elif c.changed and not c.kill_deadline:
            self.event("Killing", f"Container {c.name} definition changed, will be restarted", container=c)
            self._stop(c, self._grace(c))

    def _grace(self, c: Container) -> float:
        for key, _ in probes.KINDS:
            if c.spec.get(key, {}).get("terminationGracePeriodSeconds") is not None:
                return float(c.spec[key]["terminationGracePeriodSeconds"])
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def _stop(self, c: Container, grace: float) -> None:
        """Stop a container as the kubelet does: its preStop hook, then SIGTERM; SIGKILL when ``grace`` ends."""
        c.kill_deadline = time.monotonic() + grace
        if c.prober:
            c.prober.stop()
        hook = c.spec.get("lifecycle", {}).get("preStop")
        process = c.process

        def stop() -> None:
            if hook:
                failure = self._hook(c, hook, grace)
                if failure:
                    self.event("FailedPreStopHook", f"PreStopHook failed: {failure}", kind="Warning", container=c)
            _signal_group(process, signal.SIGTERM)

        threading.Thread(target=stop, name=f"stop-{c.name}", daemon=True).start()

    def _hook(self, c: Container, hook: dict, timeout: float) -> str | None:
        """Run a lifecycle hook (exec, httpGet, sleep) in the container; the failure message, if any."""
        if "sleep" in hook:
            time.sleep(min(float(hook["sleep"].get("seconds", 0)), timeout))
            return None
        pid = self.runtime.join_pid(c.process)
        if "exec" in hook:
            outcome = probes.exec_action(hook["exec"], c.env, c.cwd, timeout, pid)
        elif "httpGet" in hook:
            outcome = probes.http_get(hook["httpGet"], c.spec, self.probe_host(), timeout, self.network_pid())
        else:
            return f"unsupported hook {sorted(hook)}"
        return None if outcome.ok else outcome.message

    def _start(self, c: Container) -> None:
        c.changed = False  # whatever its image is now, this start runs it
        image = images.resolve(c.spec.get("image", ""))
        if image is None:
            self._pull_failed(c)
            return
        c.image_id = image.image_id
        base = {"PATH": _path(image.path), "HOSTNAME": self.pod["metadata"]["name"], "HOME": "/root",
                **self._service_env(), **dict(image.env)}  # fmt: skip
        try:
            env = envvars.container_env(self.pod, c.spec, self._lookup, self.allocatable, base)
            mounts = [*self._network_files(), *self.volumes.mounts(c.spec)] if self.isolated else []
        except (envvars.ConfigError, MountError) as exc:
            self._config_failed(c, str(exc))
            return
        argv = [envvars.expand(arg, env) for arg in image.argv(c.spec.get("command"), c.spec.get("args"))]
        program = images.executable(argv[0], env["PATH"]) if argv else None
        if program is None:
            self._run_failed(c, f"exec: \"{argv[0] if argv else ''}\": executable file not found in $PATH")
            return
        argv[0] = program
        folder = self.workdir / "containers" / c.name
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        (folder / "start-error").unlink(missing_ok=True)
        c.env = env
        nice = cpuweight.level(c.spec)
        if c.restarts == 0 and c.started_at is None:
            self.event("Pulled", f"Container image \"{image.reference}\" already present on machine", container=c)
        stdin, stdout, stderr = self._output(c)
        command, cwd, c.cwd = self.runtime.command(runtime.Launch(
            argv, env, c.spec.get("workingDir", ""), folder, self.workdir, self._hostname(), mounts, self._hidden(), nice,
            tty=bool(c.console and c.console.terminal is not None), pause_pid=self.pause.pid if self.pause else None))
        try:
            c.process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                                         cwd=cwd, start_new_session=True)  # fmt: skip
        except OSError as exc:
            self._run_failed(c, str(exc))
            self._close_console(c)
            return
        finally:
            for fd in {stdin, stdout, stderr} - {subprocess.DEVNULL}:
                os.close(fd)
        procs.record(c.process.pid, folder / "container.pid")
        threading.Thread(target=self._await_exit, args=(c.process,), name=f"wait-{c.name}", daemon=True).start()
        c.container_id = f"labkit://{c.process.pid}"
        cpuweight.apply(c.process.pid, nice)
        if c.restarting:
            c.restarts += 1
            c.restarting = False
        c.started_at = api_time()
        c.started_mono = time.monotonic()
        c.started_wall = time.time()
        c.state = {"running": {"startedAt": c.started_at}}
        self.event("Created", f"Created container: {c.name}", container=c)
        self.event("Started", f"Started container {c.name}", container=c)
        if not c.init and not c.ephemeral and probes.Prober.wanted(c.spec):
            c.prober = probes.Prober(c.spec, self.runtime.join_pid(c.process), self.network_pid(), env, c.cwd,
                                     lambda reason, message, kind: self.event(reason, message, kind, container=c),
                                     self.context.relist, self.taken, self.probe_host(),
                                     changed=lambda: self.inbox.put(Wake("probe")))  # fmt: skip
            c.prober.start()
        hook = c.spec.get("lifecycle", {}).get("postStart")
        if hook:
            threading.Thread(target=self._post_start, args=(c, hook), daemon=True).start()

    def _await_exit(self, process: subprocess.Popen) -> None:
        """A container's process has ended: work for the pod's worker at once (not at its next look)."""
        process.wait()
        self.inbox.put(Wake("exited"))

    def _post_start(self, c: Container, hook: dict) -> None:
        if self.isolated and c.process is not None:
            probes.wait_entered(c.process.pid, threading.Event())
        failure = self._hook(c, hook, 30.0)
        if failure and c.process is not None:
            self.event("FailedPostStartHook", f"PostStartHook failed: {failure}", kind="Warning", container=c)
            self._stop(c, self._grace(c))

    def _output(self, c: Container) -> tuple[int, int, int]:
        """A new attempt's stdin, stdout and stderr: /dev/null and its CRI log, ``logs/<container>/<restart>.log``;
        with ``stdin``, a pipe the agent holds the other end of; with ``tty``, one terminal for all three."""
        attempt = c.restarts + (1 if c.restarting else 0)
        self._close_console(c)
        c.log = ContainerLog(self.workdir / "logs" / c.name, self.context.capture)
        once = bool(c.spec.get("stdinOnce"))
        if c.spec.get("tty"):
            inner, terminal = c.log.open_terminal(attempt)
            c.console = runtime.Console(os.dup(terminal) if c.spec.get("stdin") else None, terminal, once)
            return (inner if c.spec.get("stdin") else subprocess.DEVNULL), inner, os.dup(inner)
        stdout, stderr = c.log.open(attempt)
        if not c.spec.get("stdin"):
            c.console = None
            return subprocess.DEVNULL, stdout, stderr
        read_end, write_end = os.pipe()
        c.console = runtime.Console(write_end, None, once)
        return read_end, stdout, stderr

    @staticmethod
    def _close_console(c: Container) -> None:
        if c.console is not None:
            c.console.close()
            c.console = None

    def _back_off(self, c: Container, ceiling: float) -> float:
        """Schedule the next attempt after the current back-off, and double it; the delay used."""
        delay = c.backoff
        c.backoff = min(ceiling, max(BACKOFF_START, c.backoff * 2))
        c.next_start = time.monotonic() + delay
        return delay

    def _pull_failed(self, c: Container) -> None:
        reference = c.spec.get("image", "")
        message = (f"Failed to pull image \"{reference}\": labkit's image catalog has no such image (the sandbox "
                   "runs busybox, alpine, python and the course's own apps)")  # fmt: skip
        # A failed pull (ErrImagePull) and the wait before the next (ImagePullBackOff) alternate.
        reason = "ImagePullBackOff" if c.state.get("waiting", {}).get("reason") == "ErrImagePull" else "ErrImagePull"
        c.state = {"waiting": {"reason": reason, "message": message}}
        if reason == "ErrImagePull":
            self.event("Failed", message, kind="Warning", container=c)
        else:
            self.event("BackOff", f"Back-off pulling image \"{reference}\"", container=c)
        self._back_off(c, PULL_BACKOFF_MAX)
        c.next_start = max(c.next_start, time.monotonic() + 1.0)

    def _run_failed(self, c: Container, message: str) -> None:
        c.state = {"waiting": {"reason": "RunContainerError", "message": message}}
        self.event("Failed", f"Error: {message}", kind="Warning", container=c)
        self._back_off(c, BACKOFF_MAX)

    def _config_failed(self, c: Container, message: str) -> None:
        if c.state.get("waiting", {}).get("message") != message:
            self.event("Failed", f"Error: {message}", kind="Warning", container=c)
        c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
        c.next_start = time.monotonic() + CONFIG_RETRY

    def _exited(self, c: Container, code: int, policy: str) -> None:
        exit_code = _exit_code(code)
        terminated = {
            "exitCode": exit_code,
            "reason": "OOMKilled" if c.oom else ("Completed" if exit_code == 0 else "Error"),
            "startedAt": c.started_at,
            "finishedAt": api_time(),
            "containerID": f"labkit://{c.process.pid}",
        }
        error_file = self.workdir / "containers" / c.name / "start-error"
        if error_file.exists() and error_file.stat().st_size:  # the launcher could not create the container
            terminated.update(reason="StartError", exitCode=128, message=error_file.read_text().strip())
            self.event("Failed", f"Error: {terminated['message']}", kind="Warning", container=c)
        if c.prober:
            c.prober.stop()
            c.prober = None
        c.joined.end()  # load injected into it, and execs, die with it
        self._close_console(c)
        c.process = None
        c.oom = False
        c.kill_deadline = 0.0
        c.measured = None
        if c.changed:  # stopped to run its new image: started again at once, whatever the policy
            c.changed = False
            c.last_state = {"terminated": terminated}
            c.restarting = True
            c.state = {"terminated": terminated}
            return
        restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if not restart:
            c.state = {"terminated": terminated}
            c.done = True
            return
        if time.monotonic() - c.started_mono >= BACKOFF_RESET_AFTER:
            c.backoff = 0.0
        c.last_state = {"terminated": terminated}
        c.restarting = True
        delay = self._back_off(c, BACKOFF_MAX)
        if not delay:  # the first restart is immediate: no back-off to wait for or report
            c.state = {"terminated": terminated}
            return
        message = f"back-off {delay:.0f}s restarting failed container={c.name} pod={self.pod['metadata']['name']}"
        c.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        self.event("BackOff", "Back-off restarting failed container", kind="Warning", container=c)

    # -- status ------------------------------------------------------------------------------

    @staticmethod
    def _view(c: Container) -> podstatus.ContainerView:
        prober = c.prober
        return podstatus.ContainerView(
            c.name, c.spec.get("image", ""), c.image_id, c.state, c.last_state, c.restarts, c.done,
            started=c.running and (prober.started if prober else True), probed_ready=prober.ready if prober else True,
            ever_started=c.started_at is not None, container_id=c.container_id)  # fmt: skip

    def status(self) -> dict:
        """The status to report now (``podstatus.pod_status`` of what this worker sees, and what it last sent)."""
        view = podstatus.PodView(tuple(map(self._view, self.init_containers)), tuple(map(self._view, self.containers)),
                                 tuple(map(self._view, self.ephemeral)), self.mounted, self.ip, self.start_time)  # fmt: skip
        return podstatus.pod_status(view, self.last_status, api_time())

    def _report(self, force: bool = False) -> None:
        if self.lost:
            return
        status = self.status()
        key = json.dumps(status, sort_keys=True)  # transition times only move when a condition changes
        if key == self.last_reported and not force:
            return
        patch = status
        if "podIPs" in status:  # the list is replaced, not merged: a pod whose sandbox was made again may have a
            patch = {**status, "podIPs": [{"$patch": "replace"}, *status["podIPs"]]}  # new address (one a family)
        try:
            self.api.request("PATCH", self.path + "/status",
                             {"metadata": {"uid": self.pod["metadata"]["uid"]}, "status": patch},
                             content_type=STRATEGIC_MERGE_PATCH)  # fmt: skip
            self.last_reported = key
            self.last_status = status
        except APIError as exc:
            if exc.status != 404:
                self.log(f"status of {self.name}: {exc}")
        except OSError as exc:
            self.log(f"status of {self.name}: {exc}")

    # -- stopping ----------------------------------------------------------------------------

    def _terminate(self) -> None:
        """Graceful deletion: preStop hooks and SIGTERM, the grace period, SIGKILL; then the final delete."""
        meta = self.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        running = [c for c in self.all_containers() if c.process is not None and c.process.poll() is None]
        for c in running:
            if not self.lost:
                self.event("Killing", f"Stopping container {c.name}", container=c)
            if grace:
                self._stop(c, grace)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.process.poll() is None for c in running):
            time.sleep(0.1)
        self._kill_all()
        for c in running:
            code = c.process.returncode if c.process else -9
            c.state = {"terminated": {"exitCode": _exit_code(code),
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
                return
        shutil.rmtree(self.workdir, ignore_errors=True)  # the pod is gone: its logs and volumes go too

    def _kill_all(self) -> None:
        for c in self.all_containers():
            if c.prober:
                c.prober.stop()
            c.joined.end()
            if c.process is not None and c.process.poll() is None:
                _signal_group(c.process, signal.SIGKILL)
                c.process.wait()
        if self.pause is not None and self.pause.poll() is None:
            _signal_group(self.pause, signal.SIGKILL)
            self.pause.wait()


def _exit_code(returncode: int) -> int:
    """A container's exit code as a runtime reports it: killed by signal N is 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def as_node(call: Callable[[], T]) -> T:
    """``call()``, a request with a node's credentials, asked again a few times while the API server refuses it:
    its node authorizer learns of a pod's binding a moment after the agent's watch may see the pod ("no
    relationship found between node ..."), and until then refuses the node that pod's ConfigMaps, Secrets
    and ServiceAccount token."""
    for retry in range(AUTHORIZER_RETRIES + 1):
        try:
            return call()
        except APIError as exc:
            if exc.status != 403 or retry == AUTHORIZER_RETRIES:
                raise
            time.sleep(AUTHORIZER_RETRY_SECONDS)
    raise AssertionError("unreachable")


def _signal_group(process: subprocess.Popen | None, sig: int) -> None:
    if process is None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _path(extra: tuple[str, ...]) -> str:
    """A container's PATH: the image's own folders, this Python's, the standard ones, then the agent's."""
    entries = [*extra, os.path.dirname(sys.executable), *STANDARD_PATH, *os.environ.get("PATH", "").split(":")]
    return ":".join(dict.fromkeys(e for e in entries if e))
