"""Processes started inside a running container: ``kubectl exec``, exec probes and hooks, injected load.

A container runtime's exec: the new process enters the container's namespaces
(its mount, UTS and network ones, and its user namespace; ``launch.py``'s ``join``)
with the container's environment and working directory, or, where this machine
grants no namespaces, runs as the container's process does (``plain``). Its CPU
weight is the container's, and the pod worker counts its memory with the
container's (``Joined``), so an exec can push a container past its limit as on a
real node. With ``tty`` it gets a pseudo-terminal of its own, as its controlling
terminal, whose size the caller sets.
"""

from __future__ import annotations

import fcntl
import functools
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
from dataclasses import dataclass, field
from pathlib import Path

import labkit
from labkit import paths
from labkit.sandbox import procs
from labkit.sandbox.node import cpuweight, launch


@dataclass
class Target:
    """A running container, as a process started inside it needs to know it."""

    pid: int | None  # its first process, whose namespaces are joined; None: no namespaces on this machine
    env: dict[str, str]
    cwd: str
    nice: int = 0


@dataclass
class Started:
    """A process started in a container, with the agent's ends of its standard streams."""

    process: subprocess.Popen
    stdin: int | None = None  # write end (the terminal, with a tty)
    stdout: int | None = None  # read ends; with a tty, the terminal, and no stderr
    stderr: int | None = None
    terminal: int | None = None
    error_file: Path | None = None

    def resize(self, width: int, height: int) -> None:
        if self.terminal is not None:
            set_size(self.terminal, width, height)

    def start_error(self) -> str:
        """What the launcher said when it could not start the command ("" if it did)."""
        try:
            return self.error_file.read_text().strip() if self.error_file else ""
        except OSError:
            return ""

    def kill(self) -> None:
        for kill in (os.killpg, os.kill):  # its group; or itself, if it has not made its session yet
            try:
                kill(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        for fd in {self.stdin, self.stdout, self.stderr, self.terminal} - {None}:
            try:
                os.close(fd)
            except OSError:
                pass
        if self.error_file:
            self.error_file.unlink(missing_ok=True)


def write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to ``fd`` (waiting while it is full, even when it does not block); False if it fails."""
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                select.select([], [fd], [], 1.0)
    except OSError:
        return False
    return True


def set_size(terminal: int, width: int, height: int) -> None:
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def spec_for(target: Target, argv: list[str]) -> dict:
    """The launcher's spec that runs ``argv`` in ``target``."""
    if target.pid is None:
        return {"mode": "plain", "argv": argv, "env": target.env, "cwd": target.cwd}
    # A container still being set up has not left the agent's namespaces: never run there.
    return {"mode": "join", "pid": target.pid, "argv": argv, "env": target.env, "cwd": target.cwd,
            "required": ["mnt", "net"]}  # fmt: skip


def run(target: Target, argv: list[str], timeout: float) -> tuple[int, str]:
    """Run ``argv`` to its end (exec probes and hooks): (exit code, output); a timeout is exit code -1."""
    try:
        done = subprocess.run(launch.command(spec_for(target, argv)), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        return -1, (exc.stdout or b"").decode(errors="replace")
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


class StartFailed(Exception):
    """The command cannot be started in the container: the runtime's reason (its program is not there, the
    container is not set up yet)."""


def _program_in(target: Target, program: str) -> bool:
    """Whether ``program`` is there to run inside ``target`` (looked up on its PATH, inside its own root)."""
    root = f"/proc/{target.pid}/root"
    if "/" in program:
        candidates = [program if program.startswith("/") else os.path.join(target.cwd, program)]
    else:
        candidates = [os.path.join(folder, program) for folder in target.env.get("PATH", "").split(":") if folder]
    return any(os.access(root + candidate, os.X_OK) and not os.path.isdir(root + candidate) for candidate in candidates)


@functools.cache
def _entering_tools() -> tuple[str, str] | None:
    found = (shutil.which("nsenter"), shutil.which("setsid"))
    return found if all(found) else None  # type: ignore[return-value]


def _entering(target: Target, argv: list[str], tty: bool) -> list[str] | None:
    """util-linux's nsenter into ``target``'s namespaces, at its working directory (a C program: an exec
    starts in a millisecond, not the launcher's fifteen); None where it is missing (the launcher does it)."""
    tools = _entering_tools()
    if tools is None or target.pid is None:
        return None
    nsenter, setsid = tools
    own, theirs = procs.namespace(os.getpid(), "mnt"), procs.namespace(target.pid, "mnt")
    if theirs is None or theirs == own:  # gone, or still being set up: never run in the agent's own namespaces
        raise StartFailed("the container is not running")
    if not _program_in(target, argv[0]):
        raise StartFailed(f'exec: "{argv[0]}": executable file not found in $PATH')
    user = [] if procs.namespace(target.pid, "user") == procs.namespace(os.getpid(), "user") else ["-U", "--preserve-credentials"]
    # nsenter opens the working directory before it enters the namespaces: named through the container's root
    line = [nsenter, "-t", str(target.pid), *user, "-m", "-u", "-n", f"--wd=/proc/{target.pid}/root{target.cwd}", "--",
            *argv]  # fmt: skip
    return [setsid, "--ctty", *line] if tty else line  # its terminal (stdin) becomes its controlling terminal


def start(target: Target, argv: list[str], *, stdin: bool = False, stdout: bool = False, stderr: bool = False,
          tty: bool = False, report: bool = True) -> Started:  # fmt: skip
    """Start ``argv`` in ``target`` with the streams asked for (the others are /dev/null); StartFailed or OSError
    if it cannot. With ``report``, what keeps the launcher from starting it is kept for ``start_error``."""
    entering = _entering(target, argv, tty) if report else None
    name = ""
    if report and entering is None:
        handle, name = tempfile.mkstemp(prefix="labkit-exec-", suffix=".error")
        os.close(handle)
    spec = {**spec_for(target, argv), "nice": target.nice, **({"error_file": name, "quiet": True} if name else {})}
    mine: list[int] = []  # the agent's ends
    theirs: list[int] = []  # the process's, closed here once it has them
    try:
        if tty:
            terminal, inner = os.openpty()
            mine.append(terminal)
            theirs.append(inner)
            spec["tty"] = True
            streams = {"stdin": inner, "stdout": inner, "stderr": inner}
            started = Started(None, stdin=os.dup(terminal) if stdin else None,  # type: ignore[arg-type]
                              stdout=terminal, terminal=terminal)  # fmt: skip
            if started.stdin is not None:
                mine.append(started.stdin)
        else:
            started = Started(None)  # type: ignore[arg-type]
            streams = {}
            for key, wanted, reading in (("stdin", stdin, False), ("stdout", stdout, True), ("stderr", stderr, True)):
                if not wanted:
                    streams[key] = subprocess.DEVNULL
                    continue
                read_end, write_end = os.pipe()
                ours, child = (read_end, write_end) if reading else (write_end, read_end)
                mine.append(ours)
                theirs.append(child)
                setattr(started, key, ours)
                streams[key] = child
        if entering is not None:
            started.process = subprocess.Popen(entering, env=target.env, start_new_session=not tty, **streams)
        else:
            started.process = subprocess.Popen(launch.command(spec), start_new_session=True, **streams)
    except OSError:
        for fd in mine:
            os.close(fd)
        if name:
            os.unlink(name)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    started.error_file = Path(name) if name else None
    cpuweight.apply(started.process.pid, target.nice)
    return started


@dataclass
class Console:
    """The agent's ends of a container's own stdin (with ``stdin``) and terminal (with ``tty``), for attach."""

    stdin: int | None
    terminal: int | None
    once: bool  # ``stdinOnce``: the first attach that closes stdin closes it for good
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, data: bytes) -> bool:
        """Pass ``data`` to the container's stdin (its terminal with ``tty``); False once it is closed."""
        with self.lock:
            return self.stdin is not None and write_all(self.stdin, data)

    def close_stdin(self) -> None:
        with self.lock:
            if self.stdin is not None:
                os.close(self.stdin)
                self.stdin = None

    def resize(self, width: int, height: int) -> None:
        if self.terminal is not None:
            set_size(self.terminal, width, height)

    def close(self) -> None:
        self.close_stdin()
        with self.lock:
            if self.terminal is not None:
                os.close(self.terminal)
                self.terminal = None


@dataclass
class Joined:
    """The processes started inside one container besides its own (execs, injected load), safe across threads:
    the pod worker counts their memory, chaos adds and ends load, the kubelet API adds execs."""

    processes: dict[int, tuple[str, subprocess.Popen]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, process: subprocess.Popen) -> None:
        with self.lock:
            self.processes[process.pid] = (kind, process)

    def remove(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.processes.pop(process.pid, None)

    def pids(self) -> list[int]:
        with self.lock:
            return [pid for pid, (_, process) in self.processes.items() if process.poll() is None]

    def end(self, kind: str | None = None) -> None:
        """Kill those of ``kind`` (all if None) and wait for them."""
        with self.lock:
            chosen = [p for k, p in self.processes.values() if kind is None or k == kind]
            for process in chosen:
                self.processes.pop(process.pid, None)
        for process in chosen:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()


# -- the container runtimes: how a pod's sandbox and its containers' first processes are made ------------------


@dataclass
class Launch:
    """What a container's first process needs: its command, environment and where it starts, for either runtime."""

    argv: list[str]
    env: dict[str, str]
    working_dir: str  # the spec's workingDir ("" for the image's, which is /)
    folder: Path  # the container's own folder on the node (rootfs, layers, tmp, launch.spec, start-error)
    pod_folder: Path
    hostname: str
    mounts: list[dict]
    hidden: list[str]
    nice: int
    tty: bool
    pause_pid: int | None  # the pod's pause process, whose namespaces the container joins


class PlainRuntime:
    """Where this machine grants the agent no Linux namespaces: a pod has no sandbox, a container is its program
    run as it is, in a working folder of the pod's."""

    isolated = False

    def sandbox_command(self, hostname: str) -> list[str] | None:
        """The pod's pause process, which makes and holds its namespaces (None: no sandbox)."""
        return None

    def command(self, launch_spec: Launch) -> tuple[list[str], Path, str]:
        """(command, the folder Popen starts it in, the container's working directory as the container sees it)."""
        cwd = launch_spec.pod_folder / "root" / launch_spec.working_dir.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        return launch_spec.argv, cwd, str(cwd)

    def join_pid(self, process: subprocess.Popen | None) -> int | None:
        """The process whose namespaces execs, probes and hooks join (None: they run as this machine's)."""
        return None


class IsolatedRuntime(PlainRuntime):
    """Linux namespaces: a pause process holds the pod's network and UTS namespaces; each container joins them
    and gets a mount namespace and root of its own (``launch.py``)."""

    isolated = True

    def sandbox_command(self, hostname: str) -> list[str] | None:
        tools = _pause_tools()
        if tools:  # util-linux's unshare: a couple of milliseconds; each container names the host as it joins
            setpriv, unshare, sleep = tools
            return [setpriv, "--pdeathsig", "KILL", "--", unshare, "--net", "--uts", "--", sleep, "infinity"]
        return launch.command({"mode": "pause", "hostname": hostname, "argv": ["sleep", "infinity"],
                               "env": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}})  # fmt: skip

    def command(self, launch_spec: Launch) -> tuple[list[str], Path, str]:
        folder = launch_spec.folder
        cwd = launch_spec.working_dir or "/"
        spec = {"mode": "run", "pod_pid": launch_spec.pause_pid, "hostname": launch_spec.hostname, "rootfs": str(folder / "rootfs"),
                "layers": str(folder / "layers"), "tmp": str(folder / "tmp"), "hide": launch_spec.hidden,
                "keep": kept_under_tmp(), "mounts": launch_spec.mounts, "cwd": cwd, "env": launch_spec.env,
                "nice": launch_spec.nice, "argv": launch_spec.argv, "error_file": str(folder / "start-error"),
                **({"tty": True} if launch_spec.tty else {})}  # fmt: skip
        return launch.command(spec, str(folder / "launch.spec")), folder, cwd

    def join_pid(self, process: subprocess.Popen | None) -> int | None:
        return process.pid if process is not None else None


def for_this_machine(isolated: bool) -> PlainRuntime:
    return IsolatedRuntime() if isolated else PlainRuntime()


@functools.cache
def _pause_tools() -> tuple[str, str, str] | None:
    found = tuple(shutil.which(tool) for tool in ("setpriv", "unshare", "sleep"))
    return found if all(found) else None  # type: ignore[return-value]


@functools.cache
def kept_under_tmp() -> list[str]:
    """Folders a container must see where this machine has them though they live under /tmp, which a
    container has a private one of: this Python, labkit itself (the course's apps) and its binaries."""
    folders = {sys.prefix, sys.base_prefix, str(Path(labkit.__file__).resolve().parents[1]), str(paths.cache_root())}
    return sorted(f for f in folders if f.startswith("/tmp/"))
