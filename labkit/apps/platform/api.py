"""api: where clients submit tasks and ask after them; it holds no state of its own, so it scales out.

``POST /tasks`` with ``{"kind": "sleep"|"cpu"|"fail", "ms": N, ...}`` names the
task (the id is made here, so a client's retry of a submission the queue got is
not a second task), hands it to the queue and answers 202 with ``{"id"}``. When
the queue refuses (429: full) or cannot be reached (503), the client hears so,
with ``Retry-After``: backpressure travels to whoever makes the load.

``GET /tasks/ID`` answers from the store (done: the result), else from the
queue (queued, leased, dead), else the store once more (the task may have
finished between the two questions), else 404: a task nobody knows, which is
what a lost task looks like.
"""

from __future__ import annotations

import uuid

from labkit.apps.platform.client import CallError, Client
from labkit.apps.platform.server import Request, Response, Route, Service, body_object, error, serve
from labkit.apps.platform.settings import Settings
from labkit.apps.platform.taskqueue import parse_task
from labkit.apps.platform.telemetry import Gauge, Metrics, current_span, log

RETRY_AFTER = "1"  # seconds, when the queue did not say


def routes(queue: Client, store: Client) -> list[Route]:
    def submit(request: Request) -> Response:
        body = {**body_object(request), "id": uuid.uuid4().hex}
        task = parse_task(body)  # a bad submission is the client's 400, not the queue's
        current = current_span()
        if current is not None:
            current.task_id = task.id
        try:
            reply = queue.call("POST", "/tasks", {**body, "submitted_at": task.submitted_at}, route="POST /tasks")
        except CallError as exc:
            log("warning", f"cannot submit: {exc}", error=exc.kind)
            return error(503, f"the queue cannot be reached ({exc.kind}): try again later",
                         **{"Retry-After": RETRY_AFTER})  # fmt: skip
        if reply.status in (200, 201):
            log("info", f"submitted {task.kind} task of {task.ms}ms")
            return Response(202, {"id": task.id, "state": "queued"}, headers={"Location": f"/tasks/{task.id}"})
        retry_after = reply.headers.get("retry-after", RETRY_AFTER)
        if reply.status == 429:
            return error(429, "the queue is full: try again later", **{"Retry-After": retry_after})
        if reply.status >= 500:
            return error(503, f"the queue answered {reply.status}: try again later", **{"Retry-After": retry_after})
        return error(502, f"the queue answered {reply.status}: {_reason(reply.body)}")

    def show(request: Request) -> Response:
        task_id = request.params["id"]
        unreachable: list[str] = []
        for target, path in ((store, f"/results/{task_id}"), (queue, f"/tasks/{task_id}"),
                             (store, f"/results/{task_id}")):  # fmt: skip
            route = "GET /results/{id}" if target is store else "GET /tasks/{id}"
            try:
                reply = target.call("GET", path, route=route)
            except CallError as exc:
                unreachable.append(str(exc))
                continue
            if reply.status == 200 and isinstance(reply.body, dict):
                return Response(200, reply.body)
            if reply.status != 404:
                unreachable.append(f"{target.target} answered {reply.status}")
        if unreachable:
            return error(503, "cannot tell: " + "; ".join(unreachable), **{"Retry-After": RETRY_AFTER})
        return error(404, "no such task: neither the queue nor the store knows it")

    return [Route("POST", "/tasks", submit), Route("GET", "/tasks/{id}", show)]


def _reason(body: object) -> str:
    return body.get("error", str(body)) if isinstance(body, dict) else str(body).strip()


def main(settings: Settings) -> int:
    metrics = Metrics()
    queue = Client("queue", settings.queue_url, settings, metrics)
    store = Client("store", settings.store_url, settings, metrics)

    def gauges() -> list[Gauge]:
        return [Gauge("platform_breaker_state", c.breaker.state, {"target": c.target}) for c in (queue, store)]

    return serve(Service(settings, routes(queue, store), gauges=gauges, metrics=metrics))
