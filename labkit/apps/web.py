"""web: the HTTP service the labs deploy, scale, roll out, probe, run out of memory and autoscale.

Run it with ``python3 -m labkit.apps.web``. It is configured the way a
Kubernetes workload is, through its environment:

==================  =======================================================================
``PORT``            port to listen on, on every address (default 8080)
``APP_VERSION``     the release it reports (default 1.0; the image tag sets it)
``MESSAGE``         a line added to the greeting (a ConfigMap value, say)
``CONFIG_DIR``      folder shown by ``/config`` (default /etc/web: a ConfigMap volume)
``READY_DELAY``     seconds after start before ``/readyz`` answers 200 (default 0)
``FAIL_READY``      ``1``: ``/readyz`` always answers 503
``SHUTDOWN_DELAY``  seconds it keeps serving after SIGTERM, so endpoints update first (default 0)
==================  =======================================================================

Endpoints: ``/`` (greeting), ``/version``, ``/healthz`` (liveness), ``/readyz``
(readiness), ``/config``, ``/work?ms=N`` (burn CPU), ``/alloc?mb=N`` (hold
memory), ``/crash`` (exit 1), ``/unhealthy`` (liveness fails from then on),
``/unready`` and ``/ready`` (take it out of service and back: readiness) and
``/metrics`` (Prometheus). Release 3.0 is the rollout lab's bad release: it
serves, but never becomes ready.

Standard library only, so the same file runs as a sandbox process and in a
``python:3.12-slim`` image.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import parse_qs, urlsplit

from labkit.apps import BAD_RELEASE, DEFAULT_RELEASE

MIB = 1 << 20
PAGE = 4096
MAX_WORK_MS = 60_000
MAX_ALLOC_MB = 64 * 1024
DRAIN_TIMEOUT = 5.0  # how long in-flight requests may still run once the listener is closed
CONFIG_FILE_LIMIT = 64 * 1024  # bytes of each /config file shown
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # Prometheus' defaults


_log_lock = threading.Lock()


def log(line: str) -> None:
    """One whole line to stdout, flushed: a container's log is its stdout, read while it runs,
    and request threads log at once (``print`` writes the text and its newline apart)."""
    with _log_lock:
        sys.stdout.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Settings:
    """What the environment asks of this process (see the module docstring)."""

    port: int = 8080
    version: str = DEFAULT_RELEASE
    message: str = ""
    config_dir: Path = Path("/etc/web")
    ready_delay: float = 0.0
    fail_ready: bool = False
    shutdown_delay: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            port=int(_number(env, "PORT", 8080)),
            version=env.get("APP_VERSION") or DEFAULT_RELEASE,
            message=env.get("MESSAGE", ""),
            config_dir=Path(env.get("CONFIG_DIR") or "/etc/web"),
            ready_delay=_number(env, "READY_DELAY", 0.0),
            fail_ready=env.get("FAIL_READY", "").lower() in ("1", "true", "yes"),
            shutdown_delay=_number(env, "SHUTDOWN_DELAY", 0.0),
        )


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    """A numeric setting; a bad one stops the process with a message a trainee can act on."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"web: ${name} must be a number, got {raw!r}") from None
    if value < 0:
        raise SystemExit(f"web: ${name} must not be negative, got {raw!r}")
    return value


# --------------------------------------------------------------------------- metrics

def resident_memory() -> int:
    """This process's resident set size in bytes (what a memory limit is measured against)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak is the best there is
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class InFlight:
    """The requests a server is answering, so that a drain can wait for them (the platform's servers too)."""

    def __init__(self) -> None:
        self._idle = threading.Condition()
        self._in_flight = 0

    def enter(self) -> None:
        with self._idle:
            self._in_flight += 1

    def leave(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> int:
        """Wait until no request is in flight (at most ``timeout``); returns how many still are."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout)
            return self._in_flight


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.count += 1
        self.total += seconds


class Metrics:
    """Request counts and latencies, rendered in the Prometheus text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._latency: dict[str, Histogram] = {}

    def observe(self, path: str, code: int, seconds: float) -> None:
        with self._lock:
            self._requests[(path, code)] = self._requests.get((path, code), 0) + 1
            self._latency.setdefault(path, Histogram()).observe(seconds)

    def render(self, gauges: Mapping[str, tuple[str, float]], version: str) -> str:
        """The exposition text; ``gauges`` maps a metric name to (help, value)."""
        lines = ["# HELP http_requests_total HTTP requests served, by route and status code.",
                 "# TYPE http_requests_total counter"]  # fmt: skip
        with self._lock:
            for (path, code), count in sorted(self._requests.items()):
                lines.append(f'http_requests_total{{path="{path}",code="{code}"}} {count}')
            lines += ["# HELP http_request_duration_seconds Time to serve an HTTP request, by route.",
                      "# TYPE http_request_duration_seconds histogram"]  # fmt: skip
            for path, hist in sorted(self._latency.items()):
                for bound, count in zip(LATENCY_BUCKETS, hist.buckets):
                    lines.append(f'http_request_duration_seconds_bucket{{path="{path}",le="{bound}"}} {count}')
                lines += [f'http_request_duration_seconds_bucket{{path="{path}",le="+Inf"}} {hist.count}',
                          f'http_request_duration_seconds_sum{{path="{path}"}} {hist.total:.6f}',
                          f'http_request_duration_seconds_count{{path="{path}"}} {hist.count}']  # fmt: skip
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        lines += ["# HELP web_version_info The release this process runs.", "# TYPE web_version_info gauge",
                  f'web_version_info{{version="{version}"}} 1']  # fmt: skip
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- state

class State:
    """Everything the endpoints share: settings, health switches, held memory, in-flight requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.hostname = os.environ.get("HOSTNAME") or socket.gethostname()  # the pod's name
        self.healthy = True
        self.out_of_service = False  # set by /unready, cleared by /ready
        self.draining = False
        self.held: list[bytearray] = []
        self.metrics = Metrics()
        self.in_flight = InFlight()

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic, and why not: the reasons a readiness probe exists for."""
        s = self.settings
        if self.draining:
            return False, "draining: shutting down after SIGTERM"
        if s.version == BAD_RELEASE:
            return False, f"release {s.version} is broken: it never becomes ready (roll back to a good release)"
        if s.fail_ready:
            return False, "not ready: $FAIL_READY is set"
        if self.out_of_service:
            return False, "not ready: taken out of service by a request to /unready (/ready brings it back)"
        waited = time.monotonic() - self.started
        if waited < s.ready_delay:
            return False, f"starting: ready in {s.ready_delay - waited:.1f}s ($READY_DELAY={s.ready_delay:g})"
        return True, "ready"

    def held_bytes(self) -> int:
        return sum(len(block) for block in self.held)



# --------------------------------------------------------------------------- endpoints

@dataclass
class Request:
    method: str
    query: dict[str, list[str]]
    wants_json: bool


@dataclass
class Response:
    status: int
    body: str | dict
    content_type: str = "text/plain; charset=utf-8"
    then: Callable[[], None] | None = None  # runs once the response is sent

    def encode(self) -> tuple[bytes, str]:
        if isinstance(self.body, dict):
            return (json.dumps(self.body, indent=2) + "\n").encode(), "application/json"
        return self.body.encode(), self.content_type


class BadRequest(Exception):
    pass


def _int_param(request: Request, name: str, high: int) -> int:
    raw = request.query.get(name, [""])[0]
    if not raw.isdigit() or int(raw) > high:
        raise BadRequest(f"?{name}= must be a whole number from 0 to {high}, got {raw!r}")
    return int(raw)


def home(state: State, request: Request) -> Response:
    s = state.settings
    info = {"app": "web", "version": s.version, "hostname": state.hostname}
    if s.message:
        info["message"] = s.message
    if request.wants_json:
        return Response(200, info)
    text = f"Hello from web {s.version} on {state.hostname}"
    return Response(200, text + (f": {s.message}\n" if s.message else "\n"))


def version(state: State, request: Request) -> Response:
    return Response(200, state.settings.version + "\n")


def healthz(state: State, request: Request) -> Response:
    if state.healthy:
        return Response(200, "ok\n")
    return Response(500, "unhealthy: made so by a request to /unhealthy (restart the container to recover)\n")


def readyz(state: State, request: Request) -> Response:
    ready, reason = state.readiness()
    return Response(200 if ready else 503, reason + "\n")


def config(state: State, request: Request) -> Response:
    """The mounted configuration and the environment, as the process sees them."""
    folder = state.settings.config_dir
    shown = {"config_dir": str(folder), "files": config_files(folder),
             "env": selected_env(os.environ, everything="all" in request.query)}  # fmt: skip
    if not folder.is_dir():
        shown["note"] = f"{folder} does not exist: mount a ConfigMap there, or set $CONFIG_DIR"
    return Response(200, shown)


def config_files(folder: Path) -> dict[str, str]:
    """Each file below ``folder`` by relative path, skipping the ``..data`` machinery of a ConfigMap volume."""
    files: dict[str, str] = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".."))
        for name in sorted(n for n in names if not n.startswith("..")):
            path = Path(root, name)
            try:
                with open(path, "rb") as f:
                    files[str(path.relative_to(folder))] = f.read(CONFIG_FILE_LIMIT).decode(errors="replace")
            except OSError as exc:
                files[str(path.relative_to(folder))] = f"<unreadable: {exc.strerror}>"
    return files


# The process plumbing and the Service variables the kubelet injects would bury the ones a lab set.
_PLUMBING = re.compile(r"PATH|HOME|HOSTNAME|PWD|OLDPWD|SHLVL|TERM|LANG|LC_\w+|_|PYTHON\w*|GPG_KEY|"
                       r"KUBERNETES_\w+|\w+_SERVICE_(HOST|PORT\w*)|\w+_PORT_\d+_(TCP|UDP|SCTP)\w*")  # fmt: skip
_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://")


def selected_env(env: Mapping[str, str], everything: bool = False) -> dict[str, str]:
    """The environment a pod's spec set (``everything``: all of it)."""
    return {name: value for name, value in sorted(env.items())
            if everything or not (_PLUMBING.fullmatch(name)
                                  or (name.endswith("_PORT") and _SERVICE_LINK.match(value)))}  # fmt: skip


def work(state: State, request: Request) -> Response:
    """Use ``ms`` milliseconds of CPU: load for the autoscaling lab.

    CPU time, not wall time, so each request costs the same CPU however busy the
    machine is; a throttled container (a CPU limit) answers later instead.
    """
    ms = _int_param(request, "ms", MAX_WORK_MS)
    deadline = time.thread_time() + ms / 1000
    while time.thread_time() < deadline:
        sum(i * i for i in range(200))
    return Response(200, {"worked_ms": ms, "hostname": state.hostname})


def alloc(state: State, request: Request) -> Response:
    """Allocate ``mb`` MiB and keep it: each page is written, so it counts against a memory limit."""
    mb = _int_param(request, "mb", MAX_ALLOC_MB)
    block = bytearray(mb * MIB)  # zeroed pages the kernel has not handed out yet...
    block[::PAGE] = b"\x01" * len(range(0, len(block), PAGE))  # ...until each one is written
    state.held.append(block)
    return Response(200, {"allocated_mb": mb, "held_mb": state.held_bytes() // MIB,
                          "rss_mb": resident_memory() // MIB})  # fmt: skip


def crash(state: State, request: Request) -> Response:
    def exit_now() -> None:
        log("crash requested: exiting with code 1")
        os._exit(1)

    return Response(200, "crashing: exiting with code 1\n", then=exit_now)


def unhealthy(state: State, request: Request) -> Response:
    state.healthy = False
    log("made unhealthy: /healthz fails from now on")
    return Response(200, "unhealthy: /healthz fails from now on\n")


def unready(state: State, request: Request) -> Response:
    state.out_of_service = True
    log("taken out of service: /readyz fails until /ready")
    return Response(200, "out of service: /readyz fails until a request to /ready\n")


def ready(state: State, request: Request) -> Response:
    state.out_of_service = False
    log("back in service: /readyz answers as before")
    return Response(200, "back in service\n")


def metrics(state: State, request: Request) -> Response:
    gauges = {
        "process_resident_memory_bytes": ("Resident memory size in bytes.", resident_memory()),
        "process_start_time_seconds": ("Start time of the process since the Unix epoch.", state.started_wall),
        "web_held_memory_bytes": ("Memory held by /alloc requests.", state.held_bytes()),
        "web_ready": ("1 if /readyz answers 200.", 1 if state.readiness()[0] else 0),
    }
    body = state.metrics.render(gauges, state.settings.version)
    return Response(200, body, content_type="text/plain; version=0.0.4; charset=utf-8")


Endpoint = Callable[[State, Request], Response]
ROUTES: dict[str, tuple[Endpoint, tuple[str, ...]]] = {
    "/": (home, ("GET",)),
    "/version": (version, ("GET",)),
    "/healthz": (healthz, ("GET",)),
    "/readyz": (readyz, ("GET",)),
    "/config": (config, ("GET",)),
    "/work": (work, ("GET",)),
    "/alloc": (alloc, ("GET", "POST")),
    "/crash": (crash, ("GET", "POST")),
    "/unhealthy": (unhealthy, ("GET", "POST")),
    "/unready": (unready, ("GET", "POST")),
    "/ready": (ready, ("GET", "POST")),
    "/metrics": (metrics, ("GET",)),
}


def route(state: State, method: str, path: str, request: Request) -> Response:
    if path not in ROUTES:
        return Response(404, f"not found: {path} (try one of {', '.join(ROUTES)})\n")
    endpoint, methods = ROUTES[path]
    if method not in methods:
        return Response(405, f"{method} is not allowed on {path} (use {' or '.join(methods)})\n")
    try:
        return endpoint(state, request)
    except BadRequest as exc:
        return Response(400, f"{exc}\n")


# --------------------------------------------------------------------------- serving

class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0, one request per connection: nothing idles on a connection to hold a drain up."""

    server_version = "labkit-web"
    state: State  # set on the subclass the server makes

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        started = time.perf_counter()
        url = urlsplit(self.path)
        wants_json = "application/json" in self.headers.get("Accept", "") or "format=json" in url.query
        self.state.in_flight.enter()
        try:
            response = route(self.state, method, url.path, Request(method, parse_qs(url.query), wants_json))
            self._send(response)
        finally:
            self.state.in_flight.leave()
        elapsed = time.perf_counter() - started
        label = url.path if url.path in ROUTES else "other"  # a bounded set of label values
        self.state.metrics.observe(label, response.status, elapsed)
        client = self.client_address[0].removeprefix("::ffff:")  # an IPv4 client of the dual-stack socket
        log(f"{client} {method} {self.path} {response.status} {elapsed * 1000:.1f}ms")
        if response.then is not None:
            response.then()

    def _send(self, response: Response) -> None:
        body, content_type = response.encode()
        self.send_response(response.status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # _serve logs one line per request, to stdout


class Server(ThreadingHTTPServer):
    """Every address, IPv6 and IPv4 where the machine has both (``localhost`` may mean ``::1``)."""

    daemon_threads = True
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: object, client_address: tuple) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error
            super().handle_error(request, client_address)


class IPv4Server(ThreadingHTTPServer):
    daemon_threads = True


def make_server(state: State) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"state": state})
    if socket.has_ipv6:
        try:
            return Server(("::", state.settings.port), handler)
        except OSError as exc:  # no IPv6 on this machine: IPv4 alone
            if exc.errno == errno.EADDRINUSE:
                raise
    return IPv4Server(("0.0.0.0", state.settings.port), handler)


def serve(settings: Settings) -> int:
    """Serve until SIGTERM (or SIGINT), then drain as a well-behaved pod does; returns the exit code."""
    state = State(settings)
    try:
        server = make_server(state)
    except OSError as exc:
        print(f"web: cannot listen on :{settings.port}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 1
    received: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum).name))
    threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
    log(f"web {settings.version} listening on :{server.server_address[1]}")
    while not received:
        time.sleep(0.1)
    drain(state, server, received[0])
    return 0


def drain(state: State, server: ThreadingHTTPServer, signame: str) -> None:
    """Fail readiness, serve on for $SHUTDOWN_DELAY, stop accepting, let in-flight requests finish."""
    log(f"received {signame}, draining")
    state.draining = True
    if state.settings.shutdown_delay:
        log(f"serving for {state.settings.shutdown_delay:g}s more ($SHUTDOWN_DELAY) while endpoints update")
        time.sleep(state.settings.shutdown_delay)
    server.shutdown()
    server.server_close()
    left = state.in_flight.wait_idle(DRAIN_TIMEOUT)
    log("drained, exiting" if not left else f"{left} requests still running after {DRAIN_TIMEOUT:g}s, exiting")


def main() -> None:
    sys.exit(serve(Settings.from_env()))


if __name__ == "__main__":
    main()
