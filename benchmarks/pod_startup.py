"""How fast the sandbox's nodes start pods under load, and the memory of a sandbox running them.

One sandbox with three nodes serves every run. Each run creates, in fresh
namespaces:

* **baseline**: a Deployment of one replica: a pod's start-up time at no load;
* **load**: a Deployment of 20 replicas (``--replicas``) created at once.

A pod's start-up time runs from its creation to its being Ready. Both ends are
taken locally from a watch on the namespace's pods, opened before the Deployment
is created: creation is the pod's ADDED event (``metadata.creationTimestamp``
only has whole seconds), Ready the first event in which its Ready condition is
True. Each run gives p50, p99 and max over its pods; the table shows the median
of the runs (and their range), and the ratio of the load's p50 to the baseline
(medians of the same runs).

With the load's pods running it reads the resident memory (RSS) of the whole
sandbox: each control-plane component, the supervisor, the node agent, and the
pods' own processes.

The app is ``labkit/web:1.0`` (the course's training web app) if the image
catalog has it, else ``python:3.12`` sleeping; the output says which. By default
the pods have no readiness probe, so Ready means every container has started:
the measure of Kubernetes' own pod start-up SLI. ``--probe`` adds a readiness
probe (an HTTP GET of /readyz for the web app, an exec of ``true`` for the
fallback, every second), so Ready then also waits for the app and the probe's
period.

    python benchmarks/pod_startup.py [--runs 5] [--replicas 20] [--probe]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.sandbox import binaries, procs  # noqa: E402
from labkit.sandbox.controlplane import COMPONENTS, NODE_AGENT, Sandbox  # noqa: E402
from labkit.kube.client import KubeAPI
from labkit.kube.errors import APIError  # noqa: E402
from labkit.sandbox.node import images  # noqa: E402

NODES = 3
WEB_IMAGE = "labkit/web:1.0"
WEB_PORT = 8080
FALLBACK_IMAGE = "python:3.12"
FALLBACK_COMMAND = ["python", "-c", "import time; time.sleep(3600)"]
TIMEOUT = 300.0


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------- the workload


def container(probe: bool) -> tuple[dict, str]:
    """The app's container spec, and a sentence saying what it is."""
    if images.resolve(WEB_IMAGE) is not None:
        spec: dict = {"name": "app", "image": WEB_IMAGE, "env": [{"name": "PORT", "value": str(WEB_PORT)}]}
        if probe:
            spec["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": WEB_PORT}, "periodSeconds": 1}
        what = f"{WEB_IMAGE} (the course's web app)"
    else:
        spec = {"name": "app", "image": FALLBACK_IMAGE, "command": FALLBACK_COMMAND}
        if probe:
            spec["readinessProbe"] = {"exec": {"command": ["true"]}, "periodSeconds": 1}
        what = (f"{FALLBACK_IMAGE} running `{' '.join(FALLBACK_COMMAND[:2])} \"{FALLBACK_COMMAND[2]}\"` "
                f"({WEB_IMAGE} is not in the image catalog)")
    what += ", readiness probe every 1 s" if probe else ", no readiness probe"
    return spec, what


def deployment(name: str, replicas: int, spec: dict) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"terminationGracePeriodSeconds": 2, "containers": [spec]}},
        },
    }  # fmt: skip


# ----------------------------------------------------------------------------- the measure


def is_ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


class PodWatch(threading.Thread):
    """Watches one namespace's pods; notes when each appears and when it is first Ready."""

    def __init__(self, api: KubeAPI, namespace: str, expected: int) -> None:
        super().__init__(name=f"watch-{namespace}", daemon=True)
        version = api.request("GET", f"/api/v1/namespaces/{namespace}/pods")["metadata"]["resourceVersion"]
        self.url = (f"{api.server}/api/v1/namespaces/{namespace}/pods?watch=1&resourceVersion={version}"
                    f"&timeoutSeconds={int(TIMEOUT)}")  # fmt: skip
        self.context = api.context
        self.expected = expected
        self.added: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.connected = threading.Event()
        self.done = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=self.context) as response:
                self.connected.set()  # the API server answers a watch's headers as soon as it is established
                for line in response:
                    now = time.monotonic()
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    pod = event["object"]
                    name = pod["metadata"]["name"]
                    self.added.setdefault(name, now)
                    if name not in self.ready and is_ready(pod):
                        self.ready[name] = now
                    if len(self.ready) >= self.expected:
                        return
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc
        finally:
            self.connected.set()
            self.done.set()

    def startup_times(self) -> list[float]:
        return sorted(self.ready[name] - self.added[name] for name in self.ready)


def _wait(predicate, what: str, timeout: float = TIMEOUT) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"Timed out after {timeout:.0f}s waiting for {what}.")
        time.sleep(0.1)


def new_namespace(api: KubeAPI, name: str) -> None:
    api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods are admitted only once the controller-manager has made the namespace's default ServiceAccount.
    _wait(lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default") is not None,
          f"namespace {name}'s default ServiceAccount")  # fmt: skip


def delete_namespace(api: KubeAPI, sandbox: Sandbox, name: str) -> None:
    """Delete it and wait until it and its pods' processes are gone, so runs do not overlap."""
    try:
        api.request("DELETE", f"/api/v1/namespaces/{name}")
    except APIError as exc:
        if exc.status != 404:
            raise
    _wait(lambda: api.get(f"/api/v1/namespaces/{name}") is None, f"namespace {name} to be deleted")
    _wait(lambda: not pod_processes(sandbox), "the pods' processes to end")


def start_pods(api: KubeAPI, namespace: str, replicas: int, spec: dict) -> list[float]:
    """Each pod's seconds from creation to Ready, for a new Deployment of ``replicas``."""
    new_namespace(api, namespace)
    watch = PodWatch(api, namespace, replicas)
    watch.start()
    watch.connected.wait(30)
    if watch.error:
        raise watch.error
    api.request("POST", f"/apis/apps/v1/namespaces/{namespace}/deployments", deployment("app", replicas, spec))
    if not watch.done.wait(TIMEOUT) or watch.error or len(watch.ready) < replicas:
        raise SystemExit(f"Only {len(watch.ready)} of {replicas} pods in {namespace} became Ready within "
                         f"{TIMEOUT:.0f}s ({watch.error or 'timeout'}).")  # fmt: skip
    return watch.startup_times()


def unsteady(api: KubeAPI, namespace: str) -> list[str]:
    """The pods not Ready, and the containers that restarted, when the memory is read: a pod
    that was Ready once and then crashed makes the figures measure something else."""
    found = []
    for pod in api.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]:
        name = f"{namespace}/{pod['metadata']['name']}"
        if not is_ready(pod):
            found.append(f"{name} not Ready")
        for c in pod["status"].get("containerStatuses", []):
            if c.get("restartCount"):
                last = c.get("lastState", {}).get("terminated", {})
                found.append(f"{name} restarted {c['restartCount']}x (last exit code {last.get('exitCode')})")
    return found


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: of 20 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def pod_processes(sandbox: Sandbox) -> list[int]:
    """The pods' own processes: every descendant of the node agent (which starts each container, as a
    runtime's shim does) but the one that holds the pod network, and any other process the sandbox
    counts as a container's."""
    agent = (sandbox.state.status() or {}).get("components", {}).get(NODE_AGENT, {}).get("pid")
    network = sandbox.network_record().get("pod_network_pid")
    children: dict[int | None, list[int]] = {}
    for pid in procs.all_pids():
        children.setdefault(_parent(pid), []).append(pid)
    found, stack = set(), [agent] if agent else []
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    found.update(procs.running_in(sandbox.state.pods))
    return sorted(pid for pid in found if procs.alive(pid) and pid != network)


def memory(sandbox: Sandbox, config: dict) -> dict[str, tuple[int, int]]:
    """Resident bytes (and process count) of each part of the running sandbox."""
    parts = {c.name: (c.memory, 1 if c.pid else 0) for c in sandbox.components_status(config)}
    parts["supervisor"] = (procs.rss_bytes(sandbox.state.supervisor_pid()), 1)
    pods = pod_processes(sandbox)
    parts["pods"] = (sum(procs.rss_bytes(pid) for pid in pods), len(pods))
    return parts


# ---------------------------------------------------------------------------------- report


def _range(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s  ({min(values):.2f}-{max(values):.2f})"


def _mib(n: float) -> str:
    return f"{n / 2**20:7.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--probe", action="store_true", help="give the pods a readiness probe")
    args = parser.parse_args()

    binaries.ensure(say=print)
    spec, app = container(args.probe)
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as state:
        os.environ["LABKIT_STATE_DIR"] = state
        sandbox = Sandbox("bench-pods")
        try:
            config = sandbox.up(say=_quiet, nodes=NODES)
            pki = sandbox.state.pki
            api = KubeAPI(sandbox.server(config), pki.cert("ca"), pki.cert("admin"), pki.key("admin"))
            baseline: list[float] = []
            load: dict[str, list[float]] = {"p50": [], "p99": [], "max": []}
            rss: list[dict[str, tuple[int, int]]] = []
            troubles: list[str] = []
            for run in range(1, args.runs + 1):
                # The baseline first, alone; then the load, in the same run, on the same machine state.
                alone = start_pods(api, f"baseline-{run}", 1, spec)[0]
                delete_namespace(api, sandbox, f"baseline-{run}")
                times = start_pods(api, f"load-{run}", args.replicas, spec)
                time.sleep(2)  # let start-up garbage settle before reading memory
                rss.append(memory(sandbox, config))
                troubles.extend(f"run {run}: {line}" for line in unsteady(api, f"load-{run}"))
                delete_namespace(api, sandbox, f"load-{run}")
                baseline.append(alone)
                for key, p in (("p50", 50), ("p99", 99), ("max", 100)):
                    load[key].append(percentile(times, p))
                print(f"run {run}/{args.runs}: baseline {alone:.2f}s; {args.replicas} replicas p50 "
                      f"{load['p50'][-1]:.2f}s, p99 {load['p99'][-1]:.2f}s, max {load['max'][-1]:.2f}s; "
                      f"sandbox memory {sum(m for m, _ in rss[-1].values()) / 2**20:.0f} MiB", file=sys.stderr)
        finally:
            sandbox.down(purge=True, say=_quiet)

    def mem(*names: str) -> float:
        return statistics.median(sum(r[n][0] for n in names) for r in rss)

    pod_procs = int(statistics.median(r["pods"][1] for r in rss))
    print()
    print(f"Pod start-up, creation to Ready, on a {NODES}-node sandbox; {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"  app: {app}")
    print(f"  {'median of runs (min-max)':<36}{'p50':>6}{'p99':>24}{'max':>24}")
    print(f"  {'baseline: 1 replica, no load':<36}{_range(baseline)}")
    print(f"  {f'load: {args.replicas} replicas at once':<36}"
          f"{_range(load['p50'])}   {_range(load['p99'])}   {_range(load['max'])}")
    ratio = statistics.median(load["p50"]) / statistics.median(baseline)
    print(f"  {'load p50 / baseline':<36}{ratio:6.1f}x")
    print()
    print(f"Resident memory with the {args.replicas} pods running (median of runs)")
    for name in COMPONENTS:
        print(f"  {name:<38}{_mib(mem(name))}")
    print(f"  {'control plane':<38}{_mib(mem(*COMPONENTS))}")
    print(f"  {'supervisor':<38}{_mib(mem('supervisor'))}")
    print(f"  {f'node agent ({NODES} nodes, {args.replicas} pods)':<38}{_mib(mem(NODE_AGENT))}")
    print(f"  {f'pods: {pod_procs} processes':<38}{_mib(mem('pods'))}   "
          f"({mem('pods') / args.replicas / 2**20:.1f} MiB a pod)")
    print(f"  {'whole sandbox':<38}{_mib(mem(*COMPONENTS, 'supervisor', NODE_AGENT, 'pods'))}")
    if troubles:
        print("WARNING: not every pod stayed up after it was Ready, so some figures include crashed containers:")
        for line in troubles:
            print(f"  {line}")


if __name__ == "__main__":
    main()
