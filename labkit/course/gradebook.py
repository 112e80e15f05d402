"""What grading wrote down: each submission's score per task, and what the grader flagged.

Scores come from nbgrader's gradebook. The grader's own record of a submission
(every check with its outcome, the flags, the measurements it made) sits beside
the graded notebook in ``labkit-results.json``, written after the trainee's kernel
has gone; a flagged task is also marked "needs manual grade" in the gradebook, so
nbgrader's formgrader lists it for the instructor's look.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labkit.course.root import Course

RESULTS_FILE = "labkit-results.json"


@dataclass
class TaskScore:
    name: str
    score: float
    max_score: float


@dataclass
class Result:
    student: str
    score: float
    max_score: float
    tasks: list[TaskScore]
    seconds: float = 0.0
    error: str = ""
    flags: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [t.name for t in self.tasks if t.score < t.max_score]


def graded_record(course: Course, lab: str, student: str) -> dict:
    """The grader's record of ``student``'s graded run of ``lab`` ({} if there is none, or it is damaged)."""
    path = course.root / "autograded" / student / lab / RESULTS_FILE
    return read_results(path).get("grading", {})


def read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def score(course: Course, lab: str, student: str) -> Result:
    from nbgrader.api import Gradebook, MissingEntry

    flags = [str(flag.get("message", flag)) if isinstance(flag, dict) else str(flag)
             for flag in graded_record(course, lab, student).get("flags", [])]  # fmt: skip
    with Gradebook(course.api.coursedir.db_url) as book:
        try:
            submission = book.find_submission(lab, student)
        except MissingEntry:
            max_score = book.find_assignment(lab).max_score
            return Result(student, 0.0, max_score, [], error="not graded", flags=flags)
        tasks = [TaskScore(g.name, g.score, g.max_score) for nb in submission.notebooks for g in nb.grades
                 if g.max_score]  # fmt: skip
        return Result(student, submission.score, submission.max_score, tasks, flags=flags)
