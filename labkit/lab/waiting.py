"""Waiting for things to be ready, as ``kubectl rollout status`` and ``kubectl wait`` judge it, with a live line.

The line says how it goes and, for a workload, why its pods are not ready yet (once
a second, in kubectl's words); it keeps the last reason when the wait fails or runs
out. A rollout past its progress deadline fails at once. A target that does not
exist fails at once too, naming the object it was probably meant to be.
"""

from __future__ import annotations

import difflib
import time
from typing import TYPE_CHECKING, Callable

from labkit import display, manifests, readiness
from labkit.errors import LabkitError

if TYPE_CHECKING:
    from labkit.lab.context import LabContext

DEFAULT_TIMEOUT = 120.0


class Waits:
    """A lab's waits (``lab.wait_ready``); ``events`` gives the namespace's Events, in time order."""

    def __init__(self, lab: LabContext, events: Callable[[], list[dict]]) -> None:
        self.lab = lab
        self.events = events

    def wait_ready(self, *targets: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        for target in targets:
            self.wait(target, timeout)

    def wait(self, target: str, timeout: float) -> None:
        """Wait for one target (see ``Lab.wait_ready``)."""
        kind, name = self.lab.locate(target)
        line = display.StatusLine()
        started = time.monotonic()
        summary = "waiting"
        problem: str | None = None
        next_look = 0.0
        try:
            while True:
                obj = self.lab.get(target)
                elapsed = time.monotonic() - started
                if obj is None:  # as kubectl rollout status and kubectl wait: nothing to wait for
                    line.finish(f"{target}: not found", ok=False)
                    raise LabkitError(f"There is no {target} in the lab's namespace {self.lab.namespace}.",
                                      hint=self.missing_hint(kind, name))
                state = readiness.progress(kind.kind, obj)
                summary = state.summary
                if state.done:
                    line.finish(f"{target}: {summary} ({elapsed:.1f} s)")
                    return
                if state.failure:
                    line.finish(f"{target}: {summary}", ok=False)
                    raise LabkitError(f"{target} will not become ready: {state.failure.rstrip('.')}.", hint=self.diagnose(target))
                if time.monotonic() >= next_look and kind.kind != "Pod":  # the pods say why, once a second
                    problem = next((p for p in map(readiness.pod_problem, self.lab.pods_of(target)) if p), None)
                    next_look = time.monotonic() + 1.0
                why = f" — {problem}" if problem else ""
                if elapsed > timeout:  # the line and the error keep the last reason the pods gave
                    line.finish(f"{target}: {summary}{why} after {timeout:.0f} s", ok=False)
                    raise LabkitError(f"{target} was not ready after {timeout:.0f} s ({summary}{why}).",
                                      hint=self.diagnose(target))  # fmt: skip
                line.update(f"{target}: {summary}{why} ({elapsed:.0f} s)")
                time.sleep(0.05)
        except KeyboardInterrupt:
            line.finish(f"{target}: {summary} (interrupted)", ok=False)
            raise LabkitError(
                f"Interrupted while waiting for {target} ({summary}). The cluster carries on without you: "
                "nothing was undone.",
                hint=f"Run `lab.wait_ready({target!r})` to wait again, or `lab.kubectl('get pods')` to look.",
            ) from None

    def missing_hint(self, kind: manifests.Kind, name: str) -> str:
        """What to do about an object that is not there: the name it may have been meant to be, else apply it."""
        try:
            names = [o["metadata"]["name"] for o in self.lab.request("GET", kind.path(self.lab.namespace)).get("items", [])]
        except LabkitError:
            names = []
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            return f"Did you mean {kind.kind.lower()}/{close[0]}? (`lab.kubectl('get {kind.plural}')` lists them.)"
        return "Apply it first (a cell above may have failed: look for its error)."

    def diagnose(self, target: str) -> str:
        """Why ``target``'s pods are not ready, and the warnings about them: what a trainee should read next."""
        lines = []
        for pod in self.lab.pods_of(target):
            problem = readiness.pod_problem(pod)
            if problem:
                lines.append(f"pod {pod['metadata']['name']}: {problem}")
        names = {p["metadata"]["name"] for p in self.lab.pods_of(target)} | {target.rpartition("/")[2]}
        warnings = [e for e in self.events() if e.get("type") == "Warning" and e["involvedObject"].get("name") in names]
        for event in warnings[-3:]:
            lines.append(f"event {event['reason']} on {event['involvedObject']['name']}: {event.get('message', '')}")
        lines.append("`lab.events()` shows the whole timeline; `lab.kubectl('describe " + target + "')` the details.")
        return "\n".join(lines)
