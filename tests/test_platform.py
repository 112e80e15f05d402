"""The training platform: its four services as real local processes, its releases' defects, its resilience
settings, the load generator's task mode, its image and manifests, and the whole platform in a sandbox.

Most tests start the services they need on free ports of this machine (a second or
so); the last one applies ``platform.yaml`` in a sandbox and loads it from here.
Each test asserts what happened (tasks done, lost, retried, calls made), never how fast.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from conftest import eventually, kubectl, kubectl_json, module_cluster
from test_apps import parse_metrics, resident_mib

import labkit.apps
from labkit.apps import loadgen
from labkit.apps.platform.settings import RELEASES, Settings
from labkit.sandbox.controlplane import Sandbox
from labkit.sandbox.node import images

MIB = 1 << 20
FAST = {"LEASE_WAIT_SECONDS": "0.3"}  # idle workers poll often, so they drain at once


class Service:
    """``python3 -m labkit.apps.platform ROLE`` on a port of its own choosing, with its JSON log collected."""

    def __init__(self, role: str, **env: str) -> None:
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labkit.apps.platform", role], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **FAST, "PORT": "0", "HOSTNAME": f"{role}-7d4b9-x2x4q", **env},
        )  # fmt: skip
        self.records: list[dict] = []
        self.stderr: list[str] = []
        self._started = threading.Event()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]  # fmt: skip
        for reader in self._readers:
            reader.start()
        try:
            assert self._started.wait(20), f"{role} did not start: {self.stderr}"
            listening = self.logged("listening")
            assert listening, (self.records, self.stderr)
        except AssertionError:
            self.kill()  # the fixture never learns of a service that failed to start
            raise
        self.port = listening[0]["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(json.loads(line))  # every line is one JSON object
            if self.records[-1]["msg"] == "listening":
                self._started.set()
        self._started.set()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def call(self, method: str, path: str, body: object = None, headers: dict | None = None) -> tuple[int, object, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers or {})
            response = connection.getresponse()
            raw = response.read().decode()
            answer = json.loads(raw) if response.getheader("Content-Type") == "application/json" else raw
            return response.status, answer, dict(response.getheaders())
        finally:
            connection.close()

    def get(self, path: str) -> tuple[int, object]:
        status, body, _ = self.call("GET", path)
        return status, body

    def post(self, path: str, body: object = None) -> tuple[int, object]:
        status, answer, _ = self.call("POST", path, body)
        return status, answer

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200
        return parse_metrics(text)

    def logged(self, text: str, **fields: object) -> list[dict]:
        return [r for r in list(self.records)
                if text in r.get("msg", "") and all(r.get(k) == v for k, v in fields.items())]  # fmt: skip

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Platform:
    def __init__(self, store: Service, queue: Service, workers: list[Service], api: Service) -> None:
        self.store, self.queue, self.workers, self.api = store, queue, workers, api

    @property
    def all(self) -> list[Service]:
        return [self.api, self.queue, *self.workers, self.store]


@pytest.fixture
def start():
    started: list[Service] = []

    def start(role: str, **env: str) -> Service:
        started.append(Service(role, **env))
        return started[-1]

    yield start
    for service in started:
        service.kill()


def platform(start, *, workers: int = 1, queue: dict | None = None, worker: dict | None = None,
             api: dict | None = None, store: dict | None = None, **everyone: str) -> Platform:  # fmt: skip
    """The four roles wired together, each with ``everyone`` and its own settings."""
    store_service = start("store", **everyone, **(store or {}))
    queue_service = start("queue", **everyone, **(queue or {}))
    urls = {"QUEUE_URL": queue_service.url, "STORE_URL": store_service.url}
    worker_services = [start("worker", **urls, **everyone, **(worker or {})) for _ in range(workers)]
    api_service = start("api", **urls, **everyone, **(api or {}))
    return Platform(store_service, queue_service, worker_services, api_service)


def submit(service: Service, kind: str = "sleep", ms: int = 0, **fields: object) -> str:
    """A task submitted to the api (202) or straight to the queue (201): its id."""
    status, body = service.post("/tasks", {"kind": kind, "ms": ms, **fields})
    assert status in (201, 202), (status, body)
    return body["id"]


def finished(api: Service, task_id: str, timeout: float = 60) -> dict:
    """The task's record once it is done or dead-lettered."""
    def state() -> dict | None:
        status, body = api.get(f"/tasks/{task_id}")
        return body if status == 200 and body["state"] in ("done", "dead") else None

    return eventually(state, timeout=timeout, what=f"task {task_id} to finish")


def closed_port() -> int:
    """A port nothing listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- the flow


def test_tasks_flow_end_to_end(start) -> None:
    p = platform(start, workers=2, queue={"MAX_ATTEMPTS": "2"})
    sleep, cpu = submit(p.api, "sleep", 50), submit(p.api, "cpu", 50)
    doomed, flaky = submit(p.api, "fail", 0), submit(p.api, "fail", 0, failures=1)
    done = finished(p.api, sleep)
    assert done["state"] == "done" and done["output"] == {"slept_ms": 50} and done["attempt"] == 1
    assert done["worker"].startswith("worker-7d4b9-x2x4q/")
    assert finished(p.api, cpu)["output"]["cpu_ms"] == 50
    dead = finished(p.api, doomed)
    assert dead["state"] == "dead" and dead["attempts"] == 2 and "asked to fail" in dead["error"]
    recovered = finished(p.api, flaky)  # failed once, then succeeded on its second attempt
    assert recovered["state"] == "done" and recovered["attempt"] == 2

    assert p.api.get("/tasks/nosuchtask") == (404, {"error": "no such task: neither the queue nor the store knows it"})
    status, body = p.api.post("/tasks", {"kind": "teleport", "ms": 1})
    assert status == 400 and "kind" in body["error"]
    assert p.api.post("/tasks", {"kind": "sleep", "ms": -1})[0] == 400
    assert p.api.post("/tasks", [1, 2])[0] == 400
    assert p.api.call("PUT", "/tasks")[0] == 405
    status, info = p.queue.get("/")
    assert info["role"] == "queue" and info["version"] == "1.0" and p.queue.get("/version") == (200, "1.0\n")
    assert p.queue.get("/tasks") == (200, {"queued": 0, "leased": 0, "dead": 1, "limit": 1000})
    for service in p.all:
        assert service.get("/healthz") == (200, "ok\n") and service.get("/readyz") == (200, "ready\n")


def test_an_expired_lease_is_handed_out_again(start) -> None:
    queue = start("queue", LEASE_SECONDS="2", MAX_ATTEMPTS="2")
    assert queue.post("/tasks", {"id": "t1", "kind": "sleep", "ms": 0})[0] == 201
    assert queue.post("/tasks", {"id": "t1", "kind": "sleep", "ms": 0})[0] == 200  # the same id: not a second task
    status, first = queue.post("/lease", {"worker": "w1", "wait": 0})
    assert status == 200 and first["id"] == "t1" and first["attempt"] == 1
    assert queue.post("/lease", {"worker": "w2", "wait": 0})[0] == 204  # leased: nobody else gets it
    status, second = queue.post("/lease", {"worker": "w2", "wait": 10})  # ... until the lease runs out
    assert status == 200 and second["id"] == "t1" and second["attempt"] == 2 and second["lease"] != first["lease"]
    assert queue.post("/tasks/t1/fail", {"lease": first["lease"], "error": "late"})[0] == 409  # w1's lease is gone
    status, task = queue.get("/tasks/t1")
    assert task["state"] == "leased" and task["worker"] == "w2"
    # The second lease runs out too: that was its last attempt.
    dead = eventually(lambda: (lambda s, t: t if t["state"] == "dead" else None)(*queue.get("/tasks/t1")),
                      what="the task dead-lettered")  # fmt: skip
    assert dead["attempts"] == 2 and "lease expired: worker w2" in dead["error"]
    assert queue.get("/dead")[1]["tasks"][0]["id"] == "t1"
    assert queue.metrics()['platform_queue_events_total{event="expired"}'] == 2
    assert queue.post("/dead/redrive") == (200, {"requeued": 1})
    assert queue.get("/tasks/t1")[1]["state"] == "queued"


def test_the_journal_survives_a_queue_restart_with_data_dir(start, tmp_path: Path) -> None:
    queue = start("queue", DATA_DIR=str(tmp_path))
    for task_id in ("a", "b", "c"):
        queue.post("/tasks", {"id": task_id, "kind": "sleep", "ms": 0})
    leased = queue.post("/lease", {"worker": "w", "wait": 0})[1]
    assert leased["id"] == "a" and queue.post("/tasks/a/done", {"lease": leased["lease"]})[0] == 200
    assert queue.post("/lease", {"worker": "w", "wait": 0})[1]["id"] == "b"
    queue.kill()  # SIGKILL: nothing gets a chance to be saved on the way out
    with open(tmp_path / "queue.journal", "a") as journal:
        journal.write('{"op": "put", "task": {"id": "d", "ki')  # a record cut short by the kill

    again = start("queue", DATA_DIR=str(tmp_path))
    assert again.get("/tasks/a")[0] == 404  # done before the kill
    status, b = again.get("/tasks/b")
    assert status == 200 and b["state"] == "leased" and b["attempts"] == 1 and b["worker"] == "w"
    assert again.get("/tasks/c")[1]["state"] == "queued"
    assert again.post("/lease", {"worker": "w", "wait": 0})[1]["id"] == "c"
    assert again.logged("is incomplete, skipped")
    assert again.logged("recovered 2 tasks")

    store = start("store", DATA_DIR=str(tmp_path))
    assert store.call("PUT", "/results/a", {"state": "done"})[0] == 201
    store.kill()
    assert start("store", DATA_DIR=str(tmp_path)).get("/results/a") == (200, {"state": "done"})


def test_without_data_dir_a_killed_queue_loses_its_tasks(start) -> None:
    queue = start("queue")
    queue.post("/tasks", {"id": "x", "kind": "sleep", "ms": 0})
    queue.kill()
    assert start("queue").get("/tasks/x")[0] == 404
    store = start("store")
    store.call("PUT", "/results/x", {"state": "done"})
    store.kill()
    assert start("store").get("/results/x")[0] == 404


# --------------------------------------------------------------------------- observability


def test_traceparent_reaches_all_four_services(start) -> None:
    p = platform(start)
    trace, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    status, body, _ = p.api.call("POST", "/tasks", {"kind": "sleep", "ms": 10},
                                 headers={"traceparent": f"00-{trace}-{caller}-01"})  # fmt: skip
    assert status == 202
    task_id = body["id"]
    finished(p.api, task_id)

    def spans() -> list[dict]:
        return [r for s in p.all for r in list(s.records) if r["msg"] == "span" and r.get("trace_id") == trace]

    eventually(lambda: {r["service"] for r in spans()} == {"api", "queue", "worker", "store"},
               what="spans of the trace from all four services")  # fmt: skip
    eventually(lambda: any(r["name"] == "task" for r in spans()), what="the worker's task span")
    trace_spans = spans()
    ids = {r["span_id"] for r in trace_spans}
    assert all(r["parent_id"] in ids | {caller} for r in trace_spans)  # one tree...
    roots = [r for r in trace_spans if r["parent_id"] == caller]
    assert [(r["service"], r["name"]) for r in roots] == [("api", "POST /tasks")]  # ... under the caller's span
    names = {(r["service"], r["name"]) for r in trace_spans}
    assert {("api", "call queue POST /tasks"), ("queue", "POST /tasks"), ("worker", "task"),
            ("worker", "call store PUT /results/{id}"), ("store", "PUT /results/{id}"),
            ("worker", "call queue POST /tasks/{id}/done"), ("queue", "POST /tasks/{id}/done")} <= names  # fmt: skip
    for record in trace_spans:
        assert {"ts", "level", "service", "msg", "name", "trace_id", "span_id", "parent_id", "start",
                "duration_ms", "status"} <= set(record) and record["task_id"] == task_id  # fmt: skip
        assert record["status"] == "ok" and record["duration_ms"] >= 0
    executing = p.workers[0].logged("executing", task_id=task_id)
    assert executing and executing[0]["trace_id"] == trace  # the task's own log lines carry the trace too
    for service in p.all:
        assert all({"ts", "level", "service", "msg"} <= set(r) for r in service.records)


def test_metrics_parse(start) -> None:
    p = platform(start, queue={"MAX_ATTEMPTS": "1"})
    finished(p.api, submit(p.api, "sleep", 5))
    finished(p.api, submit(p.api, "fail", 0))
    for service in p.all:
        status, text, headers = service.call("GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse_metrics(text)
        assert samples[f'platform_version_info{{role="{service.role}",version="1.0"}}'] == 1
        assert samples["process_resident_memory_bytes"] > 5 * MIB and samples["platform_ready"] == 1
    api = p.api.metrics()
    assert api['http_requests_total{code="202",route="POST /tasks"}'] == 2
    buckets = [v for k, v in api.items() if k.startswith('http_request_duration_seconds_bucket{code="202",route="POST /tasks",')]
    assert buckets == sorted(buckets) and buckets[-1] == api['http_request_duration_seconds_count{code="202",route="POST /tasks"}'] == 2
    assert api['platform_client_requests_total{outcome="201",target="queue"}'] == 2
    queue = p.queue.metrics()
    assert queue["platform_queue_depth"] == 0 and queue["platform_queue_leased"] == 0
    assert queue["platform_queue_dead_lettered"] == 1 and queue["platform_tasks_done_total"] == 1
    assert queue['http_requests_total{code="201",route="POST /tasks"}'] == 2
    worker = p.workers[0].metrics()
    assert worker["platform_tasks_done_total"] == 1 and worker["platform_tasks_failed_total"] == 1
    assert worker['platform_breaker_state{target="store"}'] == 0 and worker["platform_worker_busy"] == 0
    assert p.store.metrics()["platform_results_stored"] == 1


# --------------------------------------------------------------------------- the worker's lifecycle


def test_sigterm_drains_a_worker(start) -> None:
    store, queue = start("store"), start("queue")
    worker = start("worker", QUEUE_URL=queue.url, STORE_URL=store.url, CONCURRENCY="2")
    held = [submit(queue, "sleep", 3000), submit(queue, "sleep", 3000)]
    eventually(lambda: worker.get("/status")[1]["busy"] == 2, what="the worker to hold both tasks")
    worker.proc.send_signal(signal.SIGTERM)
    eventually(lambda: worker.logged("stopped leasing; finishing 2 tasks in hand"), what="the drain")
    assert worker.get("/readyz")[0] == 503  # out of service while it finishes
    later = submit(queue, "sleep", 0)
    assert worker.wait() == 0
    assert worker.records[-1]["msg"] == "drained, exiting"
    for task_id in held:
        assert store.get(f"/results/{task_id}")[1]["state"] == "done"
        assert queue.get(f"/tasks/{task_id}")[0] == 404  # reported done
    assert queue.get(f"/tasks/{later}")[1]["state"] == "queued"  # not leased by a draining worker


def test_a_queue_shutting_down_sends_waiting_workers_away(start) -> None:
    queue = start("queue", SHUTDOWN_DELAY="0.5")
    answers: list[int] = []
    waiting = threading.Thread(target=lambda: answers.append(queue.post("/lease", {"worker": "w", "wait": 30})[0]))
    waiting.start()
    eventually(lambda: queue.metrics().get("platform_ready") == 1 and waiting.is_alive(), what="a waiting lease")
    queue.proc.send_signal(signal.SIGTERM)
    eventually(lambda: queue.logged("received SIGTERM, draining"), what="the drain")
    assert queue.get("/readyz")[0] == 503  # out of the Service's endpoints, still serving for $SHUTDOWN_DELAY
    assert queue.wait() == 0
    waiting.join(30)
    assert answers == [503]  # told to go away, not held for its 30 s


# --------------------------------------------------------------------------- the releases' defects


@pytest.mark.parametrize("release", ["1.0", "1.1"])
def test_a_worker_killed_mid_task_loses_it_only_on_release_1_1(start, release: str) -> None:
    store, queue = start("store"), start("queue", LEASE_SECONDS="1")
    urls = {"QUEUE_URL": queue.url, "STORE_URL": store.url}
    worker = start("worker", APP_VERSION=release, **urls)
    task_id = submit(queue, "sleep", 3000)
    eventually(lambda: worker.logged("executing", task_id=task_id), what="the worker to start the task")
    worker.kill()
    if release == "1.1":  # acknowledged before it ran: neither the queue nor the store knows it any more
        assert queue.get(f"/tasks/{task_id}")[0] == 404 and store.get(f"/results/{task_id}")[0] == 404
        assert queue.metrics()["platform_tasks_done_total"] == 1 and store.metrics()["platform_results_stored"] == 0
    else:  # its lease runs out and another worker runs it
        start("worker", **urls)
        eventually(lambda: store.get(f"/results/{task_id}")[0] == 200, what="the task run by the second worker")
        assert store.get(f"/results/{task_id}")[1]["attempt"] == 2


@pytest.mark.parametrize("release", ["1.0", "1.2"])
def test_release_1_2_leaks_memory_per_task(start, release: str) -> None:
    store, queue = start("store"), start("queue")
    worker = start("worker", APP_VERSION=release, QUEUE_URL=queue.url, STORE_URL=store.url)

    def run(count: int) -> None:
        before = store.metrics()["platform_results_stored"]
        for _ in range(count):
            submit(queue, "sleep", 0)
        eventually(lambda: store.metrics()["platform_results_stored"] == before + count, what=f"{count} tasks done")

    run(5)  # warm up: imports, threads, buffers
    before = resident_mib(worker.proc.pid)
    run(40)
    grown = resident_mib(worker.proc.pid) - before
    if release == "1.2":
        assert grown >= 30  # ~1 MiB a task, never given back
        assert worker.get("/status")[1]["leaked_mb"] == 45
    else:
        assert grown < 15


@pytest.mark.parametrize("release", ["1.0", "1.3"])
def test_release_1_3_turns_backpressure_into_a_retry_storm(start, release: str) -> None:
    queue = start("queue", QUEUE_LIMIT="1")
    submit(queue)  # full
    api = start("api", APP_VERSION=release, QUEUE_URL=queue.url, STORE_URL=f"http://127.0.0.1:{closed_port()}",
                RETRIES="0", BREAKER_FAILURES="1", BREAKER_RESET_SECONDS="600")  # fmt: skip
    status, body, headers = api.call("POST", "/tasks", {"kind": "sleep", "ms": 0})
    assert status == 429 and headers["Retry-After"] == "1"  # passed on either way...
    refused = queue.metrics()['http_requests_total{code="429",route="POST /tasks"}']
    assert refused == (11 if release == "1.3" else 1)  # ... after 10 instant retries on 1.3
    # A dependency that is down: 1.0 opens its breaker after one failure and stops calling, 1.3 keeps on.
    for _ in range(3):
        assert api.get("/tasks/sometask")[0] == 503
    calls = api.metrics()['platform_client_requests_total{outcome="refused",target="store"}']
    assert calls == (3 * 2 * 11 if release == "1.3" else 1)


@pytest.mark.parametrize("release", ["1.0", "1.4"])
def test_release_1_4_dies_on_a_poison_task(start, release: str) -> None:
    store, queue = start("store"), start("queue", LEASE_SECONDS="0.5", MAX_ATTEMPTS="2")
    urls = {"QUEUE_URL": queue.url, "STORE_URL": store.url, "APP_VERSION": release}
    poison = submit(queue, "fail", 0)
    if release == "1.0":
        worker = start("worker", **urls)
        eventually(lambda: queue.get(f"/tasks/{poison}")[1]["state"] == "dead", what="the task dead-lettered")
        assert worker.proc.poll() is None and queue.get(f"/tasks/{poison}")[1]["attempts"] == 2
        return
    for attempt in (1, 2):  # every worker that leases it dies
        worker = start("worker", **urls)
        assert worker.wait() == 1
        assert worker.logged("unhandled error in the task handler", task_id=poison)
        assert any("Traceback" in line for line in worker.stderr)
        assert queue.get(f"/tasks/{poison}")[1]["attempts"] == attempt
    eventually(lambda: queue.get(f"/tasks/{poison}")[1]["state"] == "dead", what="the lease to run out")
    survivor = start("worker", **urls)  # dead-lettered at last: workers live again
    task_id = submit(queue, "sleep", 0)
    eventually(lambda: store.get(f"/results/{task_id}")[0] == 200, what="a task done by the next worker")
    assert survivor.proc.poll() is None


# --------------------------------------------------------------------------- backpressure and resilience


def test_a_full_queue_answers_429_through_the_api(start) -> None:
    queue = start("queue", QUEUE_LIMIT="2")
    api = start("api", QUEUE_URL=queue.url, STORE_URL=queue.url)
    submit(api), submit(api)
    status, body, headers = api.call("POST", "/tasks", {"kind": "sleep", "ms": 0})
    assert status == 429 and headers["Retry-After"] == "1" and "full" in body["error"]
    assert queue.metrics()['platform_queue_events_total{event="refused"}'] == 1
    nowhere = start("api", QUEUE_URL=f"http://127.0.0.1:{closed_port()}")
    status, body, headers = nowhere.call("POST", "/tasks", {"kind": "sleep", "ms": 0})
    assert status == 503 and headers["Retry-After"] == "1" and "refused" in body["error"]


def _store_calls(worker: Service, outcome: str = "refused") -> float:
    return worker.metrics().get(f'platform_client_requests_total{{outcome="{outcome}",target="store"}}', 0)


def test_a_breaker_stops_calls_to_a_store_that_is_down(start) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    guarded_queue, naive_queue = start("queue", MAX_ATTEMPTS="1"), start("queue", MAX_ATTEMPTS="1")
    for queue in (guarded_queue, naive_queue):
        for _ in range(10):
            submit(queue)
    guarded = start("worker", QUEUE_URL=guarded_queue.url, STORE_URL=down, CONCURRENCY="1",
                    BREAKER_FAILURES="3", BREAKER_RESET_SECONDS="600")  # fmt: skip
    naive = start("worker", QUEUE_URL=naive_queue.url, STORE_URL=down, CONCURRENCY="1")
    eventually(lambda: guarded.metrics()['platform_breaker_state{target="store"}'] == 2, what="the breaker open")
    eventually(lambda: guarded.get("/status")[1]["paused"], what="the worker to stop leasing")
    assert guarded.logged("circuit breaker for store opened for 600s after 3 consecutive failures")
    eventually(lambda: naive_queue.get("/tasks")[1]["dead"] == 10, what="the naive worker to burn every task")
    assert _store_calls(naive) == 10
    # Meanwhile the guarded worker made three calls, and leaves the other tasks in the queue.
    assert _store_calls(guarded) == 3 and guarded.metrics()['platform_breaker_opened_total{target="store"}'] == 1
    counts = guarded_queue.get("/tasks")[1]
    assert counts["dead"] == 3 and counts["queued"] == 7 and counts["leased"] == 0


def test_retries_back_off_with_jitter(start) -> None:
    queue = start("queue", MAX_ATTEMPTS="1")
    worker = start("worker", QUEUE_URL=queue.url, STORE_URL=f"http://127.0.0.1:{closed_port()}",
                   RETRIES="3", BACKOFF_BASE="0.02", BACKOFF_MAX="0.05")  # fmt: skip
    submit(queue), submit(queue)
    eventually(lambda: queue.get("/tasks")[1]["dead"] == 2, what="both tasks given up")
    assert _store_calls(worker) == 2 * 4  # each try, and 3 retries of it
    assert worker.metrics()['platform_client_retries_total{target="store"}'] == 2 * 3
    delays = [(r["attempt"], r["backoff_ms"]) for r in worker.logged("retrying store")]
    assert sorted(attempt for attempt, _ in delays) == [1, 1, 2, 2, 3, 3]
    assert all(0 <= ms <= min(50, 20 * 2 ** (attempt - 1)) for attempt, ms in delays)  # under the exponential cap
    assert len({ms for _, ms in delays}) > 1  # jittered, not in lockstep


def test_a_timeout_frees_a_worker_from_a_hung_store(start) -> None:
    hung = socket.socket()  # accepts connections (the kernel does) but never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        store = f"http://127.0.0.1:{hung.getsockname()[1]}"
        timed_queue, naive_queue = start("queue", MAX_ATTEMPTS="1"), start("queue", MAX_ATTEMPTS="1")
        timed = start("worker", QUEUE_URL=timed_queue.url, STORE_URL=store, TIMEOUT_SECONDS="0.3")
        naive = start("worker", QUEUE_URL=naive_queue.url, STORE_URL=store)
        submit(timed_queue), submit(naive_queue)
        eventually(lambda: timed_queue.get("/tasks")[1]["dead"] == 1, what="the timed-out task given up")
        assert _store_calls(timed, "timeout") == 1
        # The naive worker is still waiting for its answer, holding its task.
        eventually(lambda: naive.get("/status")[1]["busy"] == 1, what="the naive worker to hold its task")
        assert naive_queue.get("/tasks")[1]["leased"] == 1 and _store_calls(naive, "timeout") == 0
    finally:
        hung.close()


# --------------------------------------------------------------------------- the load generator's task mode


def test_loadgen_task_mode(start) -> None:
    p = platform(start, workers=2, queue={"MAX_ATTEMPTS": "1"})
    result = loadgen.run_tasks(p.api.url, rate=20, duration=1.0, kind="sleep", ms=20, deadline=60)
    assert 15 <= result.submitted <= 21 and result.accepted == result.submitted and result.errors == {}
    assert result.completed == result.accepted and result.failed == result.lost == 0
    assert 0 < result.submit_percentile(50) <= result.submit_percentile(90) <= result.submit_percentile(99)
    assert result.submit_percentile(50) <= result.completion_percentile(50) <= result.completion_percentile(99)
    shown = result.as_dict()
    assert set(shown) >= {"submitted", "accepted", "errors", "completed", "failed", "lost", "submit_ms", "completion_ms"}
    assert set(shown["completion_ms"]) == {"p50", "p90", "p99", "max"}

    failing = loadgen.run_tasks(p.api.url, rate=20, duration=0.5, kind="fail", ms=0, deadline=60)
    assert failing.failed == failing.accepted > 0 and failing.completed == failing.lost == 0

    run = subprocess.run([sys.executable, "-m", "labkit.apps.loadgen", p.api.url, "--tasks", "--rate", "10",
                          "--duration", "0.5", "--ms", "0", "--json"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["completed"] == summary["accepted"] > 0 and summary["lost"] == 0


def test_loadgen_counts_refusals_and_lost_tasks(start) -> None:
    queue = start("queue", QUEUE_LIMIT="3")  # and no workers: nothing ever finishes
    api = start("api", QUEUE_URL=queue.url, STORE_URL=f"http://127.0.0.1:{closed_port()}")
    result = loadgen.run_tasks(api.url, rate=20, duration=0.5, deadline=0.5)
    assert result.accepted == 3 and result.errors == {"429": result.submitted - 3}
    assert result.lost == 3 and result.unknown == 0 and result.completed == 0  # never finished, still queued
    refused = loadgen.run_tasks(f"http://127.0.0.1:{closed_port()}", rate=20, duration=0.3, deadline=0)
    assert refused.errors == {"refused": refused.submitted} and refused.accepted == 0


# --------------------------------------------------------------------------- image and manifests


@pytest.mark.parametrize("reference", ["labkit/platform:1.0", "ghcr.io/labkit/platform:1.3",
                                       "registry.example.com/course/labkit/platform:1.4", "labkit/platform"])  # fmt: skip
def test_platform_image_under_any_registry(reference: str) -> None:
    image = images.resolve(reference)
    assert image is not None
    assert image.argv(None, ["worker"]) == ["python3", "-m", "labkit.apps.platform", "worker"]
    release = reference.rpartition(":")[2] if ":" in reference.rpartition("/")[2] else "1.0"
    assert dict(image.env)["APP_VERSION"] == release and image.image_id == f"labkit.local/labkit/platform@{release}"


@pytest.mark.parametrize("reference", ["labkit/platform:2.0", "labkit/platform:3.0", "labkit/platform:1.5",
                                       "labkit/web:1.1", "labkit/loadgen:1.4", "labkit/platforms:1.0"])  # fmt: skip
def test_each_app_exists_only_at_its_own_releases(reference: str) -> None:
    assert images.resolve(reference) is None


def test_web_and_loadgen_keep_their_releases() -> None:
    for app in ("web", "loadgen"):
        for release in ("1.0", "2.0", "3.0"):
            assert dict(images.resolve(f"labkit/{app}:{release}").env)["APP_VERSION"] == release
    assert set(labkit.apps.PLATFORM_RELEASES) == set(RELEASES)


def test_platform_image_runs_outside_the_virtualenv() -> None:
    image = images.resolve("labkit/platform:1.2")
    env = dict(image.env)
    run = subprocess.run([images.executable("python3"), "-S", *image.entrypoint[1:], "--help"], cwd="/",
                         env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=20)  # fmt: skip
    assert run.returncode == 0 and "usage: python3 -m labkit.apps.platform" in run.stdout, run.stderr
    bad = subprocess.run([sys.executable, "-m", "labkit.apps.platform", "scheduler"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such role 'scheduler'" in bad.stderr
    misconfigured = subprocess.run([sys.executable, "-m", "labkit.apps.platform", "queue"], capture_output=True,
                                   text=True, env={**os.environ, "LEASE_SECONDS": "soon"})  # fmt: skip
    assert misconfigured.returncode == 1 and "$LEASE_SECONDS must be a number" in misconfigured.stderr


def test_the_manifests_ship_with_labkit_and_use_only_known_settings() -> None:
    documents = list(yaml.safe_load_all(labkit.apps.manifest("platform")))
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in documents)
    assert kinds == [("ConfigMap", "platform"), ("Deployment", "api"), ("Deployment", "queue"),
                     ("Deployment", "store"), ("Deployment", "worker"), ("Service", "api"), ("Service", "queue"),
                     ("Service", "store")]  # fmt: skip
    settings = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    documented = labkit.apps.platform.__doc__
    assert all(f"``{key}``" in documented for key in settings)
    assert Settings.from_env("api", settings).queue_url == "http://queue:8080"  # every value is valid
    for deployment in (d for d in documents if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "labkit/platform:1.0" and container["args"] == [deployment["metadata"]["name"]]
        assert {"readinessProbe", "livenessProbe"} <= set(container) and container["resources"]["requests"]
        assert "namespace" not in deployment["metadata"]
    replicas = {d["metadata"]["name"]: d["spec"]["replicas"] for d in documents if d["kind"] == "Deployment"}
    assert replicas["queue"] == replicas["store"] == 1 and replicas["worker"] >= 2
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as pyproject:
        data = tomllib.load(pyproject)["tool"]["setuptools"]["package-data"]
    assert "manifests/*.yaml" in data["labkit.apps"]


# --------------------------------------------------------------------------- in the sandbox

cluster = module_cluster("platform", nodes=2)


def _worker_pods(cluster: Sandbox, ns: str) -> list[str]:
    pods = kubectl_json(cluster, "-n", ns, "get", "pods", "-l", "app=platform,role=worker")["items"]
    return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]


def test_the_platform_in_the_sandbox_loses_nothing_when_a_worker_goes(cluster: Sandbox, ns: str) -> None:
    manifest = Path(labkit.apps.__file__).parent / "manifests" / "platform.yaml"
    kubectl(cluster, "-n", ns, "apply", "-f", str(manifest))
    for name in ("store", "queue", "api", "worker"):
        kubectl(cluster, "-n", ns, "rollout", "status", f"deployment/{name}", "--timeout=240s")
    url = cluster.service_url(ns, "api")
    eventually(lambda: loadgen._Api(url, 5).state("probe") == "unknown", timeout=60, what="the api to answer")

    result = loadgen.run_tasks(url, rate=10, duration=5, kind="sleep", ms=200, timeout=15, deadline=180)
    assert result.submitted >= 45 and result.errors == {}, result.as_dict()
    assert result.completed == result.accepted and result.lost == result.failed == 0, result.as_dict()

    # Under load, a worker pod is deleted: it finishes what it holds and goes; nothing is lost.
    outcome: list[loadgen.TaskResult] = []
    load = threading.Thread(target=lambda: outcome.append(
        loadgen.run_tasks(url, rate=5, duration=12, kind="sleep", ms=1000, timeout=15, deadline=180)))
    load.start()
    queue = cluster.service_url(ns, "queue")
    eventually(lambda: json.loads(urllib.request.urlopen(f"{queue}/tasks", timeout=10).read())["leased"] >= 2,
               timeout=60, what="tasks in the workers' hands")  # fmt: skip
    victim = _worker_pods(cluster, ns)[0]
    kubectl(cluster, "-n", ns, "delete", "pod", victim, "--wait=false")
    eventually(lambda: victim not in _worker_pods(cluster, ns) and len(_worker_pods(cluster, ns)) == 3,
               timeout=120, what="the worker replaced")  # fmt: skip
    load.join(300)
    (during,) = outcome
    assert during.submitted >= 50 and during.errors == {}, during.as_dict()
    assert during.completed == during.accepted and during.lost == during.failed == 0, during.as_dict()
    metrics = parse_metrics(urllib.request.urlopen(f"{queue}/metrics", timeout=10).read().decode())
    assert metrics.get('platform_queue_events_total{event="expired"}', 0) == 0  # drained, not killed mid-task
