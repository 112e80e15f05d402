"""WebSocket (RFC 6455), the server's side, for the channel protocol the API server passes through to a node.

The API server translates exec and attach to SPDY before they reach the node, but a
port-forward asked for over WebSocket with the older channel protocol
(``v4.channel.k8s.io``, as the official Python client speaks it) is proxied as it
is. Each binary message starts with its channel's number; a port's data is channel
``2i`` and its errors ``2i+1`` for the ``i``-th port asked for.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any, Protocol

from labkit.sandbox.node.upgraded import Framed, Pump

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 64 << 20


class Handler(Protocol):
    def received(self, message: bytes) -> None: ...
    def gone(self) -> None: ...


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def offered_protocols(headers: Any) -> list[str]:
    return [p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") or [] for p in value.split(",")
            if p.strip()]  # fmt: skip


def upgrade(handler: Any, key: str, protocol: str) -> Pump:
    """Answer the WebSocket handshake (``key``: the client's Sec-WebSocket-Key) for ``protocol``, and take the
    connection over from ``http.server``."""
    return Pump.take_over(handler, {"Upgrade": "websocket", "Connection": "Upgrade",
                                    "Sec-WebSocket-Accept": accept_key(key), "Sec-WebSocket-Protocol": protocol})


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        head = struct.pack(">BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, size)
    return head + payload


class Connection(Framed):
    """One WebSocket connection, server side: messages in through ``feed``, out through the pump."""

    def __init__(self, pump: Pump, handler: Handler) -> None:
        super().__init__(pump, handler)
        self.message = bytearray()

    def parse(self) -> None:
        while True:
            parsed = self._frame()
            if parsed is None:
                return
            final, opcode, payload = parsed
            if opcode == PING:
                self.pump.send(frame(PONG, payload))
            elif opcode == CLOSE:
                self.pump.send(frame(CLOSE, payload[:2]))
                self.pump.close()
            elif opcode in (TEXT, BINARY, CONTINUATION):
                self.message += payload
                if len(self.message) > MAX_MESSAGE:
                    self.close(1009)
                    return
                if final:
                    message, self.message = bytes(self.message), bytearray()
                    self.handler.received(message)

    def _frame(self) -> tuple[bool, int, bytes] | None:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        final, opcode, masked, size = buffer[0] & 0x80, buffer[0] & 0x0F, buffer[1] & 0x80, buffer[1] & 0x7F
        at = 2
        if size == 126:
            if len(buffer) < 4:
                return None
            (size,), at = struct.unpack_from(">H", buffer, 2), 4
        elif size == 127:
            if len(buffer) < 10:
                return None
            (size,), at = struct.unpack_from(">Q", buffer, 2), 10
        mask = b""
        if masked:
            if len(buffer) < at + 4:
                return None
            mask, at = bytes(buffer[at : at + 4]), at + 4
        if len(buffer) < at + size:
            return None
        payload = bytes(buffer[at : at + size])
        del buffer[: at + size]
        return bool(final), opcode, _unmask(payload, mask) if mask else payload

    def send(self, message: bytes) -> bool:
        return self.pump.send(frame(BINARY, message))

    def close(self, code: int = 1000) -> None:
        self.pump.send(frame(CLOSE, struct.pack(">H", code)))
        self.pump.close()
