"""Liveness, readiness and startup probes: the kubelet's prober, one thread per probed container.

Each probe runs on its own schedule (initialDelaySeconds, periodSeconds,
timeoutSeconds, successThreshold, failureThreshold, with the API's defaults).
They are timed as the kubelet times them. Its probe workers tick every
periodSeconds from when the node took the pod, and it learns that a container
runs only when its pod lifecycle event generator next lists the containers,
once a second. So a container's first readiness probe comes at that relist (up
to a second after the start, never at the instant the process starts, before
any application could listen), its first liveness and startup probes at the
first tick after it, none before initialDelaySeconds, and the later ones on the
ticks.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

from labkit.sandbox import procs
from labkit.sandbox.node import runtime
from labkit.sandbox.node.namespaces import in_network


RELIST_PERIOD = 1.0  # the kubelet's (generic) pod lifecycle event generator lists containers once a second


@dataclass
class Outcome:
    ok: bool
    message: str = ""


class Relist:
    """One node's relist clock: ticks once a period, at a phase of its own (each node's kubelet keeps its own)."""

    def __init__(self, period: float = RELIST_PERIOD) -> None:
        self.period = period
        self.phase = random.uniform(0, period)

    def next(self, after: float) -> float:
        """The first tick at or after ``after`` (a ``time.monotonic()`` reading)."""
        return after + (self.phase - after) % self.period


def _port(value: int | str, container: dict) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for port in container.get("ports", []):
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ValueError(f"couldn't find port {value!r} in the container's ports")


def http_get(spec: dict, container: dict, host: str, timeout: float, netns: int | None) -> Outcome:
    scheme = spec.get("scheme", "HTTP").lower()
    host = spec.get("host") or host
    path = spec.get("path", "/") or "/"
    try:
        port = _port(spec["port"], container)
    except ValueError as exc:
        return Outcome(False, str(exc))
    url = f"{scheme}://{host}:{port}{path}"
    headers = {"User-Agent": "kube-probe/1.36", "Accept": "*/*"}
    headers.update({h["name"]: h["value"] for h in spec.get("httpHeaders", [])})
    try:
        if scheme == "https":
            context = ssl._create_unverified_context()  # the kubelet does not verify probe certificates
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        in_network(netns, conn.connect)  # from inside the pod's network: the socket stays there
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read(10 * 1024)
        finally:
            conn.close()
    except socket.timeout:
        return Outcome(False, f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)')
    except ConnectionRefusedError:
        return Outcome(False, f'Get "{url}": dial tcp {host}:{port}: connect: connection refused')
    except (OSError, http.client.HTTPException) as exc:
        return Outcome(False, f'Get "{url}": {exc}')
    if 200 <= response.status < 400:
        return Outcome(True)
    detail = body.decode(errors="replace").strip()
    return Outcome(False, f"HTTP probe failed with statuscode: {response.status}" + (f", body: {detail[:200]}" if detail else ""))


def tcp_socket(spec: dict, container: dict, host: str, timeout: float, netns: int | None) -> Outcome:
    host = spec.get("host") or host
    try:
        port = _port(spec["port"], container)
        sock = in_network(netns, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
    except ConnectionRefusedError:
        return Outcome(False, f"dial tcp {host}:{port}: connect: connection refused")
    except socket.timeout:
        return Outcome(False, f"dial tcp {host}:{port}: i/o timeout")
    except (OSError, ValueError) as exc:
        return Outcome(False, str(exc))
    return Outcome(True)


def exec_action(spec: dict, env: dict[str, str], cwd: str, timeout: float, pid: int | None) -> Outcome:
    argv = spec.get("command") or []
    if not argv:
        return Outcome(False, "exec probe has no command")
    code, output = runtime.run(runtime.Target(pid, env, cwd), argv, timeout)
    if code == -1:
        return Outcome(False, f"command {argv!r} timed out")
    if code != 0:
        detail = output.strip()
        return Outcome(False, f"command {argv!r} exited with {code}" + (f": {detail[:300]}" if detail else ""))
    return Outcome(True)


def wait_entered(pid: int, stopped: threading.Event, timeout: float = 10.0) -> bool:
    """Wait until container process ``pid`` has left the agent's namespaces for its own (its launcher
    has set it up): what a runtime reports as the container having started."""
    own = procs.namespace(os.getpid(), "mnt")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopped.is_set():
        current = procs.namespace(pid, "mnt")
        if current is None or current != own:
            return current is not None
        time.sleep(0.01)
    return False


KINDS = (("startupProbe", "Startup"), ("livenessProbe", "Liveness"), ("readinessProbe", "Readiness"))


class _Schedule:
    """One probe's settings and its running tally."""

    def __init__(self, spec: dict, origin: float) -> None:
        self.spec = spec
        self.initial = float(spec.get("initialDelaySeconds", 0))
        self.period = float(spec.get("periodSeconds", 10))
        self.timeout = float(spec.get("timeoutSeconds", 1))
        self.successes_needed = int(spec.get("successThreshold", 1))
        self.failures_allowed = int(spec.get("failureThreshold", 3))
        self.successes = 0
        self.failures = 0
        self.origin = origin  # its ticks: origin + k * period
        self.next_at = 0.0

    def tick_after(self, moment: float, inclusive: bool = False) -> float:
        """The first tick after ``moment`` (or at it, if ``inclusive``)."""
        ticks = (moment - self.origin) / self.period
        whole = int(ticks)
        return self.origin + (whole if inclusive and whole == ticks else whole + 1) * self.period


class Prober(threading.Thread):
    """Probes one running container; the pod worker reads ``ready``/``started`` and ``restart_reason``."""

    def __init__(self, container: dict, pid: int | None, pod_pid: int | None, env: dict[str, str], cwd: str,
                 event: Callable[[str, str, str], None], relist: Relist, taken: float, host: str,
                 changed: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        """``pid``: the container's process, for exec probes (None: containers have no namespaces here);
        ``pod_pid``: the pod's pause process, whose network namespace the network probes use; ``host``: the
        address network probes go to unless they name one (the pod's IP, as the kubelet's); ``relist``: the
        node's relist clock; ``taken``: when the node took the pod (``time.monotonic()``), which the probes'
        ticks count from; ``changed``: called when ``started``, ``ready`` or ``restart_reason`` changes."""
        super().__init__(name=f"probe-{container['name']}-{pid}", daemon=True)
        self.container = container
        self.netns = pod_pid
        self.host = host
        self.join_pid = pid
        self.env = env
        self.cwd = cwd
        self.event = event  # (reason, message, type)
        self.changed = changed
        self.relist = relist
        self.stopped = threading.Event()
        self.schedules = {kind: _Schedule(container[key], taken) for key, kind in KINDS if container.get(key)}
        self.started = "Startup" not in self.schedules
        self.ready = "Readiness" not in self.schedules
        self.restart_reason: str | None = None  # set once a startup/liveness probe has failed for good

    @staticmethod
    def wanted(container: dict) -> bool:
        return any(container.get(key) for key, _ in KINDS)

    def stop(self) -> None:
        self.stopped.set()

    def probe(self, schedule: _Schedule) -> Outcome:
        spec = schedule.spec
        if "httpGet" in spec:
            return http_get(spec["httpGet"], self.container, self.host, schedule.timeout, self.netns)
        if "tcpSocket" in spec:
            return tcp_socket(spec["tcpSocket"], self.container, self.host, schedule.timeout, self.netns)
        if "exec" in spec:
            return exec_action(spec["exec"], self.env, self.cwd, schedule.timeout, self.join_pid)
        return Outcome(False, "the sandbox supports httpGet, tcpSocket and exec probes")

    def plan(self, begun: float) -> None:
        """Time each probe's first run, for a container that started at ``begun``."""
        seen = self.relist.next(begun)  # when the kubelet would learn that the container runs
        for kind, schedule in self.schedules.items():
            allowed = begun + schedule.initial
            if kind == "Readiness" and seen >= allowed:
                schedule.next_at = seen  # the status sync that saw it asks for a readiness probe at once
            else:
                schedule.next_at = schedule.tick_after(max(seen, allowed), inclusive=True)

    def run(self) -> None:
        if self.join_pid is not None:
            wait_entered(self.join_pid, self.stopped)
        self.plan(time.monotonic())
        while not self.stopped.is_set() and self.restart_reason is None:
            now = time.monotonic()
            active = {kind: schedule for kind, schedule in self.schedules.items()
                      if (kind == "Startup") != self.started}  # startup until it succeeds, then the others
            for kind, schedule in active.items():
                if now < schedule.next_at:
                    continue
                schedule.next_at = schedule.tick_after(now)
                self._record(kind, schedule, self.probe(schedule))
                if self.stopped.is_set() or self.restart_reason:
                    return
            due = min((schedule.next_at for schedule in active.values()), default=now + 0.1)
            self.stopped.wait(min(0.1, max(0.0, due - time.monotonic())))

    def _record(self, kind: str, schedule: _Schedule, outcome: Outcome) -> None:
        if outcome.ok:
            schedule.failures = 0
            schedule.successes += 1
            if schedule.successes >= schedule.successes_needed:
                if kind == "Startup" and not self.started:
                    self.started = True
                    self.changed()
                elif kind == "Readiness" and not self.ready:
                    self.ready = True
                    self.changed()
            return
        schedule.successes = 0
        schedule.failures += 1
        self.event("Unhealthy", f"{kind} probe failed: {outcome.message}", "Warning")
        if schedule.failures < schedule.failures_allowed:
            return
        if kind == "Readiness":
            if self.ready:
                self.ready = False
                self.changed()
        else:
            what = "liveness" if kind == "Liveness" else "startup"
            self.restart_reason = f"Container {self.container['name']} failed {what} probe, will be restarted"
            self.changed()
