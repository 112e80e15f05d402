"""queue: holds submitted tasks and leases them to workers, as a grid scheduler's queue hands out jobs.

A worker leases the next task for ``LEASE_SECONDS`` and must report it done or
failed before the lease runs out; a lease that runs out (a worker that died,
hung or was partitioned away) puts the task back for another worker. Each lease
is an attempt: a task that fails or times out ``MAX_ATTEMPTS`` times is
dead-lettered (kept aside, visible, redrivable) rather than retried for ever.
Delivery is therefore at least once: a worker that is slow but alive may finish
a task another worker also runs, which is why results are stored by task id.

Endpoints (JSON):

===============================  ==================================================================
``POST /tasks``                  enqueue ``{"id", "kind", "ms", ...}`` (201; 200 if the id is known:
                                 a retried submission is not a second task); 429 with ``Retry-After``
                                 once ``QUEUE_LIMIT`` tasks wait (backpressure)
``GET /tasks``                   counts: queued, leased, dead
``GET /tasks/ID``                a task's state (queued, leased, dead), attempts, last error
``POST /lease``                  ``{"worker"}``: the next task with a lease token (200), or 204 after
                                 waiting ``LEASE_WAIT_SECONDS`` for one (a long poll); 503 once the
                                 queue is shutting down
``POST /tasks/ID/done``          ``{"lease"}``: finished, forget it
``POST /tasks/ID/fail``          ``{"lease", "error"}``: requeued, or dead-lettered after the last
                                 attempt; 409 if that lease is no longer the task's
``GET /dead``                    the dead-lettered tasks
``POST /dead/redrive``           put every dead-lettered task back, with its attempts reset
===============================  ==================================================================

State is in memory; with ``DATA_DIR`` every change is also journaled there and
replayed at start, so a restarted queue still has its tasks and leases (without
it, a killed queue loses every task it held: the teaching point).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field

from labkit.apps.platform.journal import Journal
from labkit.apps.platform.server import BadRequest, Request, Response, Route, Service, body_object, error, serve
from labkit.apps.platform.settings import MAX_LEASE_WAIT, Settings
from labkit.apps.platform.telemetry import Gauge, Metrics, current_span, log

KINDS = ("sleep", "cpu", "fail")
MAX_TASK_MS = 600_000
EXPIRY_CHECK = 0.1  # seconds between looks for expired leases


@dataclass
class Task:
    id: str
    kind: str
    ms: int
    payload: dict = field(default_factory=dict)  # anything else the submission carried
    traceparent: str = ""  # the submission's trace, which the worker continues
    submitted_at: float = 0.0  # wall clock
    state: str = "queued"  # queued | leased | dead
    attempts: int = 0  # leases so far
    lease: str = ""  # the current lease's token
    lease_expires: float = 0.0  # wall clock, so that a journaled lease survives a restart
    worker: str = ""
    error: str = ""
    seq: int = 0  # order of (re)queueing: the queue is FIFO

    def view(self) -> dict:
        """What ``GET /tasks/ID`` shows."""
        shown = {"id": self.id, "state": self.state, "kind": self.kind, "ms": self.ms, "attempts": self.attempts}
        if self.state == "leased":
            shown.update(worker=self.worker, lease_expires_in=round(max(0.0, self.lease_expires - time.time()), 3))
        if self.error:
            shown["error"] = self.error
        return shown

    def leased_view(self) -> dict:
        """What a worker gets with its lease."""
        return {"id": self.id, "kind": self.kind, "ms": self.ms, "payload": self.payload, "lease": self.lease,
                "attempt": self.attempts, "lease_seconds": round(self.lease_expires - time.time(), 3),
                "traceparent": self.traceparent, "submitted_at": self.submitted_at}  # fmt: skip


def parse_task(body: dict) -> Task:
    """A task from a submission; BadRequest says what is wrong with it."""
    kind = body.get("kind")
    if kind not in KINDS:
        raise BadRequest(f'"kind" must be one of {", ".join(KINDS)}, got {kind!r}')
    ms = body.get("ms", 0)
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= MAX_TASK_MS:
        raise BadRequest(f'"ms" must be a whole number of milliseconds from 0 to {MAX_TASK_MS}, got {ms!r}')
    task_id = body.get("id") or uuid.uuid4().hex
    if not isinstance(task_id, str) or not task_id.replace("-", "").replace("_", "").isalnum() or len(task_id) > 64:
        raise BadRequest(f'"id" must be letters, digits, - and _ (64 at most), got {task_id!r}')
    payload = {k: v for k, v in body.items() if k not in ("id", "kind", "ms", "submitted_at")}
    submitted = body.get("submitted_at")
    if not isinstance(submitted, (int, float)):
        submitted = time.time()
    return Task(task_id, kind, ms, payload, submitted_at=submitted)


class TaskQueue:
    """The tasks, their leases and their journal; every method is safe from any request thread."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tasks: dict[str, Task] = {}
        self.ready: deque[str] = deque()  # ids of queued tasks, oldest first
        self.journal = Journal(settings.data_dir, "queue")
        self.closing = False  # shutting down: no more leases
        self._seq = 0
        self.changed = threading.Condition()
        self._recover()

    # ------------------------------------------------------------------ journal

    def _recover(self) -> None:
        for record in self.journal.replay():
            if record.get("op") == "put":
                task = Task(**record["task"])
                self.tasks[task.id] = task
            elif record.get("op") == "drop":
                self.tasks.pop(record["id"], None)
        queued = sorted((t for t in self.tasks.values() if t.state == "queued"), key=lambda t: t.seq)
        self.ready.extend(t.id for t in queued)
        self._seq = max((t.seq for t in self.tasks.values()), default=0)
        if self.journal.enabled:
            self.journal.rewrite(self._snapshot())
            counts = self.counts()
            log("info", f"recovered {len(self.tasks)} tasks from {self.journal.path}", **counts)

    def _snapshot(self) -> list[dict]:
        return [{"op": "put", "task": asdict(t)} for t in self.tasks.values()]

    def _put(self, task: Task) -> None:
        self.tasks[task.id] = task
        self.journal.append({"op": "put", "task": asdict(task)})

    def _drop(self, task_id: str) -> None:
        del self.tasks[task_id]
        self.journal.append({"op": "drop", "id": task_id})
        if self.journal.wants_compaction(len(self.tasks)):
            self.journal.rewrite(self._snapshot())

    def _enqueue(self, task: Task) -> None:
        self._seq += 1
        task.state, task.lease, task.lease_expires, task.worker, task.seq = "queued", "", 0.0, "", self._seq
        self._put(task)
        self.ready.append(task.id)
        self.changed.notify_all()

    # ------------------------------------------------------------------ operations

    def counts(self) -> dict[str, int]:
        states = [t.state for t in self.tasks.values()]
        return {"queued": len(self.ready), "leased": states.count("leased"), "dead": states.count("dead")}

    def submit(self, task: Task) -> tuple[int, Task]:
        """201 and the task, 200 and the known one for a known id, or 429 when the queue is full."""
        with self.changed:
            known = self.tasks.get(task.id)
            if known is not None:
                return 200, known
            if len(self.ready) >= self.settings.queue_limit:
                self.metrics.inc("platform_queue_events_total", event="refused")
                return 429, task
            self._enqueue(task)
            self.metrics.inc("platform_queue_events_total", event="enqueued")
            return 201, task

    def lease(self, worker: str, wait: float) -> Task | None:
        """The next task, leased to ``worker``; None if none came within ``wait`` seconds.
        Raises Closing once the queue is shutting down."""
        deadline = time.monotonic() + wait
        with self.changed:
            while True:
                if self.closing:
                    raise Closing()
                self._expire()
                if self.ready:
                    task = self.tasks[self.ready.popleft()]
                    task.state, task.attempts, task.worker = "leased", task.attempts + 1, worker
                    task.lease = uuid.uuid4().hex[:16]
                    task.lease_expires = time.time() + self.settings.lease_seconds
                    self._put(task)
                    self.metrics.inc("platform_queue_events_total", event="leased")
                    return Task(**asdict(task))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(min(remaining, EXPIRY_CHECK))

    def done(self, task_id: str) -> int:
        """200 once forgotten; 404 if unknown. Any lease may finish a task: its result is stored already."""
        with self.changed:
            task = self.tasks.get(task_id)
            if task is None:
                return 404
            if task.state == "queued":
                self.ready.remove(task_id)  # its lease ran out, yet its first worker finished it after all
            self._drop(task_id)
            self.metrics.inc("platform_queue_events_total", event="done")
            self.metrics.inc("platform_tasks_done_total")
            return 200

    def fail(self, task_id: str, lease: str, reason: str) -> tuple[int, Task | None]:
        """The attempt under ``lease`` failed: requeue the task, or dead-letter it after its last attempt."""
        with self.changed:
            task = self.tasks.get(task_id)
            if task is None:
                return 404, None
            if task.state != "leased" or task.lease != lease:
                return 409, task
            self.metrics.inc("platform_queue_events_total", event="failed")
            self.metrics.inc("platform_tasks_failed_total")
            self._retry_or_bury(task, reason)
            return 200, task

    def _retry_or_bury(self, task: Task, reason: str) -> None:
        task.error = reason
        if task.attempts >= self.settings.max_attempts:
            task.state, task.lease, task.worker = "dead", "", ""
            self._put(task)
            self.metrics.inc("platform_queue_events_total", event="dead_lettered")
            log("warning", f"task dead-lettered after {task.attempts} attempts: {reason}", task_id=task.id)
        else:
            self._enqueue(task)
            self.metrics.inc("platform_tasks_retried_total")
            log("info", f"task requeued after attempt {task.attempts}: {reason}", task_id=task.id)

    def _expire(self) -> None:
        """Requeue (or dead-letter) every task whose lease ran out. Called with the lock held."""
        now = time.time()
        for task in [t for t in self.tasks.values() if t.state == "leased" and t.lease_expires <= now]:
            self.metrics.inc("platform_queue_events_total", event="expired")
            self._retry_or_bury(task, f"lease expired: worker {task.worker} did not report within "
                                      f"{self.settings.lease_seconds:g}s")  # fmt: skip

    def expire_forever(self) -> None:
        while True:
            time.sleep(EXPIRY_CHECK)
            with self.changed:
                self._expire()

    def redrive(self) -> int:
        with self.changed:
            dead = [t for t in self.tasks.values() if t.state == "dead"]
            for task in dead:
                task.attempts, task.error = 0, ""
                self._enqueue(task)
            return len(dead)

    def close(self) -> None:
        """Shutting down: waiting and later lease requests get 503 at once, and their workers pause."""
        with self.changed:
            self.closing = True
            self.changed.notify_all()


class Closing(Exception):
    pass


# --------------------------------------------------------------------------- endpoints

def routes(queue: TaskQueue) -> list[Route]:
    def submit(request: Request) -> Response:
        task = parse_task(body_object(request))
        current = current_span()
        if current is not None:
            current.task_id = task.id
            task.traceparent = current.traceparent  # the worker's span will be this one's child
        status, task = queue.submit(task)
        if status == 429:
            log("warning", f"queue full ({queue.settings.queue_limit} tasks waiting): submission refused")
            return error(429, f"the queue is full ({queue.settings.queue_limit} tasks waiting): try again later",
                         **{"Retry-After": "1"})  # fmt: skip
        return Response(status, task.view())

    def show(request: Request) -> Response:
        with queue.changed:
            task = queue.tasks.get(request.params["id"])
            return Response(200, task.view()) if task else error(404, "no such task in the queue")

    def lease(request: Request) -> Response:
        body = body_object(request)
        worker = str(body.get("worker") or "unnamed")
        wait = body.get("wait", queue.settings.lease_wait)
        if not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_LEASE_WAIT:
            raise BadRequest(f'"wait" must be a number of seconds from 0 to {MAX_LEASE_WAIT:g}')
        try:
            task = queue.lease(worker, float(wait))
        except Closing:
            return error(503, "the queue is shutting down", **{"Retry-After": "1"})
        if task is None:
            return Response(204, quiet=True)
        current = current_span()
        if current is not None:  # the lease belongs to the worker's poll; this links it to the task's trace
            current.task_id = task.id
            current.fields["task_traceparent"] = task.traceparent
        log("info", f"leased to {worker} (attempt {task.attempts})", task_id=task.id, worker=worker)
        return Response(200, task.leased_view())

    def done(request: Request) -> Response:
        status = queue.done(request.params["id"])
        return Response(200, {"id": request.params["id"], "state": "done"}) if status == 200 else \
            error(404, "no such task in the queue (done already, or never queued here)")  # fmt: skip

    def fail(request: Request) -> Response:
        body = body_object(request)
        status, task = queue.fail(request.params["id"], str(body.get("lease", "")), str(body.get("error", "failed")))
        if status == 404:
            return error(404, "no such task in the queue")
        if status == 409:
            return error(409, "that lease is no longer this task's (it expired and the task moved on)")
        return Response(200, task.view())

    def stats(request: Request) -> Response:
        with queue.changed:
            return Response(200, {**queue.counts(), "limit": queue.settings.queue_limit})

    def dead(request: Request) -> Response:
        with queue.changed:
            return Response(200, {"tasks": [t.view() for t in queue.tasks.values() if t.state == "dead"]})

    def redrive(request: Request) -> Response:
        count = queue.redrive()
        log("info", f"redrove {count} dead-lettered tasks")
        return Response(200, {"requeued": count})

    return [Route("POST", "/tasks", submit), Route("GET", "/tasks", stats), Route("GET", "/tasks/{id}", show),
            Route("POST", "/lease", lease), Route("POST", "/tasks/{id}/done", done),
            Route("POST", "/tasks/{id}/fail", fail), Route("GET", "/dead", dead),
            Route("POST", "/dead/redrive", redrive)]  # fmt: skip


def gauges(queue: TaskQueue) -> list[Gauge]:
    with queue.changed:
        counts = queue.counts()
    return [Gauge("platform_queue_depth", counts["queued"]), Gauge("platform_queue_leased", counts["leased"]),
            Gauge("platform_queue_dead_lettered", counts["dead"]),
            Gauge("platform_queue_limit", queue.settings.queue_limit),
            Gauge("platform_journal_records", queue.journal.records)]  # fmt: skip


def main(settings: Settings) -> int:
    metrics = Metrics()
    queue = TaskQueue(settings, metrics)
    service = Service(settings, routes(queue), gauges=lambda: gauges(queue), metrics=metrics)
    threading.Thread(target=queue.expire_forever, name="expiry", daemon=True).start()
    return serve(service, closing=queue.close)
