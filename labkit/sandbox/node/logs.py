"""Container logs in the CRI format the kubelet reads, and reading them back as `kubectl logs` shows them.

Each attempt of a container (its first start, then each restart) writes
``<pod dir>/logs/<container>/<restart>.log``, one line per line of output::

    2024-05-01T10:00:00.123456789Z stdout F hello
    2024-05-01T10:00:00.123456789Z stderr P the first 16 KiB of a very long line ...

— a timestamp taken when the line arrived, the stream, ``F`` for a full line or
``P`` for a fragment of a line longer than 16 KiB (containerd's
``max_container_log_line_size``), and the text. This is what containerd writes
and what the kubelet's log reader parses, so what `kubectl logs` shows (tail,
since, timestamps, byte limits, follow) behaves as on a real node.

Capture: a container's stdout and stderr are the write ends of two pipes. One
selector thread per agent process (not one per container) reads every pipe,
stamps each line as it arrives and appends it to the attempt's file; an attempt
ends when both pipes reach EOF (the process and anything it left holding them
have exited).

Size: as the kubelet's ``containerLogMaxSize`` (10 Mi) bounds a log file, an
attempt's file that reaches 10 MiB is rotated to ``<restart>.log.1`` (replacing
the previous rotation) and a new file is started; `kubectl logs` reads the
current file, as the kubelet does. Starting an attempt deletes all but the one
before it, as the kubelet's garbage collector keeps one dead container per
container. So a container's logs never exceed 2 attempts x 2 files x 10 MiB.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import selectors
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from labkit.sandbox.node.handoff import Handoff

MAX_LINE = 16 * 1024  # containerd's max_container_log_line_size: longer lines are split with the P tag
MAX_FILE_BYTES = 10 * 2**20  # the kubelet's containerLogMaxSize
READ_CHUNK = 64 * 1024
ATTEMPT_NAME = re.compile(r"^(\d+)\.log$")


def stamp(ns: int) -> bytes:
    """A CRI log timestamp: RFC 3339, UTC, always nine fractional digits (the kubelet's RFC3339NanoFixed).

    Fixed width makes timestamps of our files compare correctly as plain bytes, which is how
    ``--since`` is applied without parsing every line.
    """
    seconds, fraction = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % fraction


def _stamp_of(moment: dt.datetime) -> bytes:
    utc = moment.astimezone(dt.timezone.utc) if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
    return stamp(int(utc.timestamp()) * 10**9 + utc.microsecond * 1000)


def attempts(folder: Path) -> list[int]:
    """The attempts (restart counts) whose logs exist in a container's log folder, oldest first."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(ATTEMPT_NAME.match, names) if m)


def attempt_path(folder: Path, restart: int) -> Path:
    return folder / f"{restart}.log"


def rotated_path(path: Path) -> Path:
    """Where an attempt's full file goes when it is rotated (the one earlier file kept)."""
    return path.with_name(path.name + ".1")


# -- capture ----------------------------------------------------------------------------------

# Attempts whose pipes are still open, by file path: `follow` ends once its file is no longer here.
_writing: dict[Path, _Attempt] = {}
_writing_lock = threading.Lock()
# Notified whenever any attempt writes or ends; `_generation` lets followers wait without missing a write.
_changed = threading.Condition()
_generation = 0


def _notify() -> None:
    global _generation
    with _changed:
        _generation += 1
        _changed.notify_all()


class _Attempt:
    """The log file of one attempt, appended to by the capture thread; rotated at MAX_FILE_BYTES."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size
        self.streams = 0  # pipes still open
        self.closed = threading.Event()
        self.listeners: list[Callable[[bytes, bytes], None]] = []  # attached clients: (stream name, output)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.size += len(data)
        if self.size >= MAX_FILE_BYTES:
            os.close(self.fd)
            os.replace(self.path, rotated_path(self.path))
            self.fd = self._open()
            self.size = 0

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def stream_ended(self) -> None:
        with _writing_lock:
            self.streams -= 1
            if self.streams:
                return
            os.close(self.fd)
            _writing.pop(self.path, None)
        self.closed.set()


class _Stream:
    """One pipe (a container's stdout or stderr) and the unfinished line read from it so far."""

    def __init__(self, fd: int, name: bytes, attempt: _Attempt) -> None:
        self.fd = fd
        self.name = name
        self.attempt = attempt
        self.pending = b""

    def lines(self, chunk: bytes, at: bytes) -> bytes:
        """CRI lines for what a read returned; at EOF (empty chunk) an unfinished line is written as full."""
        data = self.pending + chunk
        cut = data.rfind(b"\n")
        complete = data[:cut].split(b"\n") if cut >= 0 else []
        self.pending = data[cut + 1 :]
        if not chunk and self.pending:
            complete.append(self.pending)
            self.pending = b""
        out = []
        for line in complete:
            while len(line) > MAX_LINE:
                out.append(b"%s %s P %s\n" % (at, self.name, line[:MAX_LINE]))
                line = line[MAX_LINE:]
            out.append(b"%s %s F %s\n" % (at, self.name, line))
        while len(self.pending) >= MAX_LINE:  # a line still growing: its first 16 KiB go out now
            out.append(b"%s %s P %s\n" % (at, self.name, self.pending[:MAX_LINE]))
            self.pending = self.pending[MAX_LINE:]
        return b"".join(out)


class Capture(threading.Thread):
    """The one thread that reads every container pipe of the agent and writes the log files (``start_new``, once
    per agent, handed to its nodes)."""

    @classmethod
    def start_new(cls) -> Capture:
        capture = cls()
        capture.start()
        return capture

    def __init__(self) -> None:
        super().__init__(name="container-logs", daemon=True)
        self.selector = selectors.DefaultSelector()
        self.incoming: Handoff[_Stream] = Handoff(self.selector)

    def add(self, stream: _Stream) -> None:
        """Hand a pipe to the thread (it registers it itself: the selector is only touched there)."""
        self.incoming.hand(stream)

    def run(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fd == self.incoming.read:
                    self._register()
                    continue
                try:
                    self._read(key.data)
                except Exception as exc:  # noqa: BLE001 - one bad pipe must not end every container's logs
                    print(f"container logs: {key.data.attempt.path}: {exc!r}; that stream is no longer captured",
                          flush=True)  # fmt: skip
                    self._end(key.data)

    def _register(self) -> None:
        for stream in self.incoming.take():
            self.selector.register(stream.fd, selectors.EVENT_READ, stream)

    def _read(self, stream: _Stream) -> None:
        try:
            chunk = os.read(stream.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        for listener in list(stream.attempt.listeners):
            listener(stream.name, chunk)  # never waits (see streaming.attach)
        data = stream.lines(chunk, stamp(time.time_ns()))
        try:
            if data:
                stream.attempt.write(data)
        except OSError:
            pass  # a full disk loses log lines, never the container
        if not chunk:
            self._end(stream)
        _notify()

    def _end(self, stream: _Stream) -> None:
        self.selector.unregister(stream.fd)
        os.close(stream.fd)
        stream.attempt.stream_ended()


class ContainerLog:
    """The log of one container: ``<pod dir>/logs/<container name>/<restart>.log`` per attempt."""

    def __init__(self, folder: Path, capture: Capture) -> None:
        self.folder = folder
        self.capture = capture  # the agent's
        self.attempt: _Attempt | None = None

    def open(self, restart: int) -> tuple[int, int]:
        """Start capturing attempt ``restart``; the write ends (stdout, stderr) to pass to Popen.

        The caller closes both after Popen: then the attempt ends when the container's processes do.
        """
        attempt = self._attempt(restart, 2)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        for fd, name in ((out_read, b"stdout"), (err_read, b"stderr")):
            os.set_blocking(fd, False)
            self.capture.add(_Stream(fd, name, attempt))
        return out_write, err_write

    def open_terminal(self, restart: int) -> tuple[int, int]:
        """As ``open`` for a container with ``tty``: a pseudo-terminal whose output is the attempt's stdout, as
        a runtime logs a terminal. (its inner side, for the container's three streams; the agent's side, for
        input and window sizes). The caller closes the inner side after Popen, and the agent's when done."""
        attempt = self._attempt(restart, 1)
        terminal, inner = os.openpty()
        reader = os.dup(terminal)
        os.set_blocking(reader, False)
        self.capture.add(_Stream(reader, b"stdout", attempt))
        return inner, terminal

    def listen(self, listener: Callable[[bytes, bytes], None]) -> Callable[[], None]:
        """Call ``listener(stream name, output)`` with what the current attempt prints from now on; the
        returned function stops it."""
        attempt = self.attempt
        if attempt is None:
            return lambda: None
        attempt.listeners.append(listener)
        return lambda: attempt.listeners.remove(listener) if listener in attempt.listeners else None

    def _attempt(self, restart: int, streams: int) -> _Attempt:
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in attempts(self.folder):
            if old < restart - 1:  # keep this attempt and the one before (`--previous`)
                current = attempt_path(self.folder, old)
                for path in (current, rotated_path(current)):
                    path.unlink(missing_ok=True)
        path = attempt_path(self.folder, restart)
        with _writing_lock:  # an attempt number tried again (after a failed start) appends to its file
            attempt = _writing.get(path) or _Attempt(path)
            _writing[path] = attempt
            attempt.streams += streams
        self.attempt = attempt
        return attempt

    def wait_closed(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until the current attempt's output is all in its file."""
        if self.attempt is not None:
            self.attempt.closed.wait(timeout)


def writing(path: Path) -> bool:
    """Whether an attempt's file is still being written (its container may print more)."""
    return path in _writing


# -- reading ----------------------------------------------------------------------------------


class _Renderer:
    """CRI lines to what the kubelet sends: ``--since``, ``--timestamps`` and ``--limit-bytes`` applied."""

    def __init__(self, since: dt.datetime | None, timestamps: bool, limit_bytes: int | None) -> None:
        self.since = _stamp_of(since) if since else None
        self.timestamps = timestamps
        self.remaining = limit_bytes
        self.new_line = True  # a timestamp prefixes the start of a line, not each fragment of it

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def render(self, lines: list[bytes]) -> bytes:
        out = []
        for raw in lines:
            if self.exhausted:
                break
            parts = raw.split(b" ", 3)
            if len(parts) < 4 or parts[1] not in (b"stdout", b"stderr"):
                continue  # not a CRI line (the kubelet logs and skips it too)
            when, _, tag, text = parts
            if self.since is not None and when < self.since:
                continue
            partial = tag.split(b":")[0] == b"P"
            if partial and text.endswith(b"\n"):
                text = text[:-1]
            line = when + b" " + text if self.timestamps and self.new_line else text
            self.new_line = text.endswith(b"\n") or not text
            if self.remaining is not None:
                line = line[: self.remaining]
                self.remaining -= len(line)
            out.append(line)
        return b"".join(out)


def _tail_start(handle, lines: int | None) -> int:  # noqa: ANN001 - a binary file
    """The offset where the last ``lines`` lines of the file begin (the kubelet's findTailLineStartIndex)."""
    end = handle.seek(0, os.SEEK_END)
    if lines is None:
        return 0
    if lines == 0:
        return end
    position, found = end, 0
    while position > 0:
        size = min(READ_CHUNK, position)
        position -= size
        handle.seek(position)
        block = handle.read(size)
        index = len(block)
        while (index := block.rfind(b"\n", 0, index)) >= 0:
            if position + index == end - 1:
                continue  # the last line's own terminator
            found += 1
            if found == lines:
                return position + index + 1
    return 0


def read(folder: Path, restart: int, *, tail: int | None, since: dt.datetime | None, timestamps: bool,
         limit_bytes: int | None) -> Iterator[bytes]:  # fmt: skip
    """Attempt ``restart``'s output as `kubectl logs` shows it, in chunks."""
    renderer = _Renderer(since, timestamps, limit_bytes)
    with open(attempt_path(folder, restart), "rb") as handle:
        handle.seek(_tail_start(handle, tail))
        while not renderer.exhausted:
            block = handle.read(READ_CHUNK)
            if not block:
                break
            block += handle.readline()  # whole lines only
            out = renderer.render(_split(block))
            if out:
                yield out


def follow(folder: Path, restart: int, *, tail: int | None, since: dt.datetime | None, timestamps: bool,
           limit_bytes: int | None, client_gone: Callable[[], bool] = lambda: False,
           poll: float = 1.0) -> Iterator[bytes]:  # fmt: skip
    """As ``read``, then each new line as it is written, until the attempt ends or ``client_gone()``.

    A rotated file is read to its end before the new one is opened, so no line is lost to a rotation.
    ``client_gone`` is asked every ``poll`` seconds while no line comes.
    """
    renderer = _Renderer(since, timestamps, limit_bytes)
    path = attempt_path(folder, restart)
    handle = open(path, "rb")
    try:
        handle.seek(_tail_start(handle, tail))
        pending = b""
        while not renderer.exhausted:
            seen = _generation
            active = writing(path)  # asked before reading: lines written before it ended are still read
            block = handle.read(READ_CHUNK)
            if block:
                lines = _split(pending + block)
                pending = lines.pop() if not lines[-1].endswith(b"\n") else b""
                out = renderer.render(lines)
                if out:
                    yield out
                continue
            if _rotated(handle, path):
                handle.close()
                handle = open(path, "rb")
                continue
            if not active:
                if pending:
                    yield renderer.render([pending])
                return
            if client_gone():
                return
            with _changed:
                if _generation == seen:
                    _changed.wait(poll)
    finally:
        handle.close()


def _split(data: bytes) -> list[bytes]:
    """Lines with their ``\\n`` (not ``bytes.splitlines``, which also splits at the ``\\r`` of progress bars)."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _rotated(handle, path: Path) -> bool:  # noqa: ANN001 - a binary file
    try:
        return os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
