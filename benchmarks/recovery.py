"""How fast the sandbox detects and recovers a killed pod, as labkit's own recorder measures it.

A Deployment of the course's web app (3 replicas, readiness probe every second) in
a fresh sandbox; each run kills one of its pods with a PodChaos ``pod-kill`` inside
``lab.measure``, which records:

* time to detect: from the kill to the moment the Deployment has fewer ready
  replicas than it wants (its readiness signal), and
* time to recover: from the kill to the moment it has all of them ready again
  (the replacement pod passed its readiness probe).

Beside it, in the same run, the floor any recovery pays: the seconds from scaling
the Deployment up by one to the new replica being ready (a pod created, scheduled,
started and probed, with nothing killed). It prints medians of ``--runs`` and the
ratio of recovery to that floor.

    python benchmarks/recovery.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: labkit/web:1.0
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /readyz, port: 8080}, periodSeconds: 1}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    binaries.ensure(say=print)
    with tempfile.TemporaryDirectory(prefix="labkit-bench-recovery-") as scratch:
        os.environ["LABKIT_STATE_DIR"] = str(Path(scratch) / "state")
        os.chdir(scratch)  # the lab's results file goes here
        sandbox = Sandbox("bench")
        try:
            sandbox.up(say=lambda _: None)
            os.environ["KUBECONFIG"] = str(sandbox.state.kubeconfig)
            os.environ["LABKIT_CLUSTER"] = "kubeconfig"
            import labkit

            lab = labkit.start_lab("bench-recovery")
            lab.say = lambda _: None
            lab.apply(WEB)
            lab.wait_ready("deployment/web")
            detect, recover, floor = [], [], []
            for run in range(args.runs):
                time.sleep(1)  # settled: probes on their ticks, Events flushed
                with lab.measure("pod killed", "deployment/web", within=60) as record:
                    lab.chaos.pod_kill("deployment/web", name=f"kill-{run}")
                if record.ttd is None or record.ttr is None:
                    raise SystemExit(f"run {run}: the kill was not detected or not recovered ({record.notes})")
                detect.append(record.ttd)
                recover.append(record.ttr)
                time.sleep(1)
                started = time.monotonic()
                lab.kubectl("scale deployment web --replicas=4", show=False)
                lab.wait_ready("deployment/web")
                floor.append(time.monotonic() - started)
                lab.kubectl("scale deployment web --replicas=3", show=False)
                lab.wait_ready("deployment/web")
            lab.close(quiet=True)
        finally:
            sandbox.down(purge=True, say=lambda _: None)

    def row(name: str, values: list[float]) -> str:
        return f"  {name:<52}{statistics.median(values):6.2f} s   {min(values):.2f}-{max(values):.2f}"

    print(f"\nA killed pod of a 3-replica Deployment (readiness probe every 1 s), {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"  {'':<52}{'median':>8}   range")
    print(row("time to detect (fewer replicas ready)", detect))
    print(row("time to recover (all replicas ready again)", recover))
    print(row("floor: one replica more, scaled to ready", floor))
    print(f"  {'recovery / floor':<52}{statistics.median(recover) / statistics.median(floor):6.1f}x")


if __name__ == "__main__":
    main()
