"""What a Service hop costs: the same client through a Service to 3 replicas, and straight to one pod.

One three-node sandbox serves every run. It runs 3 replicas of the course's web
app behind a ClusterIP Service; then, in each run, the course's load generator
(``labkit/loadgen``, in a pod of its own, so its requests cross the pod network
as any pod's do) sends requests for ``--duration`` seconds with ``--concurrency``
in flight, once to one pod's address and once to the Service's ClusterIP (which
the service proxy spreads over the 3 pods), in alternating order. Both are given
as addresses, so that neither pays for a DNS answer.

It prints the requests per second and the p50/p99 latency of each (median of the
runs, and their range), and the ratio of the Service's p50 to the pod's.

    python benchmarks/network.py [--runs 5] [--duration 5] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.kube.config import from_kubeconfig  # noqa: E402
from labkit.lab import Lab  # noqa: E402
from labkit.sandbox import binaries  # noqa: E402
from labkit.sandbox.controlplane import Sandbox  # noqa: E402

WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: labkit/web:1.0
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /readyz, port: 8080}, periodSeconds: 1}
        resources: {requests: {cpu: 300m}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""


def load(lab: Lab, name: str, url: str, duration: float, concurrency: int) -> dict:
    """The load generator's figures for ``url``, from a pod that runs it once."""
    lab.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"restartPolicy": "Never", "containers": [{
                   "name": "loadgen", "image": "labkit/loadgen:1.0", "resources": {"requests": {"cpu": "300m"}},
                   "args": [url, "--duration", str(duration), "--concurrency", str(concurrency), "--json"]}]}})  # fmt: skip
    deadline = time.monotonic() + duration + 60
    while time.monotonic() < deadline:
        pod = lab.get(f"pod/{name}") or {}
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    output = lab.kubectl(["logs", name], show=False).strip().splitlines()
    lab.delete(f"pod/{name}", wait=False)
    try:
        return json.loads(output[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"The load generator {name} printed no figures: {output[-5:]}") from None


def _range(values: list[float], unit: str, digits: int = 2) -> str:
    return f"{statistics.median(values):8.{digits}f} {unit}  ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    binaries.ensure(say=print)
    figures: dict[str, dict[str, list[float]]] = {"pod": {}, "service": {}}
    with tempfile.TemporaryDirectory(prefix="labkit-bench-net-") as state:
        os.environ["LABKIT_STATE_DIR"] = state
        sandbox = Sandbox("bench-net")
        try:
            sandbox.up(say=lambda _: None, nodes=3)
            mode = (sandbox.status().get("network") or {}).get("mode", "?")
            lab = Lab("network-benchmark", from_kubeconfig(sandbox.state.kubeconfig, sandbox=sandbox.name))
            lab.apply(WEB)
            lab.wait_ready("deployment/web", timeout=120)
            pod_ip = lab.pods("app=web")[0]["status"]["podIP"]
            cluster_ip = lab.get("service/web")["spec"]["clusterIP"]
            # Both by address: a name would add the cluster DNS's answer to each new connection's time.
            targets = {"pod": f"http://{pod_ip}:8080/", "service": f"http://{cluster_ip}/"}
            for run in range(1, args.runs + 1):
                order = ["pod", "service"] if run % 2 else ["service", "pod"]
                for kind in order:
                    result = load(lab, f"load-{kind}-{run}", targets[kind], args.duration, args.concurrency)
                    if result.get("errors"):
                        raise SystemExit(f"run {run}, {kind}: {result['errors']} requests failed: {result}")
                    for key in ("rps", "p50_ms", "p99_ms"):
                        figures[kind].setdefault(key, []).append(float(result[key]))
                print(f"run {run}/{args.runs}: pod p50 {figures['pod']['p50_ms'][-1]:.2f} ms, service p50 "
                      f"{figures['service']['p50_ms'][-1]:.2f} ms", file=sys.stderr)
            lab.close(quiet=True)
        finally:
            sandbox.down(purge=True, say=lambda _: None)

    print()
    print(f"HTTP through a Service to 3 replicas vs. straight to one pod, from a pod; {args.runs} runs of "
          f"{args.duration:g} s, {args.concurrency} in flight, {os.cpu_count()} CPUs, pod network: {mode}")
    print(f"  {'median of runs (min-max)':<26}{'requests/s':>20}{'p50':>26}{'p99':>26}")
    for kind, label in (("pod", "one pod, by its address"), ("service", "Service (ClusterIP), 3 pods")):
        f = figures[kind]
        print(f"  {label:<26}{_range(f['rps'], '/s', 0):>20}{_range(f['p50_ms'], 'ms'):>26}{_range(f['p99_ms'], 'ms'):>26}")
    ratio = statistics.median(figures["service"]["p50_ms"]) / statistics.median(figures["pod"]["p50_ms"])
    print(f"  {'Service p50 / pod p50':<26}{ratio:>46.2f}x")


if __name__ == "__main__":
    main()
