"""The trainee's own tally: the lab's graded tasks, and whether their visible checks passed in this kernel.

Every graded cell of a lab shows some of its checks (the hidden ones run when the
lab is graded). The scorecard follows the cells this kernel runs (IPython's
``post_run_cell`` event, with the cell's id), reads the graded cells and their
points from the notebook JupyterLab opened (``$JPY_SESSION_NAME``), and shows, when
the lab closes, each task with the outcome of its last run: a rehearsal of the
grade, from the visible checks only.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit import display


@dataclass
class Task:
    grade_id: str
    cell_id: str
    points: float
    passed: bool | None  # the visible checks' outcome in its last run here; None: not run


class Scorecard:
    """The outcome of each cell this kernel ran, by cell id (installed once per kernel)."""

    def __init__(self, shell: Any) -> None:
        self.outcomes: dict[str, bool] = {}
        self._cell: str | None = None
        shell.events.register("pre_run_cell", self._before)
        shell.events.register("post_run_cell", self._after)

    def _before(self, info: Any) -> None:
        self._cell = getattr(info, "cell_id", None)

    def _after(self, result: Any) -> None:
        if self._cell:
            self.outcomes[self._cell] = result.error_before_exec is None and result.error_in_exec is None

    def tasks(self, notebook: Path) -> list[Task]:
        import nbformat

        try:
            cells = nbformat.read(notebook, as_version=4).cells
        except (OSError, ValueError):
            return []
        return [Task(c.metadata["nbgrader"].get("grade_id", ""), c.get("id", ""), float(c.metadata["nbgrader"].get("points", 0)),
                     self.outcomes.get(c.get("id", "")))
                for c in cells if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")]  # fmt: skip


_installed: Scorecard | None = None


def install() -> None:
    """Follow this kernel's cells (in IPython; nothing elsewhere)."""
    global _installed
    shell = display.ipython()
    if shell is not None and _installed is None:
        _installed = Scorecard(shell)


def notebook() -> Path | None:
    """The notebook this kernel runs for, as JupyterLab says ($JPY_SESSION_NAME), if it is one."""
    name = os.environ.get("JPY_SESSION_NAME", "")
    path = Path(name) if name.endswith(".ipynb") else None
    return path if path is not None and path.is_file() else None


def show() -> None:
    """The lab's graded tasks with the outcome of their visible checks here, and the points they add up to."""
    path = notebook()
    if _installed is None or path is None or os.environ.get("LABKIT_GRADING") == "1":
        return
    tasks = _installed.tasks(path)
    if not tasks:
        return
    earned = sum(t.points for t in tasks if t.passed)
    total = sum(t.points for t in tasks)
    mark = {True: "✔ passed", False: "✘ failed", None: "· not run"}
    rows = [(t.grade_id, f"{t.points:g}", mark[t.passed]) for t in tasks]
    body = "".join(f"<tr><td>{html.escape(g)}</td><td>{p}</td><td>{html.escape(m)}</td></tr>" for g, p, m in rows)
    summary = (f"Your visible checks: {earned:g} of {total:g} points. The hidden checks run when the lab is graded, "
               "in a fresh namespace, from the top.")
    display.show_html(f"<p><b>{html.escape(summary)}</b></p><table><thead><tr><th>task</th><th>points</th>"
                      f"<th>last run</th></tr></thead><tbody>{body}</tbody></table>",
                      summary + "\n" + "\n".join(f"  {g:<16} {p:>4}  {m}" for g, p, m in rows))  # fmt: skip
