"""Calls from one service to another, with the resilience patterns the labs switch on one at a time.

Off by default, so the platform starts naive and a lab shows what each setting buys:

* ``TIMEOUT_SECONDS``: how long a call may take (unset: as long as the other side takes, so a hung
  dependency hangs the caller with it);
* ``RETRIES`` with exponential back-off and full jitter: the n-th retry waits a random time between 0
  and ``min(BACKOFF_MAX, BACKOFF_BASE * 2**(n-1))`` seconds, so callers that failed together do not
  retry together (retried: refused, reset and timed-out calls and 5xx answers, never a 4xx);
* a circuit breaker (``BREAKER_FAILURES`` consecutive failures open it for ``BREAKER_RESET_SECONDS``;
  while open, calls fail at once without reaching the network; then one trial call decides whether it
  closes or opens again), one per target.

Release 1.3 ignores all of it and retries every failure at once, ten times, 429 included: a retry storm.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from labkit.apps.platform.settings import STORM_RETRIES, Settings
from labkit.apps.platform.telemetry import Metrics, log, span

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}


class CallError(Exception):
    """A call that got no HTTP answer: ``kind`` is timeout, refused, reset, unreachable or breaker-open."""

    def __init__(self, target: str, kind: str, detail: str = "") -> None:
        super().__init__(f"{target}: {kind}" + (f" ({detail})" if detail else ""))
        self.target = target
        self.kind = kind


@dataclass
class Reply:
    status: int
    body: Any  # the JSON answer, or its text
    headers: dict[str, str] = field(default_factory=dict)


class Breaker:
    """Closed, open for ``reset`` seconds after ``failures`` consecutive failures, then half-open for one trial."""

    def __init__(self, target: str, failures: int, reset: float, metrics: Metrics) -> None:
        self.target = target
        self.failures = failures  # 0: never opens
        self.reset = reset
        self.metrics = metrics
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at = 0.0
        self._state = CLOSED
        self._trial = False  # a half-open trial call is under way

    @property
    def state(self) -> int:
        with self._lock:
            return self._current()

    def _current(self) -> int:
        if self._state == OPEN and time.monotonic() - self._opened_at >= self.reset:
            self._state, self._trial = HALF_OPEN, False
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 unless open)."""
        with self._lock:
            if self._current() != OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.reset - time.monotonic())

    def allow(self) -> bool:
        if not self.failures:
            return True
        with self._lock:
            state = self._current()
            if state == CLOSED:
                return True
            if state == HALF_OPEN and not self._trial:
                self._trial = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            if self._state != CLOSED:
                log("info", f"circuit breaker for {self.target} closed: a trial call succeeded", target=self.target)
            self._consecutive, self._state, self._trial = 0, CLOSED, False

    def failure(self) -> None:
        if not self.failures:
            return
        with self._lock:
            self._consecutive += 1
            state = self._current()
            if state == HALF_OPEN or (state == CLOSED and self._consecutive >= self.failures):
                self._state, self._opened_at, self._trial = OPEN, time.monotonic(), False
                self.metrics.inc("platform_breaker_opened_total", target=self.target)
                log("warning", f"circuit breaker for {self.target} opened for {self.reset:g}s after "
                               f"{self._consecutive} consecutive failures", target=self.target)  # fmt: skip


class Client:
    """Calls to one target (``queue``, ``store``) at ``base_url``, under the settings' resilience policy."""

    def __init__(self, target: str, base_url: str, settings: Settings, metrics: Metrics) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"platform: the {target}'s URL must be http://HOST[:PORT], got {base_url!r}")
        self.target = target
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.settings = settings
        self.metrics = metrics
        self.storm = settings.release.retry_storm
        self.breaker = Breaker(target, 0 if self.storm else settings.breaker_failures, settings.breaker_reset, metrics)

    def call(self, method: str, path: str, body: object = None, *, route: str = "", extra_timeout: float = 0.0,
             retry: bool = True) -> Reply:  # fmt: skip
        """One call, retried as the policy says. Returns the last answer, whatever its status;
        raises CallError when none came (or the breaker is open). ``route`` names the call in spans and
        logs (``PUT /results/{id}``); ``extra_timeout`` is added to the timeout (a long poll's wait)."""
        s = self.settings
        retries = (STORM_RETRIES if self.storm else s.retries) if retry else 0
        timeout = None if self.storm or s.timeout is None else s.timeout + extra_timeout
        attempt = 0
        while True:
            if not self.breaker.allow():
                self.metrics.inc("platform_client_requests_total", target=self.target, outcome="breaker-open")
                raise CallError(self.target, "breaker-open", f"retry in {self.breaker.retry_in():.1f}s")
            failure: CallError | None = None
            try:
                reply = self._once(method, path, body, timeout, route or f"{method} {path}", attempt)
            except CallError as exc:
                failure, reply = exc, None
                self.breaker.failure()
            else:
                if reply.status >= 500:
                    self.breaker.failure()
                else:
                    self.breaker.success()
                    if not (self.storm and reply.status == 429):
                        return reply
            if attempt >= retries:
                if failure is not None:
                    raise failure
                return reply  # type: ignore[return-value]
            attempt += 1
            delay = 0.0 if self.storm else self.backoff(attempt)
            self.metrics.inc("platform_client_retries_total", target=self.target)
            log("info", f"retrying {self.target} {route or path} ({attempt}/{retries}) in {delay * 1000:.0f}ms",
                target=self.target, attempt=attempt, backoff_ms=round(delay * 1000, 1),
                reason=failure.kind if failure else str(reply.status if reply else ""))  # fmt: skip
            if delay:
                time.sleep(delay)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform between 0 and the exponential cap for retry number ``attempt`` (1, 2, ...)."""
        s = self.settings
        cap = min(s.backoff_max, s.backoff_base * 2 ** (attempt - 1))
        return random.uniform(0, cap)

    def _once(self, method: str, path: str, body: object, timeout: float | None, route: str, attempt: int) -> Reply:
        started = time.perf_counter()
        with span(f"call {self.target} {route}", target=self.target, attempt=attempt) as current:
            headers = {"traceparent": current.traceparent, "User-Agent": f"labkit-platform/{self.settings.role}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            try:
                connection.request(method, self.prefix + path, body=data, headers=headers)
                answer = connection.getresponse()
                raw = answer.read()
                reply = Reply(answer.status, _decode(raw, answer.getheader("Content-Type", "")),
                              {k.lower(): v for k, v in answer.getheaders()})  # fmt: skip
            except (OSError, http.client.HTTPException) as exc:
                kind = _kind(exc)
                current.status = "error"
                current.fields.update(outcome=kind, error=f"{type(exc).__name__}: {exc}")
                self.metrics.inc("platform_client_requests_total", target=self.target, outcome=kind)
                raise CallError(self.target, kind, str(exc)) from None
            finally:
                connection.close()
                self.metrics.observe("platform_client_request_duration_seconds", time.perf_counter() - started,
                                     target=self.target)  # fmt: skip
            current.fields["code"] = reply.status
            if reply.status == 204:  # an empty long poll: nothing happened worth a record
                current.fields["quiet"] = True
            if reply.status >= 500:
                current.status = "error"
            self.metrics.inc("platform_client_requests_total", target=self.target, outcome=str(reply.status))
            return reply


def _decode(raw: bytes, content_type: str) -> Any:
    if "json" in content_type:
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw.decode(errors="replace")


def _kind(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                        http.client.IncompleteRead)):  # fmt: skip
        return "reset"
    return "unreachable"  # no route, a name that does not resolve, ...

