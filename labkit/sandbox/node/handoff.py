"""Handing things to the one thread that owns a selector.

A thread that waits in ``select`` over files it alone reads and closes cannot be
handed a new file directly: the selector is only touched there. ``Handoff`` queues
what other threads hand it and wakes the thread through a pipe the selector
watches; the thread takes what was handed when that pipe is readable.
"""

from __future__ import annotations

import os
import selectors
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.read, self.write = os.pipe()
        os.set_blocking(self.read, False)
        selector.register(self.read, selectors.EVENT_READ)
        self.lock = threading.Lock()
        self.items: list[T] = []

    def hand(self, item: T) -> None:
        """From any thread: queue ``item`` and wake the selector's thread."""
        with self.lock:
            self.items.append(item)
        os.write(self.write, b"+")

    def take(self) -> list[T]:
        """In the selector's thread, when ``read`` is ready: what was handed since the last time, in order."""
        try:
            while os.read(self.read, 4096):
                pass
        except BlockingIOError:
            pass
        with self.lock:
            items, self.items = self.items, []
        return items
