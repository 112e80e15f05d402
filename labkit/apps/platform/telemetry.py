"""What the platform tells its operators: JSON logs, trace spans in those logs, Prometheus metrics.

Logs are one JSON object a line on stdout (a container's log is its stdout), so
``kubectl logs`` and any log pipeline can filter them by field. Tracing follows
W3C Trace Context: a ``traceparent`` header arriving with a request is the
parent of that request's span, each outgoing call sends its own, and the queue
keeps each task's so the worker continues the trace that submitted it. There is
no tracing backend: each finished span is a log record (``"msg": "span"``) with
its name, trace and span ids, parent id, start, duration and status, which is
enough to put a trace back together from the logs of all four services.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Iterator

from labkit.apps.web import LATENCY_BUCKETS, Histogram  # the web app's latency histogram, Prometheus' buckets


# --------------------------------------------------------------------------- logs

_identity: dict[str, str] = {"service": "platform"}
_log_lock = threading.Lock()
_context = threading.local()  # the span this thread works in


def configure(service: str, version: str, pod: str) -> None:
    """Who this process is, in every record it logs."""
    _identity.update(service=service, version=version, pod=pod)


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log(level: str, msg: str, **fields: object) -> None:
    """One JSON record: ts, level, service, msg, then the current span's task and trace, then ``fields``."""
    record: dict[str, object] = {"ts": timestamp(time.time()), "level": level, "service": _identity["service"],
                                 "msg": msg}  # fmt: skip
    span = current_span()
    if span is not None:
        if span.task_id:
            record["task_id"] = span.task_id
        record.update(trace_id=span.trace_id, span_id=span.span_id)
    record.update((k, v) for k, v in fields.items() if v is not None)
    record.update(version=_identity.get("version"), pod=_identity.get("pod"))
    write(record)


def write(record: dict) -> None:
    """A whole line at once, flushed: request threads log concurrently and the log is read live."""
    line = json.dumps(record, separators=(",", ":"), default=str)
    with _log_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- traces

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def parse_traceparent(header: str | None) -> tuple[str, str] | None:
    """(trace id, parent span id) from a W3C ``traceparent``; None if absent or malformed (a new trace starts)."""
    match = _TRACEPARENT.fullmatch((header or "").strip().lower())
    if not match or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return match.group(1), match.group(2)


def new_id(length: int) -> str:
    """A random id of ``length`` hex digits (32 for a trace, 16 for a span)."""
    return os.urandom(length // 2).hex()


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    task_id: str | None = None
    start: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    status: str = "ok"
    fields: dict[str, object] = field(default_factory=dict)

    @property
    def traceparent(self) -> str:
        """The header that makes a call this span's child."""
        return f"00-{self.trace_id}-{self.span_id}-01"

    def record(self) -> dict:
        return {"ts": timestamp(self.start), "level": "info", "service": _identity["service"], "msg": "span",
                **({"task_id": self.task_id} if self.task_id else {}),
                "trace_id": self.trace_id, "span_id": self.span_id, "parent_id": self.parent_id, "name": self.name,
                "start": timestamp(self.start), "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
                "status": self.status, **self.fields,
                "version": _identity.get("version"), "pod": _identity.get("pod")}  # fmt: skip


def current_span() -> Span | None:
    return getattr(_context, "span", None)


@contextmanager
def span(name: str, parent: str | None = None, *, task_id: str | None = None, quiet: bool = False,
         **fields: object) -> Iterator[Span]:  # fmt: skip
    """A span around a block: the child of ``parent`` (a traceparent) if given, else of the thread's
    current span, else the root of a new trace. It is the thread's current span inside the block, and
    is logged when the block ends (unless ``quiet`` or the block set ``span.fields["quiet"]``)."""
    outer = current_span()
    context = parse_traceparent(parent) if parent else None
    if context is None and outer is not None:
        context = (outer.trace_id, outer.span_id)
    trace_id, parent_id = context if context else (new_id(32), None)
    if task_id is None and outer is not None:
        task_id = outer.task_id
    current = Span(name, trace_id, new_id(16), parent_id, task_id, fields=dict(fields))
    _context.span = current
    try:
        yield current
    except BaseException:
        current.status = "error"
        raise
    finally:
        _context.span = outer
        if not (quiet or current.fields.pop("quiet", False)):
            write(current.record())


# --------------------------------------------------------------------------- metrics

# name: (type, help). Every metric a role exposes is declared here, so the exposition has its HELP and TYPE.
METRICS: dict[str, tuple[str, str]] = {
    "http_requests_total": ("counter", "HTTP requests served, by route and status code."),
    "http_request_duration_seconds": ("histogram", "Time to serve an HTTP request, by route and status code."),
    "platform_client_requests_total": ("counter", "Calls to another service, by target and outcome (a status "
                                                  "code, timeout, refused, reset, unreachable or breaker-open)."),
    "platform_client_request_duration_seconds": ("histogram", "Time a call to another service took, by target."),
    "platform_client_retries_total": ("counter", "Calls made again after a failure, by target."),
    "platform_breaker_state": ("gauge", "Circuit breaker by target: 0 closed, 1 half-open, 2 open."),
    "platform_breaker_opened_total": ("counter", "Times a circuit breaker opened, by target."),
    "platform_queue_depth": ("gauge", "Tasks waiting to be leased."),
    "platform_queue_leased": ("gauge", "Tasks leased to a worker and not yet done."),
    "platform_queue_dead_lettered": ("gauge", "Tasks given up after $MAX_ATTEMPTS attempts."),
    "platform_queue_limit": ("gauge", "Waiting tasks beyond which submissions are refused with 429."),
    "platform_queue_events_total": ("counter", "What happened to tasks in the queue, by event."),
    "platform_tasks_done_total": ("counter", "Tasks finished and acknowledged."),
    "platform_tasks_failed_total": ("counter", "Task attempts that failed."),
    "platform_tasks_retried_total": ("counter", "Tasks handed back for another attempt (failed, or lease expired)."),
    "platform_worker_busy": ("gauge", "Tasks this worker holds right now."),
    "platform_worker_paused": ("gauge", "1 while this worker does not lease because a circuit breaker is open."),
    "platform_results_stored": ("gauge", "Results the store holds."),
    "platform_journal_records": ("gauge", "Records in the journal under $DATA_DIR (0: no journal)."),
    "platform_ready": ("gauge", "1 if /readyz answers 200."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_start_time_seconds": ("gauge", "Start time of the process since the Unix epoch."),
    "platform_version_info": ("gauge", "The release and role this process runs."),
}

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Gauge:
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


class Metrics:
    """Counters and histograms with labels, rendered in the Prometheus text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, Histogram]] = {}

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        assert METRICS[name][0] == "counter", name
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + by

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        assert METRICS[name][0] == "histogram", name
        with self._lock:
            series = self._histograms.setdefault(name, {})
            series.setdefault(tuple(sorted(labels.items())), Histogram()).observe(seconds)

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (0 if never counted): what tests and the worker's own logic read."""
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def render(self, gauges: Iterable[Gauge]) -> str:
        lines: list[str] = []
        with self._lock:
            for name, series in sorted(self._counters.items()):
                lines += _header(name)
                lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in sorted(series.items())]
            for name, hists in sorted(self._histograms.items()):
                lines += _header(name)
                for labels, hist in sorted(hists.items()):
                    for bound, count in zip(LATENCY_BUCKETS, hist.buckets):
                        lines.append(f"{name}_bucket{_labels(labels + (('le', str(bound)),))} {count}")
                    lines += [f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {hist.count}",
                              f"{name}_sum{_labels(labels)} {hist.total:.6f}",
                              f"{name}_count{_labels(labels)} {hist.count}"]  # fmt: skip
        seen: set[str] = set()
        for gauge in gauges:
            if gauge.name not in seen:
                lines += _header(gauge.name)
                seen.add(gauge.name)
            lines.append(f"{gauge.name}{_labels(tuple(sorted(gauge.labels.items())))} {_number(gauge.value)}")
        return "\n".join(lines) + "\n"


def _header(name: str) -> list[str]:
    kind, help_text = METRICS[name]
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in labels) + "}"


def _escape(value: str) -> str:
    """A label value as the exposition format quotes it."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
