"""The process that keeps one sandbox's components running.

``labkit sandbox up`` starts it detached from the terminal; it then outlives the
command, the notebook kernel or the shell that started the sandbox. It:

* starts each component listed in ``run/components.json`` with its output
  appended to ``logs/<component>.log``;
* restarts a component that exits, with a back-off that doubles from 1 s to 30 s
  and resets once the component has run for a minute (what a kubelet does for a
  static pod), and counts the restarts;
* writes what it knows to ``run/status.json`` for ``labkit sandbox status``;
* on SIGTERM stops the components in reverse order (SIGTERM, then SIGKILL after a
  grace period) and exits.

It holds an exclusive lock on ``run/supervisor.lock`` for as long as it lives, so
"is the sandbox running" never depends on a PID that may have been reused. Each
component is started with PR_SET_PDEATHSIG, so if the supervisor itself is killed
with SIGKILL the kernel ends the components too: nothing is ever orphaned.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 60.0
STOP_GRACE = 10.0
LOG_ROTATE_BYTES = 20 * 2**20
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # A session of its own: its own process group, which a terminal's Ctrl-C never reaches, and its own
    # scheduler autogroup. Each component then gets a fair share of the CPU, as each service would on a real
    # cluster (a systemd unit's cgroup, or a machine of its own), rather than one share for all of them in which
    # the API server's many threads crowd out the node agent while a burst of pods starts (pod start-up p99
    # 0.50 s -> 0.37 s in benchmarks/pod_startup.py).
    os.setsid()


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Start only once this URL answers 200 (verified against `after_ca`): a component that
    # needs another to be ready first, as the controllers need the API server's RBAC roles.
    after: str | None = None
    after_ca: str | None = None
    process: subprocess.Popen | None = None
    started_at: float | None = None
    restarts: int = 0
    backoff: float = BACKOFF_START
    next_start: float = 0.0
    last_exit: dict | None = None

    def status(self) -> dict:
        running = self.process is not None and self.process.poll() is None
        return {
            "pid": self.process.pid if running else None,
            "state": "running" if running else ("waiting" if self.started_at is None else "waiting to restart"),
            "started_at": self.started_at if running else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "next_start": None if running else self.next_start,
        }


class Supervisor:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = root / "run"
        self.log_dir = root / "logs"
        spec = json.loads((self.run_dir / "components.json").read_text())
        self.components = [
            Component(c["name"], c["argv"], c.get("env", {}), c.get("after"), c.get("after_ca")) for c in spec
        ]
        self.stopping = False
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        lock = open(self.run_dir / "supervisor.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("another supervisor already runs this sandbox", file=sys.stderr)
            return 1
        lock.write(str(os.getpid()))
        lock.flush()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._log(f"supervisor {os.getpid()} starting {', '.join(c.name for c in self.components)}")
        self._write_status()
        while not self.stopping:
            changed = False
            now = time.monotonic()
            probed: dict[str, bool] = {}  # each dependency asked at most once a pass
            for component in self.components:
                if component.process is not None and component.process.poll() is not None:
                    self._exited(component)
                    changed = True
                if (
                    component.process is None
                    and now >= component.next_start
                    and not self.stopping
                    and self._dependency_ready(component, probed)
                ):
                    self._start(component)
                    changed = True
            if changed:
                self._write_status()
            time.sleep(0.05)
        self._stop_all()
        self._write_status(stopped=True)
        self._log("supervisor stopped")
        return 0

    def _dependency_ready(self, component: Component, probed: dict[str, bool]) -> bool:
        if not component.after:
            return True
        if component.after not in probed:
            try:
                context = _tls_context(component.after_ca)
                with urllib.request.urlopen(component.after, timeout=0.5, context=context) as response:
                    probed[component.after] = response.status == 200
            except (urllib.error.URLError, OSError, ssl.SSLError, ValueError):
                probed[component.after] = False
        return probed[component.after]

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _start(self, component: Component) -> None:
        log_path = self.log_dir / f"{component.name}.log"
        if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_suffix(".log.1"))
        log = open(log_path, "ab", buffering=0)
        log.write(f"\n=== labkit: starting {component.name} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        try:
            component.process = subprocess.Popen(
                component.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **component.env},
                cwd=self.root,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        except OSError as exc:
            log.write(f"=== labkit: could not start {component.name}: {exc} ===\n".encode())
            component.process = None
            component.last_exit = {"code": None, "signal": None, "at": time.time(), "error": str(exc)}
            self._schedule_restart(component)
        else:
            component.started_at = time.time()
        finally:
            log.close()

    def _exited(self, component: Component) -> None:
        assert component.process is not None
        code = component.process.returncode
        ran_for = time.time() - (component.started_at or time.time())
        component.last_exit = {
            "code": code if code >= 0 else None,
            "signal": signal.Signals(-code).name if code < 0 else None,
            "at": time.time(),
            "ran_for": ran_for,
        }
        component.process = None
        if ran_for >= BACKOFF_RESET_AFTER:
            component.backoff = BACKOFF_START
        self._log(f"{component.name} exited ({self._describe(component.last_exit)}) after {ran_for:.1f}s; "
                  f"restarting in {component.backoff:.0f}s")
        component.restarts += 1
        self._schedule_restart(component)

    def _schedule_restart(self, component: Component) -> None:
        component.next_start = time.monotonic() + component.backoff
        component.backoff = min(BACKOFF_MAX, component.backoff * 2)

    @staticmethod
    def _describe(last_exit: dict) -> str:
        return f"signal {last_exit['signal']}" if last_exit.get("signal") else f"exit code {last_exit.get('code')}"

    def _stop_all(self) -> None:
        """Stop in reverse start order: clients first, the database last."""
        for component in reversed(self.components):
            process = component.process
            if process is None or process.poll() is not None:
                continue
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._log(f"{component.name} ignored SIGTERM for {STOP_GRACE:.0f}s; sending SIGKILL")
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            # Anything the component left in its group goes too.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            component.process = None

    # -- reporting ---------------------------------------------------------------------------

    def _write_status(self, stopped: bool = False) -> None:
        status = {
            "supervisor_pid": None if stopped else os.getpid(),
            "started_at": self.started_at,
            "components": {c.name: c.status() for c in self.components},
        }
        tmp = self.run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=2))
        tmp.replace(self.run_dir / "status.json")

    def _log(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


@functools.lru_cache(maxsize=None)
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m labkit.sandbox.supervisor STATE_DIR", file=sys.stderr)
        return 2
    return Supervisor(Path(sys.argv[1])).run()


if __name__ == "__main__":
    sys.exit(main())
