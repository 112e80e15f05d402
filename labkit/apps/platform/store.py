"""store: the results of finished tasks, by task id.

A worker writes a task's result here *before* it tells the queue the task is
done, so that at every moment a task is known to the queue, to the store, or
to both: never to neither (unless a release gets that order wrong). Writing a
result is idempotent: a task that ran twice (at-least-once delivery) still has
one result.

Endpoints (JSON): ``PUT /results/ID`` (201 when new, 200 when replaced),
``GET /results/ID`` (404 when none), ``GET /results`` (how many). State is in
memory; with ``DATA_DIR`` each write is also journaled there and replayed at
start.
"""

from __future__ import annotations

import threading

from labkit.apps.platform.journal import Journal
from labkit.apps.platform.server import Request, Response, Route, Service, body_object, error, serve
from labkit.apps.platform.settings import Settings
from labkit.apps.platform.telemetry import Gauge, Metrics, log


class Results:
    def __init__(self, settings: Settings) -> None:
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.journal = Journal(settings.data_dir, "store")
        for record in self.journal.replay():
            self.results[record["id"]] = record["result"]
        if self.journal.enabled:
            self.journal.rewrite(self._snapshot())
            log("info", f"recovered {len(self.results)} results from {self.journal.path}")

    def _snapshot(self) -> list[dict]:
        return [{"id": task_id, "result": result} for task_id, result in self.results.items()]

    def put(self, task_id: str, result: dict) -> bool:
        """Store ``result``; True if it is the task's first."""
        with self.lock:
            new = task_id not in self.results
            self.results[task_id] = result
            self.journal.append({"id": task_id, "result": result})
            if self.journal.wants_compaction(len(self.results)):
                self.journal.rewrite(self._snapshot())
            return new

    def get(self, task_id: str) -> dict | None:
        with self.lock:
            return self.results.get(task_id)


def routes(results: Results) -> list[Route]:
    def put(request: Request) -> Response:
        result = body_object(request)
        new = results.put(request.params["id"], result)
        return Response(201 if new else 200, {"id": request.params["id"], "stored": True})

    def get(request: Request) -> Response:
        result = results.get(request.params["id"])
        return Response(200, result) if result is not None else error(404, "no result for that task (yet)")

    def count(request: Request) -> Response:
        with results.lock:
            return Response(200, {"results": len(results.results)})

    return [Route("PUT", "/results/{id}", put), Route("GET", "/results/{id}", get), Route("GET", "/results", count)]


def main(settings: Settings) -> int:
    metrics = Metrics()
    results = Results(settings)

    def gauges() -> list[Gauge]:
        return [Gauge("platform_results_stored", len(results.results)),
                Gauge("platform_journal_records", results.journal.records)]  # fmt: skip

    return serve(Service(settings, routes(results), gauges=gauges, metrics=metrics))
