"""exec, attach and port-forward on the kubelet API, as the kubelet's streaming server serves them.

The API server turns ``kubectl exec``, ``attach``, ``cp`` (an exec of ``tar``) and
``port-forward`` into an upgrade request to the pod's node:

* ``POST /exec/{namespace}/{pod}/{container}?command=..&input=1&output=1&error=1&tty=1``
* ``POST /attach/{namespace}/{pod}/{container}?input=1&output=1&error=1&tty=1``
* ``POST /portForward/{namespace}/{pod}``

with ``Upgrade: SPDY/3.1`` and the stream protocols it speaks in
``X-Stream-Protocol-Version`` (``v5.channel.k8s.io`` and ``v4.channel.k8s.io`` for
exec and attach, ``portforward.k8s.io``). After ``101 Switching Protocols`` the
client opens one SPDY stream per channel (``spdy.py``):

* exec and attach: ``error``, and ``stdin``, ``stdout``, ``stderr`` and ``resize`` as
  the options ask (a terminal has no stderr). Output goes out as it comes; at the end
  the ``error`` stream carries a ``metav1.Status``: Success, or Failure with reason
  ``NonZeroExitCode`` and the exit code as an ``ExitCode`` cause, which kubectl turns
  into its own exit code.
* port-forward: per connection a ``data`` and an ``error`` stream with the same
  ``requestID`` and the ``port``; the node connects to that port inside the pod's
  network (as the runtime does, on localhost) and copies both ways; a port nothing
  listens on is text on the ``error`` stream, which kubectl prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

from labkit.sandbox.node import runtime, spdy
from labkit.sandbox.node.namespaces import in_network
from labkit.sandbox.node.upgraded import Pump

EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORT_FORWARD_PROTOCOL = "portforward.k8s.io"
STREAM_CREATION_TIMEOUT = 30.0  # the kubelet's: all the streams a request asks for, within this
OUTPUT_DRAIN = 2.0  # after an exec's process ends, its output is passed on for at most this long more
DIAL_TIMEOUT = 5.0
READ_SIZE = 256 << 10
ATTACH_BUFFER = 1 << 20  # output an attached client may fall behind by
F_SETPIPE_SZ = 1031


class Refused(Exception):
    """The request cannot be served: its HTTP status and the kubelet's message (before any upgrade)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Options:
    """What an exec or attach asks for (the kubelet's ``remotecommand.Options``)."""

    command: list[str]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def parse(cls, query: str) -> Options:
        values = urllib.parse.parse_qs(query, keep_blank_values=True)

        def flag(name: str) -> bool:
            return values.get(name, ["false"])[0].lower() in ("1", "true")

        options = cls(values.get("command", []), flag("input"), flag("output"), flag("error"), flag("tty"))
        if options.tty:
            options.stderr = False  # a terminal's output is one stream
        if not (options.stdin or options.stdout or options.stderr):
            raise Refused(400, "you must specify at least 1 of stdin, stdout, stderr\n")
        return options

    def streams(self) -> set[str]:
        wanted = {"error"}
        for kind, on in (("stdin", self.stdin), ("stdout", self.stdout), ("stderr", self.stderr), ("resize", self.tty)):
            if on:
                wanted.add(kind)
        return wanted


def offered_protocols(headers: Any) -> list[str]:
    return [p.strip() for value in headers.get_all("X-Stream-Protocol-Version") or [] for p in value.split(",")
            if p.strip()]  # fmt: skip


def negotiate(offered: list[str], supported: tuple[str, ...]) -> str:
    for protocol in offered:
        if protocol in supported:
            return protocol
    raise Refused(403, f"unable to upgrade: unable to negotiate protocol: client supports {offered}, server "
                  f"supports {list(supported)}\n")  # fmt: skip


def upgrade(handler: Any, protocol: str) -> Pump:
    """Answer ``101 Switching Protocols`` for SPDY/3.1 and take the connection over from ``http.server``."""
    if handler.headers.get("Upgrade", "").lower() != "spdy/3.1":
        raise Refused(400, "unable to upgrade: missing upgrade headers in request: the node speaks SPDY/3.1\n")
    handler.send_response(101, "Switching Protocols")
    handler.send_header("Connection", "Upgrade")
    handler.send_header("Upgrade", "SPDY/3.1")
    handler.send_header("X-Stream-Protocol-Version", protocol)
    handler.end_headers()
    handler.wfile.flush()
    handler.close_connection = True
    sock = handler.request
    sock.setblocking(False)
    try:  # what the client sent right after its request, already read into http.server's buffer
        leftover = handler.rfile.read1(1 << 16) or b""
    except (ssl.SSLWantReadError, BlockingIOError, OSError):
        leftover = b""
    return Pump(sock, leftover)


def serve(pump: Pump, session: Any) -> None:
    """Run one upgraded SPDY connection for ``session`` until it ends."""
    connection = spdy.Connection(pump, session)
    session.connection = connection
    pump.run(connection.feed)


# -- exec and attach -----------------------------------------------------------------------------


def exit_status(code: int, command: list[str]) -> dict:
    """The ``metav1.Status`` an exec ends with, as the kubelet writes it on the error stream."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command {command_text(command)}, "
                       f"exit code {code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}  # fmt: skip


def failure_status(message: str) -> dict:
    return {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError", "code": 500}


def command_text(command: list[str]) -> str:
    return "[" + " ".join(command) + "]"


class _Terminal:
    """Window sizes sent on the ``resize`` stream: a series of JSON objects ``{"Width": w, "Height": h}``."""

    def __init__(self) -> None:
        self.buffer = ""
        self.size: tuple[int, int] | None = None

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        self.buffer += data.decode(errors="replace")
        sizes = []
        decoder = json.JSONDecoder()
        while self.buffer.strip():
            text = self.buffer.lstrip()
            try:
                value, end = decoder.raw_decode(text)
            except ValueError:
                break
            self.buffer = text[end:]
            if isinstance(value, dict):
                size = (int(value.get("Width") or 0), int(value.get("Height") or 0))
                if size[0] > 0 and size[1] > 0:
                    self.size = size
                    sizes.append(size)
        return sizes


class ChannelSession:
    """An exec or attach on one SPDY connection: its streams, then the process's input, output and end.

    ``begin`` is what the request does once every stream is there: an exec starts its command, an attach
    takes the container's own streams; either returns a ``runtime.Started``-like object and a wait function.
    """

    def __init__(self, options: Options, begin: Callable[[], "Attachment"], log: Callable[[str], None]) -> None:
        self.options = options
        self.begin = begin
        self.log = log
        self.connection: spdy.Connection | None = None
        self.streams: dict[str, spdy.Stream] = {}
        self.wanted = options.streams()
        self.input: queue.Queue[bytes | None] = queue.Queue()
        self.terminal = _Terminal()
        self.attachment: Attachment | None = None
        self.lock = threading.Lock()
        self.started = False
        self.finished = threading.Event()
        self.timer = threading.Timer(STREAM_CREATION_TIMEOUT, self._too_slow)
        self.timer.daemon = True
        self.timer.start()

    # spdy.Handler: called in the connection's thread, so none of these may wait

    def opened(self, stream: spdy.Stream) -> None:
        self.connection.accept(stream)
        self.streams[stream.kind] = stream
        if self.wanted <= set(self.streams) and not self.started:
            self.started = True
            self.timer.cancel()
            threading.Thread(target=self._run, name="exec", daemon=True).start()

    def received(self, stream: spdy.Stream, data: bytes) -> None:
        if stream.kind == "stdin":
            self.input.put(data)
        elif stream.kind == "resize":
            for width, height in self.terminal.feed(data):
                with self.lock:
                    if self.attachment is not None:
                        self.attachment.resize(width, height)

    def ended(self, stream: spdy.Stream) -> None:
        if stream.kind == "stdin":
            self.input.put(None)

    def gone(self) -> None:
        self.timer.cancel()
        self.input.put(None)
        with self.lock:
            if self.attachment is not None and not self.finished.is_set():
                self.attachment.abandon()

    # the session's own thread

    def _too_slow(self) -> None:
        missing = sorted(self.wanted - set(self.streams))
        self.log(f"exec: timed out waiting for streams {missing}")
        self.connection.close()

    def _run(self) -> None:
        try:
            attachment = self.begin()
        except Refused as refusal:
            self._end(failure_status(str(refusal).strip()))
            return
        with self.lock:
            self.attachment = attachment
            if self.terminal.size:
                attachment.resize(*self.terminal.size)
        pumps = [threading.Thread(target=self._copy_out, args=(fd, kind), daemon=True)
                 for kind, fd in (("stdout", attachment.stdout), ("stderr", attachment.stderr))
                 if fd is not None and kind in self.streams]  # fmt: skip
        for thread in pumps:
            thread.start()
        threading.Thread(target=self._copy_in, args=(attachment,), daemon=True).start()
        status = attachment.wait()
        for thread in pumps:
            thread.join(OUTPUT_DRAIN)
        self._end(status)
        attachment.close()

    def _copy_out(self, fd: int, kind: str) -> None:
        stream = self.streams[kind]
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except OSError:  # a terminal whose other side has closed: EIO
                chunk = b""
            if not chunk or not self.connection.write(stream, chunk):
                return

    def _copy_in(self, attachment: Attachment) -> None:
        while True:
            data = self.input.get()
            if data is None or not attachment.write(data):
                attachment.close_input()
                return

    def _end(self, status: dict) -> None:
        self.finished.set()
        connection = self.connection
        if "error" in self.streams:
            connection.write(self.streams["error"], json.dumps(status).encode())
        for stream in self.streams.values():
            connection.finish(stream)
        connection.close()


class Attachment:
    """The streams an exec or attach reads and writes, however they were made."""

    stdout: int | None = None
    stderr: int | None = None

    def write(self, data: bytes) -> bool:
        raise NotImplementedError

    def close_input(self) -> None:
        raise NotImplementedError

    def resize(self, width: int, height: int) -> None:
        raise NotImplementedError

    def wait(self) -> dict:
        """Wait for the end; the status to send."""
        raise NotImplementedError

    def abandon(self) -> None:
        """The client went away before the end."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class ExecAttachment(Attachment):
    """A new process in the container (``runtime.start``), its exit code the session's end."""

    def __init__(self, started: runtime.Started, command: list[str], joined: runtime.Joined) -> None:
        self.started = started
        self.command = command
        self.joined = joined
        self.stdout, self.stderr = started.stdout, started.stderr
        self.input_closed = False
        joined.add("exec", started.process)

    def write(self, data: bytes) -> bool:
        # input nobody reads is dropped, as a runtime does for an exec without stdin
        return self.started.stdin is None or runtime.write_all(self.started.stdin, data)

    def close_input(self) -> None:
        if self.started.stdin is not None and not self.input_closed and self.started.terminal is None:
            self.input_closed = True
            os.close(self.started.stdin)
            self.started.stdin = None

    def resize(self, width: int, height: int) -> None:
        try:
            self.started.resize(width, height)
        except OSError:
            pass

    def wait(self) -> dict:
        code = self.started.process.wait()
        self.joined.remove(self.started.process)
        problem = self.started.start_error()
        if code == 127 and problem:
            if "No such file or directory" in problem and problem.startswith("exec:"):
                problem = problem.split(":", 2)
                problem = f"{problem[0]}:{problem[1]}: executable file not found in $PATH"
            return failure_status("error executing command in container: failed to exec in container: OCI runtime "
                                  f"exec failed: exec failed: unable to start container process: {problem}: unknown")  # fmt: skip
        return exit_status(code if code >= 0 else 128 - code, self.command)

    def abandon(self) -> None:
        self.started.kill()  # a client that hangs up takes its command with it

    def close(self) -> None:
        self.started.close()


def start_exec(target: runtime.Target, joined: runtime.Joined, options: Options) -> ExecAttachment:
    if not options.command:
        raise Refused(400, "you must specify at least one command for the container")
    try:
        started = runtime.start(target, options.command, stdin=options.stdin, stdout=options.stdout,
                                stderr=options.stderr, tty=options.tty)  # fmt: skip
    except OSError as exc:
        raise Refused(500, f"failed to exec in container: {exc}") from None
    return ExecAttachment(started, options.command, joined)


class AttachAttachment(Attachment):
    """The container's own process: its stdin (or terminal) and what it prints from now on, until it ends."""

    def __init__(self, container: Any, options: Options) -> None:
        self.console: runtime.Console | None = container.console
        self.attempt_closed = container.log.attempt.closed if container.log and container.log.attempt else None
        self.gone = threading.Event()
        self.lock = threading.Lock()  # the capture thread writes while the session detaches
        self.writers: dict[bytes, int] = {}
        for name, wanted in ((b"stdout", options.stdout), (b"stderr", options.stderr)):
            if not wanted:
                continue
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            try:
                fcntl.fcntl(write_end, F_SETPIPE_SZ, ATTACH_BUFFER)
            except OSError:
                pass
            self.writers[name] = write_end
            setattr(self, name.decode(), read_end)
        if not options.stderr and b"stdout" in self.writers:
            self.writers[b"stderr"] = self.writers[b"stdout"]  # a terminal's one stream
        self.stop_listening = container.log.listen(self._heard) if container.log else (lambda: None)

    def _heard(self, name: bytes, output: bytes) -> None:
        """Called by the log capture thread: must never wait. A client that falls more than the pipe's size
        behind loses output, as a slow reader of a runtime's attach does."""
        with self.lock:
            fd = self.writers.get(name)
            if fd is None or not output:
                return
            try:
                os.write(fd, output)
            except OSError:
                pass

    def write(self, data: bytes) -> bool:
        return self.console is None or self.console.write(data)

    def close_input(self) -> None:
        if self.console is not None and self.console.once:
            self.console.close_stdin()

    def resize(self, width: int, height: int) -> None:
        if self.console is not None:
            try:
                self.console.resize(width, height)
            except OSError:
                pass

    def wait(self) -> dict:
        while not self.gone.is_set() and self.attempt_closed is not None and not self.attempt_closed.wait(0.5):
            pass
        self._detach()
        return {"metadata": {}, "status": "Success"}

    def abandon(self) -> None:
        self.close_input()
        self.gone.set()

    def _detach(self) -> None:
        self.stop_listening()
        with self.lock:
            for fd in set(self.writers.values()):
                os.close(fd)
            self.writers = {}


def attach(container: Any, options: Options) -> AttachAttachment:
    if options.stdin and (container.console is None or container.console.stdin is None):
        raise Refused(400, f"container {container.name} does not have stdin open (stdin: true in its spec)")
    return AttachAttachment(container, options)


# -- port-forward --------------------------------------------------------------------------------


class PortForwardSession:
    """Port-forward on one SPDY connection: each pair of streams (``data``, ``error``) one connection to a port."""

    def __init__(self, pod: str, uid: str, network_pid: int | None, log: Callable[[str], None]) -> None:
        self.pod = pod
        self.uid = uid
        self.network_pid = network_pid
        self.log = log
        self.connection: spdy.Connection | None = None
        self.pairs: dict[str, dict[str, spdy.Stream]] = {}
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()

    def opened(self, stream: spdy.Stream) -> None:
        self.connection.accept(stream)
        request = stream.headers.get("requestid", "")
        pair = self.pairs.setdefault(request, {})
        pair[stream.kind] = stream
        if stream.kind == "data":
            stream.session_data["input"] = queue.Queue()
        if {"data", "error"} <= set(pair):
            threading.Thread(target=self._forward, args=(pair,), name="port-forward", daemon=True).start()

    def received(self, stream: spdy.Stream, data: bytes) -> None:
        if stream.kind == "data":
            stream.session_data["input"].put(data)

    def ended(self, stream: spdy.Stream) -> None:
        if stream.kind == "data":
            stream.session_data["input"].put(None)

    def gone(self) -> None:
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for pair in self.pairs.values():
            if "data" in pair:
                pair["data"].session_data["input"].put(None)

    def _forward(self, pair: dict[str, spdy.Stream]) -> None:
        data, error = pair["data"], pair["error"]
        connection = self.connection
        self.pairs.pop(data.headers.get("requestid", ""), None)
        text = data.headers.get("port", "")
        if not text.isdigit() or not 0 < int(text) < 65536:
            connection.write(error, f"invalid port {text!r}".encode())
            return self._finish(pair)
        port = int(text)
        try:
            sock = in_network(self.network_pid, socket.create_connection, ("127.0.0.1", port), DIAL_TIMEOUT)
        except OSError as exc:
            reason = exc.strerror.lower() if exc.strerror else str(exc)
            message = (f"error forwarding port {port} to pod {self.pod}, uid {self.uid}: failed to connect to "
                       f"localhost:{port} inside namespace of pod {self.pod}, IPv4: dial tcp4 127.0.0.1:{port}: "
                       f"connect: {reason}")  # fmt: skip
            connection.write(error, message.encode())
            return self._finish(pair)
        sock.settimeout(None)
        with self.lock:
            self.sockets.add(sock)
        writer = threading.Thread(target=self._copy_in, args=(data, sock), daemon=True)
        writer.start()
        try:
            while True:
                try:
                    chunk = sock.recv(READ_SIZE)
                except OSError:
                    chunk = b""
                if not chunk or not connection.write(data, chunk):
                    break
        finally:
            self._finish(pair)
            writer.join(OUTPUT_DRAIN)
            with self.lock:
                self.sockets.discard(sock)
            sock.close()

    @staticmethod
    def _copy_in(stream: spdy.Stream, sock: socket.socket) -> None:
        incoming: queue.Queue = stream.session_data["input"]
        while True:
            chunk = incoming.get()
            try:
                if chunk is None:
                    sock.shutdown(socket.SHUT_WR)
                    return
                sock.sendall(chunk)
            except OSError:
                return

    def _finish(self, pair: dict[str, spdy.Stream]) -> None:
        for stream in pair.values():
            self.connection.finish(stream)
