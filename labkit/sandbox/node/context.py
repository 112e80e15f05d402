"""What one node's pod workers share, passed down to each: never reached for through module globals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from labkit.kube.cache import ObjectCache
from labkit.kube.client import KubeAPI
from labkit.kube.events import EventSink
from labkit.sandbox.node import logs, probes, usage
from labkit.sandbox.node.runtime import PlainRuntime


@dataclass
class NodeContext:
    node: str
    api: KubeAPI  # the node's own credentials
    log: Callable[[str], None]
    events: EventSink
    objects: ObjectCache  # ConfigMaps and Secrets, read for the node's pods
    relist: probes.Relist  # when the node's probes see a new container
    allocatable: dict
    runtime: PlainRuntime  # isolated or plain: how sandboxes and containers are made
    monitor: usage.Monitor  # CPU and memory of the agent's processes
    capture: logs.Capture  # the agent's reader of every container's output
    networking: Any  # network.Networking, shared by the agent's nodes (None: pods have no addresses)
    pod_cidr: Callable[[], str | None]  # the node's spec.podCIDR, once assigned

    @property
    def isolated(self) -> bool:
        return self.runtime.isolated
