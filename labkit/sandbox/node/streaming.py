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
import struct
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

from labkit.sandbox.node import runtime, spdy, websocket
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
    return Pump.take_over(handler, {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                                    "X-Stream-Protocol-Version": protocol})


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


def runtime_failure(reason: str) -> str:
    """What the API server passes on when the runtime cannot start an exec's command, in containerd's words."""
    return ("error executing command in container: failed to exec in container: OCI runtime exec failed: exec "
            f"failed: unable to start container process: {reason}: unknown")


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
    takes the container's own streams; either way an ``Attachment`` to read, write and wait on.
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
            return failure_status(runtime_failure(problem))
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
    except runtime.StartFailed as exc:
        raise Refused(500, runtime_failure(str(exc))) from None
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


@dataclass
class PodNetwork:
    """The pod a port-forward reaches into: its name and uid (for messages) and its network namespace."""

    pod: str
    uid: str
    pid: int | None  # a process in its network namespace; None: this machine's own (no namespaces here)


class Forward:
    """One client connection forwarded to ``port`` inside the pod's network (on localhost, as the runtime dials),
    copied both ways: ``out`` takes the port's bytes, ``fail`` a message when it cannot be reached, ``done`` is
    called once at the end. What the client sends is ``put``; ``put(None)`` when it has sent everything."""

    def __init__(self, network: PodNetwork, port: int, out: Callable[[bytes], bool], fail: Callable[[str], None],
                 done: Callable[[], None]) -> None:  # fmt: skip
        self.network = network
        self.port = port
        self.out, self.fail, self.done = out, fail, done
        self.input: queue.Queue[bytes | None] = queue.Queue()
        self.sock: socket.socket | None = None
        self.stopped = False

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"port-forward-{self.port}", daemon=True).start()

    def put(self, data: bytes | None) -> None:
        self.input.put(data)

    def stop(self) -> None:
        """The client has gone: end the connection to the port."""
        self.stopped = True
        self.input.put(None)
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        port, network = self.port, self.network
        try:
            sock = in_network(network.pid, socket.create_connection, ("127.0.0.1", port), DIAL_TIMEOUT)
        except OSError as exc:
            reason = exc.strerror.lower() if exc.strerror else str(exc)
            self.fail(f"error forwarding port {port} to pod {network.pod}, uid {network.uid}: failed to connect to "
                      f"localhost:{port} inside namespace of pod {network.pod}, IPv4: dial tcp4 127.0.0.1:{port}: "
                      f"connect: {reason}")  # fmt: skip
            self.done()
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        writer = threading.Thread(target=self._copy_in, daemon=True)
        writer.start()
        try:
            while not self.stopped:
                try:
                    chunk = sock.recv(READ_SIZE)
                except OSError:
                    chunk = b""
                if not chunk or not self.out(chunk):
                    break
        finally:
            self.done()
            writer.join(OUTPUT_DRAIN)
            sock.close()

    def _copy_in(self) -> None:
        while True:
            chunk = self.input.get()
            try:
                if chunk is None:
                    self.sock.shutdown(socket.SHUT_WR)
                    return
                self.sock.sendall(chunk)
            except OSError:
                return


def port_number(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


class _Request:
    """One port-forward connection of a SPDY session: its two streams, as they arrive, and its forward."""

    def __init__(self) -> None:
        self.streams: dict[str, spdy.Stream] = {}
        self.data_here = threading.Event()
        self.forward: Forward | None = None
        self.finished = False


class PortForwardSession:
    """Port-forward on one SPDY connection: each pair of streams (``error``, then ``data``) with one
    ``requestID`` is one connection to the ``port`` they name. The port is dialled as soon as the first stream
    of a pair names it: kubectl waits for that stream's reply before it opens the other."""

    def __init__(self, network: PodNetwork) -> None:
        self.network = network
        self.connection: spdy.Connection | None = None
        self.requests: dict[str, _Request] = {}
        self.lock = threading.Lock()

    def opened(self, stream: spdy.Stream) -> None:
        self.connection.accept(stream)
        key = stream.headers.get("requestid", "")
        with self.lock:
            request = self.requests.setdefault(key, _Request())
            request.streams[stream.kind] = stream
            first, finished = request.forward is None and not request.finished, request.finished
        if stream.kind == "data":
            stream.session_data["request"] = request
            request.data_here.set()
        if finished:  # it failed before this stream came: nothing to carry
            self.connection.finish(stream)
            self._forget(key, request)
        elif first:
            self._begin(key, request, stream)

    def _begin(self, key: str, request: _Request, stream: spdy.Stream) -> None:
        connection = self.connection

        def out(chunk: bytes) -> bool:  # a port that speaks first waits for the data stream
            return request.data_here.wait(STREAM_CREATION_TIMEOUT) and connection.write(request.streams["data"], chunk)

        def fail(message: str) -> None:
            if "error" in request.streams:
                connection.write(request.streams["error"], message.encode())

        def done() -> None:
            with self.lock:
                request.finished = True
                streams = list(request.streams.values())
            for each in streams:
                connection.finish(each)
            self._forget(key, request)

        port = port_number(stream.headers.get("port", ""))
        if port is None:
            fail(f"invalid port {stream.headers.get('port', '')!r}")
            done()
            return
        request.forward = Forward(self.network, port, out, fail, done)
        request.forward.start()

    def _forget(self, key: str, request: _Request) -> None:
        with self.lock:
            if request.finished and len(request.streams) == 2 and self.requests.get(key) is request:
                del self.requests[key]

    def received(self, stream: spdy.Stream, data: bytes) -> None:
        request = stream.session_data.get("request")
        if request is not None and request.forward is not None:
            request.forward.put(data)

    def ended(self, stream: spdy.Stream) -> None:
        request = stream.session_data.get("request")
        if request is not None and request.forward is not None:
            request.forward.put(None)

    def gone(self) -> None:
        with self.lock:
            forwards = [r.forward for r in self.requests.values() if r.forward is not None]
        for forward in forwards:
            forward.stop()


class WebSocketPortForward:
    """Port-forward on one WebSocket connection (``?ports=8080,9090``, channel protocol v4): one connection per
    port asked for, opened at once; each channel's first message is its port (2 bytes, little-endian). The
    connection ends when every port's has."""

    PROTOCOLS = ("v4.channel.k8s.io", "channel.k8s.io")

    def __init__(self, network: PodNetwork, ports: list[int]) -> None:
        self.network = network
        self.ports = ports
        self.connection: websocket.Connection | None = None
        self.forwards: list[Forward] = []
        self.remaining = len(ports)
        self.lock = threading.Lock()

    @staticmethod
    def parse_ports(query: str) -> list[int]:
        query_values = urllib.parse.parse_qs(query)  # the API server passes ``ports`` on as ``port``
        values = query_values.get("port", []) + query_values.get("ports", [])
        texts = [text.strip() for value in values for text in value.split(",") if text.strip()]
        ports = [port_number(text) for text in texts]
        if not texts or None in ports:
            raise Refused(400, f"invalid port in {texts}: ports must be 1 to 65535\n" if texts else
                          "query parameter \"port\" is required\n")  # fmt: skip
        return ports  # type: ignore[return-value]

    def begin(self) -> None:
        connection = self.connection
        for index, port in enumerate(self.ports):
            data, error = 2 * index, 2 * index + 1
            for channel in (data, error):
                connection.send(bytes([channel]) + struct.pack("<H", port))
            forward = Forward(self.network, port, lambda chunk, c=data: connection.send(bytes([c]) + chunk),
                              lambda message, c=error: connection.send(bytes([c]) + message.encode()), self._done)  # fmt: skip
            self.forwards.append(forward)
            forward.start()

    def _done(self) -> None:
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.connection.close()

    def received(self, message: bytes) -> None:
        if not message:
            return
        index, rest = divmod(message[0], 2)
        if rest == 0 and index < len(self.forwards) and len(message) > 1:
            self.forwards[index].put(message[1:])

    def gone(self) -> None:
        for forward in self.forwards:
            forward.stop()


def serve_websocket(pump: Pump, session: WebSocketPortForward) -> None:
    connection = websocket.Connection(pump, session)
    session.connection = connection
    session.begin()
    pump.run(connection.feed)
