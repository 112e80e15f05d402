"""worker: leases tasks from the queue, executes them, stores each result, then acknowledges it.

``CONCURRENCY`` loops each do, over and over: lease the next task (a long poll),
execute it (``sleep`` waits ``ms``; ``cpu`` burns ``ms`` of CPU time; ``fail``
waits ``ms`` then fails, on every attempt or, with ``"failures": N`` in the
task, on its first N), store the result, and only then report the task done.
A task that fails is handed back to the queue, which retries or dead-letters
it. The order is what makes a killed worker harmless: until the done report
the queue still holds the lease, and when the lease runs out another worker
runs the task.

Its calls to the queue and the store follow the resilience settings of
``labkit.apps.platform.client``; with a circuit breaker configured, the worker
also stops leasing while a breaker is open, so that tasks wait in the queue
instead of being taken and failed one after another (backpressure).

On SIGTERM it stops leasing, finishes the tasks it holds, reports them, and
exits 0: a rollout or a scale-down loses nothing and wastes nothing. Its HTTP
side serves only probes, ``/metrics`` and ``/status``.
"""

from __future__ import annotations

import os
import threading
import time
import traceback

from labkit.apps.platform.client import STATE_NAMES, CallError, Client
from labkit.apps.platform.server import Request, Response, Route, Service, serve
from labkit.apps.platform.settings import Settings
from labkit.apps.platform.telemetry import Gauge, Metrics, log, span

PAGE = 4096
LEASE_PAUSE = 1.0  # seconds a loop waits after a lease call that failed
MAX_PAUSE = 1.0  # how long a paused loop sleeps before it looks at the breakers again


class TaskFailed(Exception):
    pass


def execute(task: dict) -> dict:
    """Do what the task asks; its output, or TaskFailed."""
    kind, ms = task["kind"], task["ms"]
    if kind == "cpu":
        deadline = time.thread_time() + ms / 1000  # CPU time: the same work however busy the machine is
        rounds = 0
        while time.thread_time() < deadline:
            sum(i * i for i in range(200))
            rounds += 1
        return {"cpu_ms": ms, "rounds": rounds}
    time.sleep(ms / 1000)
    if kind == "fail":
        failures = task.get("payload", {}).get("failures")
        if not isinstance(failures, int) or task["attempt"] <= failures:
            raise TaskFailed(f"the task asked to fail (attempt {task['attempt']})")
    return {"slept_ms": ms}


class Worker:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.release = settings.release
        self.metrics = metrics
        self.queue = Client("queue", settings.queue_url, settings, metrics)
        self.store = Client("store", settings.store_url, settings, metrics)
        self.stopping = threading.Event()
        self.loops: list[threading.Thread] = []
        self.leaked: list[bytearray] = []  # release 1.2's memory that is never given back
        self._lock = threading.Lock()
        self.busy = 0
        self.paused = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for index in range(self.settings.concurrency):
            loop = threading.Thread(target=self.loop, args=(f"{self.settings.hostname}/{index}",), name=f"loop-{index}")
            loop.start()
            self.loops.append(loop)

    def stop(self) -> None:
        """Stop leasing; wait for the tasks in hand to be executed, stored and reported."""
        self.stopping.set()
        log("info", f"stopped leasing; finishing {self.busy} tasks in hand")
        for loop in self.loops:
            loop.join()
        log("info", "every task in hand is finished")

    def readiness(self) -> tuple[bool, str]:
        return (True, "ready") if self.loops else (False, "starting")

    # ------------------------------------------------------------------ the loop

    def pause_for(self) -> float:
        """How long to hold off leasing: while a circuit breaker is open (0: lease now)."""
        if not self.settings.breaker_failures:
            return 0.0
        return min(MAX_PAUSE, max(self.queue.breaker.retry_in(), self.store.breaker.retry_in()))

    def loop(self, name: str) -> None:
        while not self.stopping.is_set():
            pause = self.pause_for()
            if pause:
                self._count("paused", 1)
                self.stopping.wait(pause)
                self._count("paused", -1)
                continue
            try:
                reply = self.queue.call("POST", "/lease", {"worker": name, "wait": self.settings.lease_wait},
                                        route="POST /lease", extra_timeout=self.settings.lease_wait)  # fmt: skip
            except CallError as exc:
                if exc.kind != "breaker-open":
                    log("warning", f"cannot lease: {exc}", error=exc.kind, worker=name)
                self.stopping.wait(LEASE_PAUSE)
                continue
            if reply.status == 204:
                continue
            if reply.status != 200 or not isinstance(reply.body, dict):
                log("warning", f"the queue answered a lease with {reply.status}", worker=name)
                self.stopping.wait(LEASE_PAUSE)
                continue
            self._count("busy", 1)
            try:
                self.process(reply.body, name)
            finally:
                self._count("busy", -1)

    def process(self, task: dict, name: str) -> None:
        """One leased task, in a span that continues the trace of its submission."""
        with span("task", task.get("traceparent"), task_id=task["id"], kind=task["kind"], attempt=task["attempt"],
                  worker=name) as current:  # fmt: skip
            started = time.time()
            if self.release.ack_first:  # release 1.1's defect: the queue forgets the task before it is run
                self.ack(task)
            log("info", f"executing {task['kind']} task of {task['ms']}ms (attempt {task['attempt']})", worker=name)
            try:
                output = execute(task)
            except TaskFailed as exc:
                current.status = "error"
                self.metrics.inc("platform_tasks_failed_total")
                if self.release.crash_on_failure:  # release 1.4's defect: the failure is not handled
                    log("error", f"unhandled error in the task handler, exiting: {exc}", worker=name)
                    traceback.print_exc()
                    os._exit(1)
                log("warning", f"task failed: {exc}", worker=name)
                self.give_back(task, str(exc))
                return
            if self.release.leak_per_task:  # release 1.2's defect: a cache nothing ever evicts
                block = bytearray(self.release.leak_per_task)
                block[::PAGE] = b"\x01" * len(range(0, len(block), PAGE))  # written, so resident
                self.leaked.append(block)
            finished = time.time()
            result = {"id": task["id"], "state": "done", "kind": task["kind"], "ms": task["ms"], "output": output,
                      "attempt": task["attempt"], "worker": name, "submitted_at": task.get("submitted_at"),
                      "started_at": started, "finished_at": finished,
                      "duration_ms": round((finished - started) * 1000, 3)}  # fmt: skip
            if not self.store_result(task, result):
                current.status = "error"
                if self.release.ack_first:
                    log("error", "the result could not be stored and the task is acknowledged already: it is lost")
                else:
                    self.give_back(task, "its result could not be stored")
                return
            if not self.release.ack_first:
                self.ack(task)
            self.metrics.inc("platform_tasks_done_total")
            log("info", "task done", worker=name, duration_ms=result["duration_ms"])

    # ------------------------------------------------------------------ calls

    def store_result(self, task: dict, result: dict) -> bool:
        try:
            reply = self.store.call("PUT", f"/results/{task['id']}", result, route="PUT /results/{id}")
        except CallError as exc:
            log("warning", f"cannot store the result: {exc}", error=exc.kind)
            return False
        if reply.status not in (200, 201):
            log("warning", f"the store answered {reply.status} to the result")
            return False
        return True

    def ack(self, task: dict) -> None:
        try:
            reply = self.queue.call("POST", f"/tasks/{task['id']}/done", {"lease": task["lease"]},
                                    route="POST /tasks/{id}/done")  # fmt: skip
        except CallError as exc:
            log("warning", f"cannot report the task done: {exc}; its lease will run out and it will run again",
                error=exc.kind)  # fmt: skip
            return
        if reply.status == 404:
            log("info", "the queue no longer held the task (another worker finished it)")

    def give_back(self, task: dict, reason: str) -> None:
        """Report a failed attempt, so the queue retries or dead-letters the task now, not at lease expiry."""
        try:
            reply = self.queue.call("POST", f"/tasks/{task['id']}/fail", {"lease": task["lease"], "error": reason},
                                    route="POST /tasks/{id}/fail")  # fmt: skip
        except CallError as exc:
            log("warning", f"cannot hand the task back: {exc}; its lease will run out", error=exc.kind)
            return
        if reply.status == 200 and isinstance(reply.body, dict) and reply.body.get("state") == "queued":
            self.metrics.inc("platform_tasks_retried_total")

    # ------------------------------------------------------------------ observability

    def _count(self, what: str, by: int) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + by)

    def gauges(self) -> list[Gauge]:
        return [Gauge("platform_worker_busy", self.busy), Gauge("platform_worker_paused", 1 if self.paused else 0),
                *(Gauge("platform_breaker_state", c.breaker.state, {"target": c.target})
                  for c in (self.queue, self.store))]  # fmt: skip

    def status(self, request: Request) -> Response:
        return Response(200, {"busy": self.busy, "paused": bool(self.paused), "loops": len(self.loops),
                              "stopping": self.stopping.is_set(),
                              "done": int(self.metrics.value("platform_tasks_done_total")),
                              "failed": int(self.metrics.value("platform_tasks_failed_total")),
                              "leaked_mb": sum(map(len, self.leaked)) >> 20,
                              "breakers": {c.target: STATE_NAMES[c.breaker.state]
                                           for c in (self.queue, self.store)}})  # fmt: skip


def main(settings: Settings) -> int:
    metrics = Metrics()
    worker = Worker(settings, metrics)
    service = Service(settings, [Route("GET", "/status", worker.status, quiet=True)], gauges=worker.gauges,
                      ready=worker.readiness, metrics=metrics)  # fmt: skip
    return serve(service, start=worker.start, stop=worker.stop)
