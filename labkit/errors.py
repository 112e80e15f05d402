"""The one exception type a user of labkit is meant to read.

Anything a user can cause (a missing binary, a port in use, a corrupt state
directory, a manifest the API server rejects) is raised as a ``LabkitError``
whose message says what happened and what to do. The command line prints the
message and exits non-zero without a traceback; a notebook shows it as the cell's
error output, message and hint only (IPython asks an exception for that with
``_render_traceback_``). Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LabkitError(Exception):
    """An expected failure, explained in plain words for the person who hit it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message.strip()
        self.hint = hint.strip() if hint else None
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n\n{self.hint}"
        return self.message

    def _render_traceback_(self) -> list[str]:
        """The cell's error output in IPython: the message and the hint, no traceback."""
        from labkit.display import error_lines

        return error_lines(self.message, self.hint)
