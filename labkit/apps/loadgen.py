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

Standard library only, like the web app.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

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
        if not self.latencies_ms:
            return 0.0
        rank = max(1, math.ceil(q / 100 * len(self.latencies_ms)))
        return self.latencies_ms[rank - 1]

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


class _Target:
    """Where the requests go; one new connection a request, as many clients of a Service are."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"loadgen needs an http:// or https:// URL, got {url!r}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m labkit.apps.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="what to request, e.g. http://web/work?ms=20")
    parser.add_argument("--rate", type=float, help="requests per second in all (default: as fast as possible)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to run (default 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a request may take (default 5)")
    parser.add_argument("--interval", type=float, nargs="?", const=1.0,
                        help="print the figures every this many seconds too (default when given: 1)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        result = run(args.url, rate=args.rate, duration=args.duration, concurrency=args.concurrency,
                     timeout=args.timeout, interval=args.interval, report=lambda line: print(line, flush=True))  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(result.as_dict()) if args.json else result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
