"""Progress a person can see, in a terminal and in a CI log alike.

On a terminal one status line is rewritten in place; elsewhere (CI, a notebook
capturing output) a line is printed only when the figure moves on noticeably or
a while has passed, so logs stay short but never go silent.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One task's progress line: ``label: 45% (1234/2700) 1m12s``."""

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_print = self.started
        self._last_shown = -1
        self._detail = ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _line(self) -> str:
        parts = [self.label + ":"]
        if self.total:
            pct = min(99, int(100 * self.done / self.total)) if self.done < self.total else 100
            parts.append(f"{pct:3d}% ({self.done}/{self.total})")
        elif self.done:
            parts.append(str(self.done))
        if self._detail:
            parts.append(self._detail)
        parts.append(format_duration(self.elapsed()))
        return " ".join(parts)

    def update(self, done: int | None = None, *, advance: int = 0, detail: str | None = None) -> None:
        if done is not None:
            self.done = done
        self.done += advance
        if detail is not None:
            self._detail = detail
        now = time.monotonic()
        if self._tty:
            if now - self._last_print >= 0.1:
                self.stream.write("\r\033[K" + self._line())
                self.stream.flush()
                self._last_print = now
            return
        step = max(1, (self.total or 0) // 10)
        if (self.total and self.done - self._last_shown >= step) or now - self._last_print >= 15:
            self.stream.write(self._line() + "\n")
            self.stream.flush()
            self._last_print = now
            self._last_shown = self.done

    def clear(self) -> None:
        """Remove a terminal's status line (the caller prints its own conclusion)."""
        if self._tty and self._last_print:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def finish(self, message: str | None = None) -> None:
        text = f"{self.label}: {message} ({format_duration(self.elapsed())})" if message else self._line()
        self.stream.write(("\r\033[K" if self._tty else "") + text + "\n")
        self.stream.flush()


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
