"""The kubelet's resource metrics (``/metrics/resource``): CPU and memory per container, pod and node.

Written in the Prometheus text format with the kubelet's metric names, so that
``kubectl get --raw /api/v1/nodes/NODE/proxy/metrics/resource`` shows what it
shows on a real node, and metrics-server could read it. The figures are the
agent's own samples of each container's processes (usage.py): resident memory
stands for the working set.
"""

from __future__ import annotations

import time
from typing import Iterable

_HEADERS = {
    "container_cpu_usage_seconds_total": ("counter", "Cumulative cpu time consumed by the container in core-seconds"),
    "container_memory_working_set_bytes": ("gauge", "Current working set of the container in bytes"),
    "container_start_time_seconds": ("gauge", "Start time of the container since unix epoch in seconds"),
    "pod_cpu_usage_seconds_total": ("counter", "Cumulative cpu time consumed by the pod in core-seconds"),
    "pod_memory_working_set_bytes": ("gauge", "Current working set of the pod in bytes"),
    "node_cpu_usage_seconds_total": ("counter", "Cumulative cpu time consumed by the node in core-seconds"),
    "node_memory_working_set_bytes": ("gauge", "Current working set of the node in bytes"),
    "scrape_error": ("gauge", "1 if there was an error while getting container metrics, 0 otherwise"),
}


def _labels(**items: str) -> str:
    return "{" + ",".join(f'{key}="{value}"' for key, value in items.items()) + "}"


def resource_metrics(workers: Iterable) -> str:
    """The text of ``/metrics/resource`` for the pod workers of one node."""
    stamp = int(time.time() * 1000)
    samples: dict[str, list[str]] = {name: [] for name in _HEADERS}
    node_cpu, node_memory = 0.0, 0
    for worker in workers:
        meta = worker.pod["metadata"]
        pod_cpu, pod_memory, measured_any = 0.0, 0, False
        for c in worker.containers:
            if c.measured is None or c.process is None:
                continue
            measured_any = True
            labels = _labels(container=c.name, namespace=meta["namespace"], pod=meta["name"])
            samples["container_cpu_usage_seconds_total"].append(f"{labels} {c.measured.cpu_seconds:.6f} {stamp}")
            samples["container_memory_working_set_bytes"].append(f"{labels} {c.measured.memory_bytes} {stamp}")
            samples["container_start_time_seconds"].append(f"{labels} {c.started_wall:.3f}")
            pod_cpu += c.measured.cpu_seconds
            pod_memory += c.measured.memory_bytes
        if measured_any:
            labels = _labels(namespace=meta["namespace"], pod=meta["name"])
            samples["pod_cpu_usage_seconds_total"].append(f"{labels} {pod_cpu:.6f} {stamp}")
            samples["pod_memory_working_set_bytes"].append(f"{labels} {pod_memory} {stamp}")
            node_cpu += pod_cpu
            node_memory += pod_memory
    samples["node_cpu_usage_seconds_total"].append(f" {node_cpu:.6f} {stamp}")
    samples["node_memory_working_set_bytes"].append(f" {node_memory} {stamp}")
    samples["scrape_error"].append(" 0")
    lines = []
    for name, (kind, help_text) in _HEADERS.items():
        lines += [f"# HELP {name} [STABLE] {help_text}", f"# TYPE {name} {kind}"]
        lines += [name + sample for sample in samples[name]]
    return "\n".join(lines) + "\n"
