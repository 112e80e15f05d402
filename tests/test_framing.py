"""The node's SPDY/3.1 and WebSocket framing, frame by frame, without a cluster (the whole path is test_streaming)."""

from __future__ import annotations

import os
import struct
import zlib

from labkit.sandbox.node import spdy, websocket


class FakePump:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> bool:
        self.sent.append(data)
        return True

    def close(self) -> None:
        self.closed = True


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def opened(self, stream: spdy.Stream) -> None:
        self.seen.append(("opened", stream.id, stream.kind, dict(stream.headers)))

    def received(self, *args: object) -> None:
        self.seen.append(("received", *(a.id if isinstance(a, spdy.Stream) else a for a in args)))

    def ended(self, stream: spdy.Stream) -> None:
        self.seen.append(("ended", stream.id))

    def gone(self) -> None:
        self.seen.append(("gone",))


def syn_stream(deflate: zlib._Compress, stream_id: int, headers: dict[str, str], fin: bool = False) -> bytes:
    block = deflate.compress(spdy.encode_headers(headers)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    return spdy.control(spdy.SYN_STREAM, spdy.FLAG_FIN if fin else 0, struct.pack(">IIH", stream_id, 0, 0) + block)


def test_spdy_streams_data_and_replies_in_any_chunking() -> None:
    pump, recorder = FakePump(), Recorder()
    connection = spdy.Connection(pump, recorder)  # type: ignore[arg-type]
    client = zlib.compressobj(zdict=spdy.DICTIONARY)
    wire = (syn_stream(client, 1, {"streamType": "error"}) + syn_stream(client, 3, {"streamType": "stdin", "x": "a"})
            + spdy.data_frame(3, b"hello ") + spdy.data_frame(3, b"world", fin=True)
            + spdy.control(spdy.PING, 0, struct.pack(">I", 7)))  # fmt: skip
    for byte in range(len(wire)):  # one byte at a time: frames are parsed only once whole
        connection.feed(wire[byte : byte + 1])
    assert recorder.seen == [("opened", 1, "error", {"streamtype": "error"}),
                             ("opened", 3, "stdin", {"streamtype": "stdin", "x": "a"}),
                             ("received", 3, b"hello "), ("received", 3, b"world"), ("ended", 3)]  # fmt: skip
    assert pump.sent == [spdy.control(spdy.PING, 0, struct.pack(">I", 7))]  # a ping is answered
    # The server's replies and data, read back as a client would: one compression context for the connection.
    stream = connection.streams[1]
    connection.accept(stream)
    connection.accept(connection.streams[3])
    connection.write(stream, b"x" * (spdy.DATA_CHUNK + 10))
    connection.finish(stream)
    inflate = zlib.decompressobj(zdict=spdy.DICTIONARY)
    kinds = []
    for frame in pump.sent[1:]:
        if frame[0] & 0x80:
            assert struct.unpack(">H", frame[2:4])[0] == spdy.SYN_REPLY
            assert spdy.decode_headers(inflate.decompress(frame[12:])) == {}
            kinds.append(("reply", struct.unpack(">I", frame[8:12])[0]))
        else:
            kinds.append(("data", struct.unpack(">I", frame[:4])[0], len(frame) - 8, frame[4] & spdy.FLAG_FIN))
    assert kinds == [("reply", 1), ("reply", 3), ("data", 1, spdy.DATA_CHUNK, 0), ("data", 1, 10, 0), ("data", 1, 0, 1)]
    assert not connection.write(stream, b"more")  # nothing goes out on a stream the server has closed
    connection.feed(b"")
    connection.feed(b"")
    assert recorder.seen[-1] == ("gone",) and recorder.seen.count(("gone",)) == 1


def test_spdy_a_corrupt_header_block_ends_the_connection() -> None:
    pump, recorder = FakePump(), Recorder()
    connection = spdy.Connection(pump, recorder)  # type: ignore[arg-type]
    connection.feed(spdy.control(spdy.SYN_STREAM, 0, struct.pack(">IIH", 1, 0, 0) + b"not zlib at all"))
    assert pump.closed and not recorder.seen


def client_frame(opcode: int, payload: bytes, final: bool = True) -> bytes:
    """A frame as a client sends it: masked."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    size = len(payload)
    head = bytes([(0x80 if final else 0) | opcode])
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", size)
    return head + mask + masked


def test_websocket_messages_fragments_pings_and_close() -> None:
    pump, recorder = FakePump(), Recorder()
    connection = websocket.Connection(pump, recorder)  # type: ignore[arg-type]
    big = os.urandom(70_000)  # a 64-bit length
    wire = (client_frame(websocket.BINARY, b"\x00abc") + client_frame(websocket.BINARY, b"\x02par", final=False)
            + client_frame(websocket.CONTINUATION, b"ts") + client_frame(websocket.PING, b"p")
            + client_frame(websocket.BINARY, big) + client_frame(websocket.CLOSE, struct.pack(">H", 1000)))  # fmt: skip
    for at in range(0, len(wire), 1000):
        connection.feed(wire[at : at + 1000])
    assert recorder.seen == [("received", b"\x00abc"), ("received", b"\x02parts"), ("received", big)]
    assert pump.sent == [websocket.frame(websocket.PONG, b"p"), websocket.frame(websocket.CLOSE, struct.pack(">H", 1000))]
    assert pump.closed
    assert websocket.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example
