"""What a pod worker is given to do besides driving its pod: typed items on its queue, handled in its own thread,
in order, so that the node's watch, chaos experiments, exited processes and probes never touch a pod's containers
from another thread."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass


class Work:
    """What a pod worker is given to do besides driving its pod, handled in its own thread, in order."""


@dataclass
class Update(Work):
    pod: dict  # the pod as the node's watch saw it


@dataclass
class Forget(Work):
    lost: bool  # the node is lost: kill, and tell the API nothing


@dataclass
class Kill(Work):
    container: str
    reply: concurrent.futures.Future


@dataclass
class Stress(Work):
    container: str
    reply: concurrent.futures.Future
    argv: list[str]


@dataclass
class Unstress(Work):
    container: str


@dataclass
class Wake(Work):
    why: str  # a container's process ended, a probe changed its verdict
