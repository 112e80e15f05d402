"""What every role serves: routing JSON requests, /healthz, /readyz, /metrics, /version, and a graceful drain.

Each request is a span (continuing the caller's ``traceparent``), a count and a
latency observation by route and status code. Routes are labelled by pattern
(``GET /tasks/{id}``), never by the id itself, so the metrics stay a bounded set
of series however many tasks pass.
"""

from __future__ import annotations

import errno
import functools
import json
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from labkit.apps.platform.settings import Settings
from labkit.apps.platform.telemetry import Gauge, Metrics, log, span
from labkit.apps.web import InFlight, IPv4Server, Server, resident_memory

DRAIN_TIMEOUT = 5.0  # how long in-flight requests may still run once the listener is closed
MAX_BODY = 1 << 20  # bytes of a request body accepted


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]  # the route pattern's named groups: {"id": "..."}
    query: dict[str, list[str]]
    body: Any  # the JSON body, or None
    headers: Message


@dataclass
class Response:
    status: int
    body: dict | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    quiet: bool = False  # not logged as a span (an empty long poll, say)

    def encode(self) -> tuple[bytes, str]:
        if self.body is None:
            return b"", "text/plain; charset=utf-8"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return (json.dumps(self.body) + "\n").encode(), "application/json"


def error(status: int, message: str, **headers: str) -> Response:
    return Response(status, {"error": message}, headers=dict(headers))


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str  # /tasks/{id}: a path with named parts
    handler: Callable[[Request], Response]
    quiet: bool = False  # probes and scrapes: counted, not logged

    @property
    def label(self) -> str:
        return f"{self.method} {self.pattern}"

    def match(self, path: str) -> dict[str, str] | None:
        found = _compiled(self.pattern).fullmatch(path)
        return found.groupdict() if found else None


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern[str]:
    """``/tasks/{id}`` as a regular expression with a named group a part."""
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[A-Za-z0-9_.-]+)", re.escape(pattern)))


class Service:
    """A role's HTTP side: its routes and the common ones, readiness, metrics and in-flight requests."""

    def __init__(self, settings: Settings, routes: list[Route], *,
                 gauges: Callable[[], list[Gauge]] = list, ready: Callable[[], tuple[bool, str]] | None = None,
                 metrics: Metrics | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.started_wall = time.time()
        self.draining = False
        self._gauges = gauges
        self._ready = ready
        self.in_flight = InFlight()
        self.routes = [*routes,
                       Route("GET", "/", self.info, quiet=True),
                       Route("GET", "/version", lambda r: Response(200, settings.version + "\n"), quiet=True),
                       Route("GET", "/healthz", lambda r: Response(200, "ok\n"), quiet=True),
                       Route("GET", "/readyz", self.readyz, quiet=True),
                       Route("GET", "/metrics", self.render_metrics, quiet=True)]  # fmt: skip

    # ------------------------------------------------------------------ common endpoints

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down after SIGTERM"
        return self._ready() if self._ready else (True, "ready")

    def readyz(self, request: Request) -> Response:
        ready, reason = self.readiness()
        return Response(200 if ready else 503, reason + "\n")

    def info(self, request: Request) -> Response:
        s = self.settings
        return Response(200, {"app": "platform", "role": s.role, "version": s.version, "hostname": s.hostname,
                              "release": s.release.summary})  # fmt: skip

    def render_metrics(self, request: Request) -> Response:
        s = self.settings
        gauges = [*self._gauges(),
                  Gauge("platform_ready", 1 if self.readiness()[0] else 0),
                  Gauge("process_resident_memory_bytes", resident_memory()),
                  Gauge("process_start_time_seconds", self.started_wall),
                  Gauge("platform_version_info", 1, {"version": s.version, "role": s.role})]  # fmt: skip
        text = self.metrics.render(gauges)
        return Response(200, text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # ------------------------------------------------------------------ dispatch

    def handle(self, method: str, target: str, headers: Message, raw: bytes) -> Response:
        """Route one request inside a span; count it and time it by route and code."""
        started = time.perf_counter()
        url = urlsplit(target)
        route, params, allowed = None, {}, []
        for candidate in self.routes:
            found = candidate.match(url.path)
            if found is not None:
                allowed.append(candidate.method)
                if candidate.method == method:
                    route, params = candidate, found
                    break
        label = route.label if route else "other"
        with span(f"{method} {route.pattern if route else url.path}", headers.get("traceparent"),
                  task_id=params.get("id"), quiet=route is None or route.quiet, method=method,
                  route=label) as current:  # fmt: skip
            if route is None:
                response = (error(405, f"{method} is not allowed on {url.path} (use {' or '.join(allowed)})")
                            if allowed else error(404, f"not found: {url.path}"))  # fmt: skip
            else:
                response = self._call(route, Request(method, url.path, params, parse_qs(url.query), None, headers), raw)
            current.fields["code"] = response.status
            if response.status >= 500:
                current.status = "error"
            if response.quiet:
                current.fields["quiet"] = True
        self.metrics.inc("http_requests_total", route=label, code=str(response.status))
        self.metrics.observe("http_request_duration_seconds", time.perf_counter() - started,
                             route=label, code=str(response.status))  # fmt: skip
        return response

    def _call(self, route: Route, request: Request, raw: bytes) -> Response:
        try:
            if raw:
                try:
                    request.body = json.loads(raw)
                except ValueError:
                    raise BadRequest("the body must be JSON") from None
            return route.handler(request)
        except BadRequest as exc:
            return error(400, str(exc))
        except Exception as exc:  # a bug: a 500 with its reason, logged, and the service goes on
            log("error", "request failed", error=f"{type(exc).__name__}: {exc}", route=route.label)
            return error(500, f"{type(exc).__name__}: {exc}")


def body_object(request: Request) -> dict:
    """The JSON body, which must be an object ({} when there is none)."""
    if request.body is None:
        return {}
    if not isinstance(request.body, dict):
        raise BadRequest("the body must be a JSON object")
    return request.body


# --------------------------------------------------------------------------- serving

class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0, one request per connection: nothing idles on a connection to hold a drain up."""

    server_version = "labkit-platform"
    service: Service  # set on the subclass the server makes

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        self.service.in_flight.enter()
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                response = error(413, f"a body may have {MAX_BODY} bytes at most")
            else:
                raw = self.rfile.read(length) if length > 0 else b""
                response = self.service.handle(method, self.path, self.headers, raw)
            self._send(response)
        finally:
            self.service.in_flight.leave()

    def _send(self, response: Response) -> None:
        body, content_type = response.encode()
        self.send_response(response.status)
        self.send_header("Content-Type", response.headers.pop("Content-Type", content_type))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # each request is a span record in the JSON log


def make_server(service: Service) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    if socket.has_ipv6:
        try:
            return Server(("::", service.settings.port), handler)
        except OSError as exc:  # no IPv6 on this machine: IPv4 alone
            if exc.errno == errno.EADDRINUSE:
                raise
    return IPv4Server(("0.0.0.0", service.settings.port), handler)


def serve(service: Service, *, start: Callable[[], None] | None = None, stop: Callable[[], None] | None = None,
          closing: Callable[[], None] | None = None) -> int:  # fmt: skip
    """Serve until SIGTERM (or SIGINT), then drain; returns the exit code.

    ``start`` runs once the port listens (the worker's loops). When the signal comes readiness fails
    and ``stop`` runs (the worker stops leasing and finishes its tasks, still answering probes and
    scrapes); then it serves on for $SHUTDOWN_DELAY, ``closing`` runs (the queue sends waiting long
    polls away), the listener closes and in-flight requests finish."""
    s = service.settings
    try:
        server = make_server(service)
    except OSError as exc:
        log("error", f"cannot listen on :{s.port}: {exc.strerror or exc}")
        return 1
    received: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum).name))
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    log("info", "listening", port=server.server_address[1], role=s.role, release=s.release.summary)
    if start is not None:
        start()
    while not received:
        time.sleep(0.1)
    log("info", f"received {received[0]}, draining")
    service.draining = True
    if stop is not None:
        stop()
    if s.shutdown_delay:
        log("info", f"serving for {s.shutdown_delay:g}s more ($SHUTDOWN_DELAY) while endpoints update")
        time.sleep(s.shutdown_delay)
    if closing is not None:
        closing()
    server.shutdown()
    server.server_close()
    left = service.in_flight.wait_idle(DRAIN_TIMEOUT)
    log("info", "drained, exiting" if not left else f"{left} requests still running after {DRAIN_TIMEOUT:g}s, exiting")
    return 0
