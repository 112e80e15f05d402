"""An append-only journal: how the queue and the store keep their state across a restart.

Every change is one JSON line appended to ``$DATA_DIR/NAME.journal`` and flushed
to the kernel before the change is acknowledged, so a killed process (a crash,
an OOM kill, ``kubectl delete pod`` of a pod whose volume stays) loses nothing
it has answered for; on start the journal is replayed. A line cut short by a
kill mid-write is skipped. Flushing is not fsync: a lost machine may still lose
the last records, the trade most brokers make by default.

When the journal holds many more records than the state it describes, it is
rewritten as a snapshot (a new file renamed over the old one, so a kill during
the rewrite leaves one whole journal or the other).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator

from labkit.apps.platform.telemetry import log

COMPACT_MINIMUM = 1000  # records below which a journal is never rewritten


class Journal:
    """JSON records appended one a line; a no-op without a folder (state in memory only)."""

    def __init__(self, folder: Path | None, name: str) -> None:
        self.path = folder / f"{name}.journal" if folder else None
        self.records = 0
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def replay(self) -> Iterator[dict]:
        """The records written before, oldest first (nothing without a folder or a journal yet)."""
        if self.path is None or not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as journal:
            for number, line in enumerate(journal, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    log("warning", f"journal {self.path}: line {number} is incomplete, skipped (a write cut short)")
                    continue
                self.records += 1
                yield record

    def append(self, record: dict) -> None:
        if self.path is None:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()
            self.records += 1

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the journal with ``records`` (a snapshot of the live state)."""
        if self.path is None:
            return
        temporary = self.path.with_suffix(".journal.new")
        count = 0
        with open(temporary, "w", encoding="utf-8") as snapshot:
            for record in records:
                snapshot.write(json.dumps(record, separators=(",", ":")) + "\n")
                count += 1
            snapshot.flush()
            os.fsync(snapshot.fileno())
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            os.replace(temporary, self.path)
            self.records = count

    def wants_compaction(self, live: int) -> bool:
        return self.path is not None and self.records > max(COMPACT_MINIMUM, 4 * live)
