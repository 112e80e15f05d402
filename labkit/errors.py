"""The one exception type a user of labkit is meant to read.

Anything a user can cause (a missing binary, a port in use, a corrupt state
directory, a manifest the API server rejects) is raised as a ``LabkitError``
whose message says what happened and what to do. The command line prints the
message and exits non-zero without a traceback; notebooks show it the same way.
Everything else is a bug and keeps its traceback.
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
