"""One upgraded connection of the kubelet API (SPDY or WebSocket), driven by one thread.

After ``101 Switching Protocols`` the connection carries frames both ways at once: a
process's output goes out while its input comes in. An ``ssl.SSLSocket`` must not
be read and written by two threads at the same time, so one thread (the request's)
does both, with ``select``: it reads whatever arrives and hands it to the protocol's
``feed``, and writes what the other threads queued with ``send``. A producer that
runs ahead of a slow client waits (``OUTBOUND_LIMIT``), so memory stays bounded.
"""

from __future__ import annotations

import os
import select
import ssl
import threading
from typing import Any, Callable

READ_SIZE = 256 << 10
WRITE_SIZE = 256 << 10
OUTBOUND_LIMIT = 4 << 20  # bytes queued for the client before producers wait
IDLE_WAKEUP = 30.0


class Pump:
    """The socket of one upgraded connection: ``run(feed)`` in the request's thread, ``send`` from any."""

    def __init__(self, sock: ssl.SSLSocket, leftover: bytes = b"") -> None:
        self.sock = sock
        self.leftover = leftover
        self.outbound = bytearray()
        self.room = threading.Condition()
        self.closing = False  # close once what is queued has gone out
        self.gone = False  # the client hung up, or the connection failed: nothing more goes out
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)

    @classmethod
    def take_over(cls, handler: Any, headers: dict[str, str]) -> Pump:
        """Answer ``101 Switching Protocols`` with ``headers`` to ``handler``'s request (an ``http.server``
        handler) and take its connection over, with what the client sent after its request."""
        handler.send_response(101, "Switching Protocols")
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.flush()
        handler.close_connection = True
        sock = handler.request
        sock.setblocking(False)
        try:  # already read into http.server's buffer, if anything
            leftover = handler.rfile.read1(1 << 16) or b""
        except (ssl.SSLWantReadError, BlockingIOError, OSError):
            leftover = b""
        return cls(sock, leftover)

    def send(self, data: bytes) -> bool:
        """Queue ``data`` (one whole frame) for the client; waits while too much is queued. False once gone."""
        with self.room:
            while len(self.outbound) > OUTBOUND_LIMIT and not self.gone:
                self.room.wait(1.0)
            if self.gone or self.closing:
                return False
            self.outbound += data
        self._wake()
        return True

    def close(self) -> None:
        """End the connection once what is queued has been written."""
        with self.room:
            self.closing = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.wake_write, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already, or the pump has ended

    def run(self, feed: Callable[[bytes], None]) -> None:
        """Serve the connection until it ends; ``feed(b"")`` tells the protocol the client has gone."""
        self.sock.setblocking(False)
        try:
            if self.leftover:
                feed(self.leftover)
            while self._turn(feed):
                pass
        except (OSError, ssl.SSLError):
            pass
        finally:
            with self.room:
                self.gone = True
                self.room.notify_all()
            feed(b"")
            for fd in (self.wake_read, self.wake_write):
                os.close(fd)

    def _turn(self, feed: Callable[[bytes], None]) -> bool:
        with self.room:
            pending = bool(self.outbound)
            if self.closing and not pending:
                return False
        if not self.sock.pending():  # (decrypted bytes waiting in the TLS layer are not seen by select)
            readable, _, _ = select.select([self.sock, self.wake_read], [self.sock] if pending else [], [], IDLE_WAKEUP)
        else:
            readable = [self.sock]
        if self.wake_read in readable:
            try:
                while os.read(self.wake_read, 4096):
                    pass
            except BlockingIOError:
                pass
        if self.sock in readable and not self._read(feed):
            return False
        if pending:
            self._write()
        return True

    def _read(self, feed: Callable[[bytes], None]) -> bool:
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return True
            if not data:
                return False
            feed(data)
            if not self.sock.pending():
                return True

    def _write(self) -> None:
        with self.room:
            chunk = bytes(self.outbound[:WRITE_SIZE])
        try:
            written = self.sock.send(chunk)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        with self.room:
            del self.outbound[:written]
            self.room.notify_all()


class Framed:
    """A protocol on a pump (SPDY, WebSocket): bytes in through ``feed``, parsed as they complete (``parse``);
    ``feed(b"")`` (the connection ended) tells the handler once."""

    def __init__(self, pump: Pump, handler: Any) -> None:
        self.pump = pump
        self.handler = handler
        self.buffer = bytearray()
        self.ended = False

    def feed(self, data: bytes) -> None:
        if not data:
            if not self.ended:
                self.ended = True
                self.handler.gone()
            return
        self.buffer += data
        self.parse()

    def parse(self) -> None:
        raise NotImplementedError
