"""SPDY/3.1, the server's side, as the API server speaks it to a kubelet for exec, attach and port-forward.

The client (the API server, or kubectl through it) opens the streams, each with a
header block naming what it carries (``streamType``: stdin, stdout, stderr, error,
resize; ``data`` and ``error`` with ``port`` and ``requestID`` for port-forward);
the server accepts each with a SYN_REPLY and then both sides send data frames, a
FIN flag closing a stream's direction. Header blocks are zlib streams primed with
the protocol's dictionary, one compression context per direction for the whole
connection. Like the Go implementation these clients use, flow control is not
enforced: WINDOW_UPDATE and SETTINGS are read and ignored.

``Connection`` parses what ``upgraded.Pump`` reads and frames what the sessions write;
the session (``streaming.py``) is told of new streams, their data, their ends.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Protocol

from labkit.sandbox.node.upgraded import Framed, Pump

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
CANCEL, INTERNAL_ERROR = 5, 6
DATA_CHUNK = 32 << 10

# The header compression dictionary of SPDY/3 (draft-mbelshe-httpbis-spdy-00, 2.6.10.1): these names,
# each with a 4-byte length before it, then the literal tail.
_WORDS = ("options head post put delete trace accept accept-charset accept-encoding accept-language "
          "accept-ranges age allow authorization cache-control connection content-base content-encoding "
          "content-language content-length content-location content-md5 content-range content-type date etag "
          "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
          "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
          "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
          "method get status").split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie",
                                           "keep-alive", "origin"]  # fmt: skip
_TAIL = (b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
         b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
         b"403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
         b"Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
         b"chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
         b"text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL


class ProtocolError(Exception):
    pass


@dataclass(eq=False)
class Stream:
    id: int
    headers: dict[str, str]
    ended_by_client: bool = False
    ended_by_server: bool = False
    session_data: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.headers.get("streamtype", "")


class Handler(Protocol):
    def opened(self, stream: Stream) -> None: ...
    def received(self, stream: Stream, data: bytes) -> None: ...
    def ended(self, stream: Stream) -> None: ...  # the client closed its side (FIN) or reset the stream
    def gone(self) -> None: ...  # the connection ended


def encode_headers(headers: dict[str, str]) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        for part in (name.lower().encode(), value.encode()):
            out.append(struct.pack(">I", len(part)) + part)
    return b"".join(out)


def decode_headers(block: bytes) -> dict[str, str]:
    try:
        (count,), at = struct.unpack_from(">I", block), 4
        headers = {}
        for _ in range(count):
            (size,) = struct.unpack_from(">I", block, at)
            name = block[at + 4 : at + 4 + size].decode()
            at += 4 + size
            (size,) = struct.unpack_from(">I", block, at)
            headers[name] = block[at + 4 : at + 4 + size].decode().split("\0")[0]
            at += 4 + size
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad header block: {exc}") from None
    return headers


def control(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


class Connection(Framed):
    """One SPDY/3.1 connection, server side: frames in through ``feed``, out through the pump."""

    def __init__(self, pump: Pump, handler: Handler) -> None:
        super().__init__(pump, handler)
        self.streams: dict[int, Stream] = {}
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                        zdict=DICTIONARY)  # fmt: skip
        self.writing = threading.Lock()  # the outgoing compression context follows the order frames go out in

    # -- in ------------------------------------------------------------------------------------

    def parse(self) -> None:
        at = 0
        try:
            while len(self.buffer) - at >= 8:
                (length,) = struct.unpack_from(">I", self.buffer, at + 4)
                flags, length = length >> 24, length & 0xFFFFFF
                if len(self.buffer) - at < 8 + length:
                    break
                head = self.buffer[at : at + 4]
                payload = bytes(self.buffer[at + 8 : at + 8 + length])
                at += 8 + length
                if head[0] & 0x80:
                    self._control(struct.unpack(">H", head[2:4])[0], flags, payload)
                else:
                    self._data(struct.unpack(">I", head)[0] & 0x7FFFFFFF, flags, payload)
        except ProtocolError:
            self.pump.close()
        del self.buffer[:at]

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == SYN_STREAM:
            stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
            try:
                block = self.inflate.decompress(payload[10:])
            except zlib.error as exc:
                raise ProtocolError(f"header block: {exc}") from None
            stream = Stream(stream_id, decode_headers(block))
            self.streams[stream_id] = stream
            self.handler.opened(stream)
            if flags & FLAG_FIN:
                self._end(stream)
        elif kind == RST_STREAM:
            stream = self.streams.get(struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF)
            if stream is not None:
                stream.ended_by_server = True  # nothing more may be sent on a reset stream
                self._end(stream)
        elif kind == PING:
            self.pump.send(control(PING, 0, payload))
        elif kind == GOAWAY:
            self.pump.close()
        elif kind == HEADERS:
            try:
                self.inflate.decompress(payload[4:])  # keeps the context in step; nothing the sessions need
            except zlib.error as exc:
                raise ProtocolError(f"header block: {exc}") from None
        # SETTINGS, WINDOW_UPDATE and NOOP: nothing to do

    def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if payload:
            self.handler.received(stream, payload)
        if flags & FLAG_FIN:
            self._end(stream)

    def _end(self, stream: Stream) -> None:
        if not stream.ended_by_client:
            stream.ended_by_client = True
            self.handler.ended(stream)

    # -- out -----------------------------------------------------------------------------------

    def accept(self, stream: Stream) -> None:
        """SYN_REPLY: the stream is taken (with no headers, as the kubelet replies)."""
        with self.writing:
            block = self.deflate.compress(encode_headers({})) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
            self.pump.send(control(SYN_REPLY, 0, struct.pack(">I", stream.id) + block))

    def write(self, stream: Stream, data: bytes) -> bool:
        """Send ``data`` on ``stream`` (in frames of at most 32 KiB); False if the client is gone or reset it."""
        view = memoryview(data)
        while view:
            if stream.ended_by_server or not self.pump.send(data_frame(stream.id, bytes(view[:DATA_CHUNK]))):
                return False
            view = view[DATA_CHUNK:]
        return True

    def finish(self, stream: Stream) -> None:
        """Close the server's side of ``stream`` (an empty frame with FIN)."""
        if not stream.ended_by_server:
            stream.ended_by_server = True
            self.pump.send(data_frame(stream.id, b"", fin=True))

    def reset(self, stream: Stream, status: int = CANCEL) -> None:
        if not stream.ended_by_server:
            stream.ended_by_server = True
            self.pump.send(control(RST_STREAM, 0, struct.pack(">II", stream.id, status)))

    def close(self) -> None:
        """GOAWAY, then the connection ends once it is written."""
        last = max(self.streams, default=0)
        self.pump.send(control(GOAWAY, 0, struct.pack(">II", last, 0)))
        self.pump.close()
