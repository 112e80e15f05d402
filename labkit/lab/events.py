"""A lab namespace's Events, as a timeline in the order things happened."""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING

from labkit import display

if TYPE_CHECKING:
    from labkit.lab.context import LabContext


class Events:
    """``lab.events()`` and ``lab.event_list()``."""

    def __init__(self, lab: LabContext) -> None:
        self.lab = lab

    def list(self) -> list[dict]:
        """The lab namespace's Events in the order they first happened (``in_time_order``)."""
        return in_time_order(self.lab.request("GET", f"/api/v1/namespaces/{self.lab.namespace}/events").get("items", []))

    def show(self, last: int | None = 30) -> None:
        """Show the lab's Events as a timeline: the ``last`` ones (None for all), each at the clock time it first
        happened and the seconds since the first of them, a repeated one with its count and span, as
        ``kubectl describe`` shows them. ``lab.event_list()`` returns them."""
        items = self.list()
        shown = items[-last:] if last else items
        origin = _event_time(shown[0]) if shown else 0.0
        rows = [(time.strftime("%H:%M:%S", time.localtime(_event_time(e))), f"+{_event_time(e) - origin:.0f}s",
                 e.get("type", ""), e.get("reason", ""),
                 f"{e['involvedObject'].get('kind', '').lower()}/{e['involvedObject'].get('name', '')}",
                 (e.get("message") or "").strip()[:160] + _repeats(e))
                for e in shown]  # fmt: skip
        display.table(rows, ["time", "since", "type", "reason", "object", "message"])


# Within one whole second (most Events carry whole seconds), the order a pod's start takes: its owner's scaling and
# creation, its scheduling, then the kubelet's pull, create and start. Components post Events asynchronously, so
# the order the API server stored them in does not say which came first.
_STAGES = {reason: rank for rank, reason in enumerate(
    ("ScalingReplicaSet", "SuccessfulCreate", "Scheduled", "Pulling", "Pulled", "Created", "Started"))}


def in_time_order(events: list[dict]) -> list[dict]:
    """Events oldest first, by when each first happened; within a second, by the stage of a pod's start, then by
    the finer time where there is one (the scheduler's microseconds), then by the order they were stored."""
    return sorted(events, key=lambda e: (int(_event_time(e)), _STAGES.get(e.get("reason", ""), len(_STAGES)),
                                         _event_time(e), int(e["metadata"].get("resourceVersion") or 0)))  # fmt: skip


def _event_time(event: dict) -> float:
    """When an Event first happened, in seconds: kubelets and controllers set firstTimestamp (whole seconds),
    the scheduler eventTime (microseconds)."""
    stamp = event.get("firstTimestamp") or event.get("eventTime") or event.get("lastTimestamp") or \
        event["metadata"].get("creationTimestamp", "")
    return _seconds(stamp)


def _seconds(stamp: str | None) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() if stamp else 0.0


def _repeats(event: dict) -> str:
    """A repeated Event's count and span, as ``kubectl describe`` writes it: " (x3 over 12s)"."""
    count = (event.get("series") or {}).get("count") or event.get("count") or 1
    if count <= 1:
        return ""
    last = event.get("lastTimestamp") or (event.get("series") or {}).get("lastObservedTime")
    span = max(0.0, _seconds(last) - _event_time(event)) if last else 0.0
    return f" (x{count} over {span:.0f}s)"
