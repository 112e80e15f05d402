"""What the operator's toolbox costs: kubectl exec and port-forward, each beside a baseline in the same run.

One one-node sandbox runs a pod serving HTTP (Python's http.server, with a 20 MB file). In each run:

* **exec**: ``kubectl exec POD -- true`` and, as its baseline, ``kubectl get pod POD`` (both pay kubectl's
  start and a round trip through the API server; the exec also upgrades a connection to the node and starts
  a process in the container), ``--calls`` times each, alternating;
* **port-forward latency**: ``--requests`` sequential HTTP requests, each on a new connection, through one
  ``kubectl port-forward`` and, as the baseline, straight to the pod's address from this machine's side of the
  pod network (the agent's pod network namespace: this machine has no route of its own to pod addresses);
* **port-forward throughput**: the 20 MB file through the port-forward.

It prints the medians over the runs (and their range), and the ratios the targets are set on: exec over get,
port-forward p50 over direct p50, and MB/s.

    python benchmarks/streaming.py [--runs 5] [--calls 10] [--requests 100]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.sandbox import binaries  # noqa: E402
from labkit.sandbox.controlplane import Sandbox  # noqa: E402
from labkit.sandbox.node.namespaces import in_network  # noqa: E402

BLOB = 20_000_000
POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "served"},
       "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
           "name": "web", "image": "python:3.12",
           "command": ["sh", "-c", f"mkdir -p /srv && head -c {BLOB} /dev/zero > /srv/blob && cd /srv && "
                                   "exec python -m http.server 8080"],
           "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}  # fmt: skip


def kubectl(sandbox: Sandbox, *args: str, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run([str(binaries.toolset()["kubectl"]), *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "KUBECONFIG": str(sandbox.state.kubeconfig)}, **kwargs)  # fmt: skip


def seconds(call) -> float:  # noqa: ANN001
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def get(connect, path: str = "/") -> bytes:  # noqa: ANN001
    """One HTTP GET on a new connection made by ``connect()``; the body."""
    conn = http.client.HTTPConnection("pod", 8080, timeout=30)
    conn.sock = connect()
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(sandbox: Sandbox, calls: int, requests: int, pod_ip: str, network_pid: int) -> dict:
    execs, gets = [], []
    for _ in range(calls):
        execs.append(seconds(lambda: kubectl(sandbox, "exec", "served", "--", "true")))
        gets.append(seconds(lambda: kubectl(sandbox, "get", "pod", "served")))
    port = free_port()
    forward = subprocess.Popen([str(binaries.toolset()["kubectl"]), "port-forward", "pod/served", f"{port}:8080"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "KUBECONFIG": str(sandbox.state.kubeconfig)})  # fmt: skip
    try:
        forward.stdout.readline()
        through = lambda: socket.create_connection(("127.0.0.1", port), timeout=30)  # noqa: E731
        direct = lambda: in_network(network_pid, socket.create_connection, (pod_ip, 8080), 30)  # noqa: E731
        get(through), get(direct)  # warm: the forward's first connection, the pod's first answer
        forwarded, straight = [], []
        for _ in range(requests):
            forwarded.append(seconds(lambda: get(through)))
            straight.append(seconds(lambda: get(direct)))
        body: list[bytes] = []
        took = seconds(lambda: body.append(get(through, "/blob")))
        if len(body[0]) != BLOB:
            raise SystemExit(f"the port-forward passed {len(body[0])} bytes of {BLOB}")
    finally:
        forward.terminate()
        forward.wait(10)
    return {"exec": statistics.median(execs), "get": statistics.median(gets),
            "forward_p50": statistics.median(forwarded), "direct_p50": statistics.median(straight),
            "mb_per_s": BLOB / 1e6 / took}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("LABKIT_STATE_DIR", tempfile.mkdtemp(prefix="labkit-bench-"))
    binaries.ensure(say=lambda _: None)
    sandbox = Sandbox("bench-streaming")
    sandbox.up(say=lambda _: None, nodes=1)
    try:
        kubectl(sandbox, "apply", "-f", "-", input=json.dumps(POD))
        kubectl(sandbox, "wait", "--for=condition=Ready", "pod/served", "--timeout=120s")
        pod_ip = json.loads(kubectl(sandbox, "get", "pod", "served", "-o", "json").stdout)["status"]["podIP"]
        network_pid = sandbox.network_record()["pod_network_pid"]
        runs = []
        for number in range(1, args.runs + 1):
            runs.append(one_run(sandbox, args.calls, args.requests, pod_ip, network_pid))
            print(f"  run {number}/{args.runs}: " + ", ".join(f"{k} {v:.4g}" for k, v in runs[-1].items()), flush=True)
    finally:
        sandbox.down(purge=True, say=lambda _: None)

    def figure(key: str) -> tuple[float, float, float]:
        values = [run[key] for run in runs]
        return statistics.median(values), min(values), max(values)

    print(f"\nkubectl exec/get and port-forward, {args.runs} runs (median [range]):")
    for key, label, scale, unit in (("exec", "kubectl exec POD -- true", 1000, "ms"),
                                    ("get", "kubectl get pod POD", 1000, "ms"),
                                    ("forward_p50", "HTTP through port-forward, p50", 1000, "ms"),
                                    ("direct_p50", "HTTP to the pod's address, p50", 1000, "ms"),
                                    ("mb_per_s", f"{BLOB // 1_000_000} MB through port-forward", 1, "MB/s")):  # fmt: skip
        median, low, high = figure(key)
        print(f"  {label:34} {median * scale:8.1f} {unit}  [{low * scale:.1f}-{high * scale:.1f}]")
    exec_ratio = statistics.median([run["exec"] / run["get"] for run in runs])
    forward_ratio = statistics.median([run["forward_p50"] / run["direct_p50"] for run in runs])
    print(f"  exec / get: {exec_ratio:.2f}x (target <= 1.5x)")
    print(f"  port-forward p50 / direct p50: {forward_ratio:.2f}x (target <= 3x)")
    print(f"  throughput: {figure('mb_per_s')[0]:.0f} MB/s (target >= 50 MB/s)")


if __name__ == "__main__":
    main()
