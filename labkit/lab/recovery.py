"""Time to detect and time to recover, recorded for every fault a lab injects.

    with lab.measure("a worker pod is killed", "deployment/worker") as m:
        lab.chaos.pod_kill("deployment/worker")
    m.ttd, m.ttr            # seconds, or None if it never happened
    lab.timeline()          # every measurement of the lab, as a picture

A measurement watches a **steady state** (by default: the target has every replica
it wants ready, as its readiness probes say) from the moment the block starts,
sampling it ten times a second in the background, and records four moments:

* **started**: the fault was injected (the block began);
* **detected**: the symptom was first visible: the steady state broke (a pod
  gone or failing its readiness probe), or ``symptom()`` said so (an error rate
  above a threshold);
* **acted**: the trainee first changed something in the lab after the start
  (``lab.apply``, ``lab.delete``, a ``kubectl`` that writes);
* **recovered**: the steady state held again after the symptom.

Time to detect is detected - started; time to recover is recovered - started.
When the block ends the measurement waits (up to ``within`` seconds) for
recovery. Every measurement is kept in ``lab.recoveries`` and written to
``labkit-results.json`` beside the notebook, where graders and the instructor's
cohort analytics read it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from labkit import display, readiness

if TYPE_CHECKING:
    from labkit.lab.context import LabContext

RESULTS_FILE = "labkit-results.json"
SAMPLE = 0.1  # seconds between looks at the steady state


@dataclass
class Recovery:
    """One fault's moments (seconds since the epoch) and what they add up to."""

    fault: str
    target: str
    started: float
    detected: float | None = None
    acted: float | None = None
    recovered: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ttd(self) -> float | None:
        """Time to detect, seconds."""
        return None if self.detected is None else round(self.detected - self.started, 3)

    @property
    def ttr(self) -> float | None:
        """Time to recover, seconds."""
        return None if self.recovered is None else round(self.recovered - self.started, 3)

    def as_dict(self) -> dict:
        return {**asdict(self), "ttd": self.ttd, "ttr": self.ttr}

    def summary(self) -> str:
        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        acted = "" if self.acted is None else f", you acted after {self.acted - self.started:.1f} s"
        return f"{self.fault}: detected after {seconds(self.ttd)}{acted}, recovered after {seconds(self.ttr)}"


class Measurement:
    """The ``with`` block of ``lab.measure``: samples the steady state in the background while the fault runs."""

    def __init__(self, lab: LabContext, fault: str, target: str, steady: Callable[[], bool],
                 symptom: Callable[[], bool] | None, within: float) -> None:  # fmt: skip
        self.lab = lab
        self.steady = steady
        self.symptom = symptom
        self.within = within
        self.record = Recovery(fault, target, time.time())
        self.stopped = threading.Event()
        self.sampler = threading.Thread(target=self._sample, name="labkit-measure", daemon=True)

    def __enter__(self) -> Recovery:
        if not self._holds():
            self.record.notes.append("the steady state did not hold before the fault")
        self.record.started = time.time()
        self.sampler.start()
        return self.record

    def __exit__(self, kind, error, trace) -> None:  # noqa: ANN001
        if kind is not None:  # the injection itself failed: nothing to measure
            self.stopped.set()
            return
        line = display.StatusLine()
        deadline = time.monotonic() + self.within
        try:
            while self.record.recovered is None and time.monotonic() < deadline and self.sampler.is_alive():
                elapsed = time.time() - self.record.started
                state = "recovering" if self.record.detected else "waiting for a symptom"
                line.update(f"{self.record.fault}: {state} ({elapsed:.0f} s)")
                time.sleep(SAMPLE)
        except KeyboardInterrupt:
            self.record.notes.append("interrupted before it recovered")
        finally:
            self.stopped.set()
            self.sampler.join(2)
        if self.record.detected is None:
            self.record.notes.append(f"no symptom within {self.within:.0f} s: the fault was not visible")
        elif self.record.recovered is None:
            self.record.notes.append(f"not recovered within {self.within:.0f} s")
        self.record.acted = next((t for t in self.lab.actions if t >= self.record.started), None)
        line.finish(self.record.summary(), ok=self.record.recovered is not None)
        self.lab.recoveries.append(self.record)
        save(self.lab, self.record)

    def _holds(self) -> bool:
        try:
            return bool(self.steady())
        except Exception:  # noqa: BLE001 - a steady-state check that cannot answer does not hold
            return False

    def _sample(self) -> None:
        while not self.stopped.is_set():
            now = time.time()
            broken = not self._holds()
            if self.symptom is not None and not broken:
                try:
                    broken = bool(self.symptom())
                except Exception:  # noqa: BLE001
                    broken = True
            if broken and self.record.detected is None:
                self.record.detected = now
            elif not broken and self.record.detected is not None:
                self.record.recovered = now
                return
            self.stopped.wait(SAMPLE)


def save(lab: LabContext, record: Recovery) -> None:
    """Add ``record`` to ``labkit-results.json`` in the working folder (the notebook's). When graded, the grader
    writes that file itself, from its own lab's records (``labkit.course.execute``)."""
    if lab.grading:
        return
    path = Path(os.getcwd()) / RESULTS_FILE
    try:
        results = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        results = {}  # a damaged file is replaced rather than crash the lab
    runs = results.setdefault("runs", {})
    run = runs.setdefault(lab.run_id, {"lab": lab.id, "namespace": lab.namespace, "recoveries": []})
    run["recoveries"].append(record.as_dict())
    try:
        path.write_text(json.dumps(results, indent=2))
    except OSError as exc:
        lab.say(f"(the measurement could not be saved to {path}: {exc})")


def timeline(records: list[Recovery]):  # noqa: ANN201 - a matplotlib Figure
    """A bar per fault: from the fault to its detection, then to recovery, with the trainee's first action."""
    import matplotlib

    if not display.in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 0.6 + 0.5 * max(1, len(records))))
    for row, r in enumerate(records):
        end = r.ttr if r.ttr is not None else (r.ttd or 0)
        if r.ttd is not None:
            axes.barh(row, r.ttd, color="#cf222e", label="to detect" if row == 0 else None)
            if r.ttr is not None:
                axes.barh(row, r.ttr - r.ttd, left=r.ttd, color="#bf8700", label="to recover" if row == 0 else None)
        if r.acted is not None:
            axes.plot(r.acted - r.started, row, "k^", label="you acted" if row == 0 else None)
        axes.text(end, row, f"  {r.ttd if r.ttd is not None else '-'} s / {r.ttr if r.ttr is not None else '-'} s",
                  va="center", fontsize=8)  # fmt: skip
    axes.set_yticks(range(len(records)), [r.fault for r in records])
    axes.invert_yaxis()
    axes.set_xlabel("seconds after the fault")
    axes.set_title("Time to detect and time to recover")
    if records:
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def workload_steady(lab: LabContext, target: str) -> bool:
    """Whether ``target`` is in its steady state: every replica it wants ready (a Pod: Ready)."""
    obj = lab.get(target)
    if obj is None:
        return False
    kind, _ = lab.locate(target)
    state = readiness.progress(kind.kind, obj)
    if kind.kind in ("Deployment", "StatefulSet", "ReplicaSet"):
        status = obj.get("status") or {}
        return state.done and status.get("readyReplicas", 0) >= (obj.get("spec") or {}).get("replicas", 1)
    return state.done
