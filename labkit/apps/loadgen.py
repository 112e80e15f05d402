"""loadgen: send HTTP requests at a service and report how fast it answered.

As a command (in a pod, or on this machine)::

    python3 -m labkit.apps.loadgen http://web/ --rate 50 --duration 30 --concurrency 8 --interval

As a function, for notebooks and benchmarks::

    from labkit.apps.loadgen import run
    result = run("http://127.0.0.1:8080/work?ms=20", rate=50, duration=10)
    result.p99_ms, result.errors, result.as_dict()

Without ``--rate`` each of the ``--concurrency`` workers sends its next request
as soon as the last one is answered (a closed loop: it finds the most the
service serves). With ``--rate`` requests are due at fixed times and each
latency is counted from when its request was *due*, so a service that falls
behind shows it in the percentiles instead of silently slowing the load
(the "coordinated omission" a closed loop suffers from).

Task mode drives the training platform (``labkit.apps.platform``) instead::

    python3 -m labkit.apps.loadgen http://api/ --tasks --rate 10 --duration 30 --kind sleep --ms 200

    from labkit.apps.loadgen import run_tasks
    result = run_tasks("http://127.0.0.1:8080", rate=10, duration=5, kind="cpu", ms=50)
    result.completed, result.lost, result.as_dict()

It submits tasks (``POST /tasks``) at a fixed rate for the duration, open loop
as above, then follows each accepted task (``GET /tasks/ID``) until it is done,
dead-lettered or the deadline passes. It reports the submissions' latency, the
end-to-end completion latency (from when a submission was due to when a poll
first saw its task done, so to within the poll interval), submission errors by
kind (an HTTP code such as 429 or 503, ``timeout``, ``refused``, ``reset``),
and how many tasks were completed, failed (dead-lettered) and lost: never
finished by the deadline, of which ``unknown`` are those the platform no
longer knew at all.

Standard library only, like the web app.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0-100) of sorted values; 0 when there are none."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Result:
    """The figures of one run. Latencies count every answered or failed request."""

    url: str
    seconds: float
    latencies_ms: list[float] = field(repr=False)  # sorted
    outcomes: dict[str, int]  # "200": 950, "503": 40, "ConnectionRefusedError": 10

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def errors(self) -> int:
        """Requests that failed or were answered with a 4xx or 5xx status."""
        return sum(count for outcome, count in self.outcomes.items() if not _succeeded(outcome))

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The nearest-rank percentile ``q`` (0-100) of the latencies in ms; 0 when nothing finished."""
        return percentile(self.latencies_ms, q)

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)

    @property
    def max_ms(self) -> float:
        return self.latencies_ms[-1] if self.latencies_ms else 0.0

    def as_dict(self) -> dict:
        return {"url": self.url, "requests": self.requests, "errors": self.errors,
                "seconds": round(self.seconds, 3), "rps": round(self.rps, 1),
                "p50_ms": round(self.p50_ms, 2), "p90_ms": round(self.p90_ms, 2),
                "p99_ms": round(self.p99_ms, 2), "max_ms": round(self.max_ms, 2),
                "outcomes": dict(self.outcomes)}  # fmt: skip

    def summary(self) -> str:
        outcomes = " ".join(f"{name}={count}" for name, count in sorted(self.outcomes.items())) or "none"
        return (f"{self.url}: {self.requests} requests in {self.seconds:.1f}s ({self.rps:.1f}/s), "
                f"{self.errors} errors\n"
                f"latency ms: p50 {self.p50_ms:.1f}  p90 {self.p90_ms:.1f}  p99 {self.p99_ms:.1f}  "
                f"max {self.max_ms:.1f}\n"
                f"outcomes: {outcomes}")  # fmt: skip


def _succeeded(outcome: str) -> bool:
    return outcome.isdigit() and int(outcome) < 400


def figures(url: str, seconds: float, samples: list[tuple[float, str]]) -> Result:
    """A Result from (latency in seconds, outcome) samples."""
    outcomes: dict[str, int] = {}
    for _, outcome in samples:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return Result(url, seconds, sorted(latency * 1000 for latency, _ in samples), outcomes)


def _split(url: str):  # noqa: ANN202 - urllib's SplitResult
    """``url``'s parts; ValueError unless it is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"loadgen needs an http:// or https:// URL, got {url!r}")
    return parts


class _Target:
    """Where the requests go; one new connection a request, as many clients of a Service are."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = _split(url)
        self.connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.host, self.port = parts.hostname, parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout

    def fetch(self) -> str:
        connection = self.connection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("GET", self.path, headers={"User-Agent": "labkit-loadgen"})
            response = connection.getresponse()
            response.read()
            return str(response.status)
        except (OSError, http.client.HTTPException) as exc:
            return type(exc).__name__
        finally:
            connection.close()


class _Run:
    """Hands out the times requests are due and collects what each one did."""

    def __init__(self, target: _Target, rate: float | None, duration: float) -> None:
        self.target = target
        self.rate = rate
        self.start = time.monotonic()
        self.end = self.start + duration
        self.samples: list[tuple[float, str]] = []  # (latency s, outcome), in the order they finished
        self._lock = threading.Lock()
        self._issued = 0

    def _next_due(self) -> float | None:
        """When the next request is due; None once the run is over (a slow service gets fewer requests)."""
        now = time.monotonic()
        with self._lock:
            due = self.start + self._issued / self.rate if self.rate else now
            self._issued += 1
        return due if max(due, now) < self.end else None

    def worker(self) -> None:
        while (due := self._next_due()) is not None:
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            outcome = self.target.fetch()
            latency = time.monotonic() - due
            with self._lock:
                self.samples.append((latency, outcome))

    def since(self, index: int) -> list[tuple[float, str]]:
        with self._lock:
            return self.samples[index:]


def run(
    url: str,
    *,
    rate: float | None = None,
    duration: float = 10.0,
    concurrency: int = 4,
    timeout: float = 5.0,
    interval: float | None = None,
    report: Callable[[str], None] = print,
) -> Result:
    """Load ``url`` for ``duration`` seconds and return the figures.

    ``rate``: requests per second in all (None: as fast as ``concurrency`` workers
    go). ``interval``: also ``report`` a line of figures every that many seconds.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"the rate must be above 0 requests per second, got {rate}")
    if duration <= 0 or concurrency < 1:
        raise ValueError(f"need a duration above 0 and at least 1 worker, got {duration}s and {concurrency}")
    job = _Run(_Target(url, timeout), rate, duration)
    workers = [threading.Thread(target=job.worker, name=f"loadgen-{i}", daemon=True) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    if interval:
        _report_every(interval, job, workers, report)
    for worker in workers:
        worker.join()
    return figures(url, time.monotonic() - job.start, job.samples)


def _report_every(interval: float, job: _Run, workers: list[threading.Thread], report: Callable[[str], None]) -> None:
    """A line per interval with that interval's own figures, until the workers finish."""
    seen, last = 0, job.start
    while any(worker.is_alive() for worker in workers):
        for worker in workers:  # until the interval is up, or sooner if the run ends
            worker.join(max(0.0, last + interval - time.monotonic()))
        now = time.monotonic()
        if now - last < interval / 4:  # the run's last stragglers: the summary that follows has them
            break
        window = figures("", now - last, job.since(seen))
        seen, last = seen + window.requests, now
        report(f"{now - job.start:6.1f}s  {window.requests:6d} requests  {window.rps:8.1f}/s  "
               f"{window.errors:5d} errors  p50 {window.p50_ms:7.1f} ms  p99 {window.p99_ms:7.1f} ms")  # fmt: skip


# --------------------------------------------------------------------------- task mode (the platform)

@dataclass
class TaskResult:
    """The figures of one task run: its submissions, and what became of the tasks accepted."""

    url: str
    seconds: float  # the submission phase
    elapsed: float  # until the last task finished, or the deadline
    submit_latencies_ms: list[float] = field(repr=False)  # sorted; counted from when each submission was due
    completion_ms: list[float] = field(repr=False)  # sorted; due to seen done, completed tasks only
    outcomes: dict[str, int]  # submissions: "202": 48, "429": 2, "timeout": 0, "refused": 0
    completed: int
    failed: int  # dead-lettered: the platform gave up on them
    lost: int  # accepted, yet not finished by the deadline
    unknown: int  # of the lost, those the platform no longer knew at all (404)

    @property
    def submitted(self) -> int:
        return len(self.submit_latencies_ms)

    @property
    def accepted(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if _succeeded(outcome))

    @property
    def errors(self) -> dict[str, int]:
        """Refused or failed submissions, by kind: an HTTP code, timeout, refused, reset, ..."""
        return {outcome: count for outcome, count in sorted(self.outcomes.items()) if not _succeeded(outcome)}

    def submit_percentile(self, q: float) -> float:
        return percentile(self.submit_latencies_ms, q)

    def completion_percentile(self, q: float) -> float:
        return percentile(self.completion_ms, q)

    def as_dict(self) -> dict:
        return {"url": self.url, "submitted": self.submitted, "accepted": self.accepted, "errors": self.errors,
                "completed": self.completed, "failed": self.failed, "lost": self.lost, "unknown": self.unknown,
                "seconds": round(self.seconds, 3), "elapsed": round(self.elapsed, 3),
                "submit_ms": {f"p{q}": round(self.submit_percentile(q), 2) for q in (50, 90, 99)},
                "completion_ms": {**{f"p{q}": round(self.completion_percentile(q), 2) for q in (50, 90, 99)},
                                  "max": round(self.completion_ms[-1], 2) if self.completion_ms else 0.0}}  # fmt: skip

    def summary(self) -> str:
        errors = " ".join(f"{kind}={count}" for kind, count in self.errors.items()) or "none"
        c = [self.completion_percentile(q) for q in (50, 90, 99)]
        return (f"{self.url}: {self.submitted} tasks submitted in {self.seconds:.1f}s, {self.accepted} accepted; "
                f"errors: {errors}\n"
                f"submit latency ms: p50 {self.submit_percentile(50):.1f}  p90 {self.submit_percentile(90):.1f}  "
                f"p99 {self.submit_percentile(99):.1f}\n"
                f"completion latency ms: p50 {c[0]:.1f}  p90 {c[1]:.1f}  p99 {c[2]:.1f}\n"
                f"completed {self.completed}, failed {self.failed}, lost {self.lost} "
                f"({self.unknown} unknown to the platform, {self.lost - self.unknown} unfinished)")  # fmt: skip


def _kind(exc: BaseException) -> str:
    """An error's kind as an operator names it."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    return type(exc).__name__


class _Api:
    """The platform's api: submit a task, ask after one."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = _split(url)
        self.connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.host, self.port = parts.hostname, parts.port
        self.base = parts.path.rstrip("/").removesuffix("/tasks")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        connection = self.connection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"User-Agent": "labkit-loadgen"}
            data = None
            if body is not None:
                data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
            connection.request(method, self.base + path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            try:
                answer = json.loads(raw) if raw else {}
            except ValueError:
                answer = {}
            return response.status, answer if isinstance(answer, dict) else {}
        finally:
            connection.close()

    def submit(self, body: dict) -> tuple[str, str | None]:
        """(outcome, task id if accepted)."""
        try:
            status, answer = self._request("POST", "/tasks", body)
        except (OSError, http.client.HTTPException) as exc:
            return _kind(exc), None
        task_id = answer.get("id") if 200 <= status < 300 else None
        return str(status), task_id if isinstance(task_id, str) else None

    def state(self, task_id: str) -> str:
        """done, dead, queued, leased; unknown (404); else the error's kind."""
        try:
            status, answer = self._request("GET", f"/tasks/{task_id}")
        except (OSError, http.client.HTTPException) as exc:
            return _kind(exc)
        if status == 404:
            return "unknown"
        return str(answer.get("state", status)) if status == 200 else str(status)


class _TaskRun(_Run):
    """Submissions due at fixed times, as in rate mode, and pollers that follow each accepted task."""

    def __init__(self, api: _Api, rate: float, duration: float, body: dict, deadline: float, poll: float) -> None:
        super().__init__(api, rate, duration)  # type: ignore[arg-type]
        self.api = api
        self.body = body
        self.poll = poll
        self.poll_end = self.end + deadline
        self.submitting_done = threading.Event()
        self.pending: dict[str, float] = {}  # task id: when its submission was due
        self.last_state: dict[str, str] = {}
        self.completion: list[float] = []  # seconds
        self.failed = 0
        self.finished_at = self.start
        self._due_polls: queue.PriorityQueue[tuple[float, str]] = queue.PriorityQueue()

    def worker(self) -> None:
        while (due := self._next_due()) is not None:
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            outcome, task_id = self.api.submit(self.body)
            now = time.monotonic()
            with self._lock:
                self.samples.append((now - due, outcome))
                if task_id is not None:
                    self.pending[task_id] = due
            if task_id is not None:
                self._due_polls.put((now + self.poll, task_id))

    def poller(self) -> None:
        while time.monotonic() < self.poll_end:
            with self._lock:
                if self.submitting_done.is_set() and not self.pending:
                    return
            try:
                not_before, task_id = self._due_polls.get(timeout=0.1)
            except queue.Empty:
                continue
            wait = min(not_before, self.poll_end) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            state = self.api.state(task_id)
            now = time.monotonic()
            with self._lock:
                if state == "done":
                    self.completion.append(now - self.pending.pop(task_id))
                    self.finished_at = now
                elif state == "dead":
                    self.pending.pop(task_id)
                    self.failed += 1
                    self.finished_at = now
                else:  # still on its way, or the platform cannot say just now: ask again
                    self.last_state[task_id] = state
                    self._due_polls.put((now + self.poll, task_id))

    def counts(self) -> tuple[int, int, int, int]:
        """(submitted, accepted, completed, failed) so far."""
        with self._lock:
            accepted = sum(1 for _, outcome in self.samples if _succeeded(outcome))
            return len(self.samples), accepted, len(self.completion), self.failed


def run_tasks(
    url: str,
    *,
    rate: float = 10.0,
    duration: float = 10.0,
    kind: str = "sleep",
    ms: int = 100,
    payload: dict | None = None,
    concurrency: int = 8,
    pollers: int = 4,
    timeout: float = 5.0,
    deadline: float = 60.0,
    poll: float = 0.2,
    interval: float | None = None,
    report: Callable[[str], None] = print,
) -> TaskResult:
    """Submit ``kind`` tasks of ``ms`` to the platform's api at ``url`` for ``duration`` seconds at ``rate`` a
    second, follow them until each finishes or ``deadline`` seconds after the submissions end, and return
    the figures. ``payload``: more fields for each task (``{"failures": 1}``); ``interval``: also
    ``report`` a line of progress every that many seconds."""
    if rate <= 0 or duration <= 0 or concurrency < 1 or pollers < 1 or deadline < 0 or poll <= 0:
        raise ValueError(f"need a rate, a duration and a poll interval above 0, a deadline of 0 or more and at "
                         f"least 1 worker and poller, got rate {rate}, {duration}s, poll {poll}s, deadline "
                         f"{deadline}s, {concurrency} workers and {pollers} pollers")  # fmt: skip
    job = _TaskRun(_Api(url, timeout), rate, duration, {**(payload or {}), "kind": kind, "ms": ms}, deadline, poll)
    submitters = [threading.Thread(target=job.worker, name=f"loadgen-{i}", daemon=True) for i in range(concurrency)]
    followers = [threading.Thread(target=job.poller, name=f"loadgen-poll-{i}", daemon=True) for i in range(pollers)]
    for thread in (*submitters, *followers):
        thread.start()
    reporter = None
    if interval:
        reporter = threading.Thread(target=_report_tasks_every, args=(interval, job, followers, report), daemon=True)
        reporter.start()
    for thread in submitters:
        thread.join()
    submitted_for = time.monotonic() - job.start
    job.submitting_done.set()
    for thread in followers:
        thread.join()
    if reporter is not None:
        reporter.join()
    with job._lock:
        unknown = sum(1 for task_id in job.pending if job.last_state.get(task_id) == "unknown")
        elapsed = (time.monotonic() if job.pending else job.finished_at) - job.start
        return TaskResult(url, submitted_for, elapsed, sorted(latency * 1000 for latency, _ in job.samples),
                          sorted(seconds * 1000 for seconds in job.completion),
                          dict(figures(url, 0, job.samples).outcomes), len(job.completion), job.failed,
                          len(job.pending), unknown)  # fmt: skip


def _report_tasks_every(interval: float, job: _TaskRun, followers: list[threading.Thread],
                        report: Callable[[str], None]) -> None:  # fmt: skip
    """A line per interval with the run's counts so far, until the pollers finish."""
    next_at = job.start + interval
    while any(thread.is_alive() for thread in followers):
        time.sleep(max(0.0, min(next_at - time.monotonic(), 0.1)))
        if time.monotonic() < next_at:
            continue
        submitted, accepted, completed, failed = job.counts()
        report(f"{next_at - job.start:6.1f}s  {submitted:6d} submitted  {accepted:6d} accepted  "
               f"{completed:6d} completed  {failed:5d} failed  {accepted - completed - failed:6d} pending")  # fmt: skip
        next_at += interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m labkit.apps.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="what to request, e.g. http://web/work?ms=20 (--tasks: the api, http://api/)")
    parser.add_argument("--rate", type=float, help="requests per second in all (default: as fast as possible; "
                                                   "--tasks: 10)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to run (default 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take (default 5)")
    parser.add_argument("--interval", type=float, nargs="?", const=1.0,
                        help="print the figures every this many seconds too (default when given: 1)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    tasks = parser.add_argument_group("task mode", "submit tasks to the platform's api and follow them")
    tasks.add_argument("--tasks", action="store_true", help="submit tasks to the api at URL instead of GETs")
    tasks.add_argument("--kind", default="sleep", choices=("sleep", "cpu", "fail"), help="the tasks' kind")
    tasks.add_argument("--ms", type=int, default=100, help="each task's milliseconds (default 100)")
    tasks.add_argument("--deadline", type=float, default=60.0,
                       help="seconds after the last submission to wait for tasks to finish (default 60)")  # fmt: skip
    tasks.add_argument("--poll", type=float, default=0.2, help="seconds between looks at a task (default 0.2)")
    args = parser.parse_args(argv)
    report = lambda line: print(line, flush=True)  # noqa: E731
    try:
        if args.tasks:
            result = run_tasks(args.url, rate=args.rate or 10.0, duration=args.duration, kind=args.kind, ms=args.ms,
                               concurrency=args.concurrency, timeout=args.timeout, deadline=args.deadline,
                               poll=args.poll, interval=args.interval, report=report)  # fmt: skip
        else:
            result = run(args.url, rate=args.rate, duration=args.duration, concurrency=args.concurrency,
                         timeout=args.timeout, interval=args.interval, report=report)  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(result.as_dict()) if args.json else result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
