"""The stages that move notebooks between instructor and trainees: release, collect, and return feedback.

* ``release``: nbgrader's ``generate_assignment`` (the student version: solutions
  replaced by stubs, hidden tests removed), and with an exchange ``release_assignment``;
* ``collect``: nbgrader's ``collect`` from the exchange;
* ``feedback``: ``generate_feedback`` (each trainee's graded notebook as HTML, every
  check with its outcome), and with an exchange ``release_feedback``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from labkit.course.root import Course


def release(course: Course, lab: str, *, exchange: bool = False, say: Callable[[str], None] = print) -> Path:
    """The student version of ``lab`` in ``release/LAB``; also to the exchange if asked. Its folder."""
    lab = course.lab(lab)
    course.run(f"generate the student version of {lab}", lambda: course.api.generate_assignment(lab, force=True))
    folder = course.root / "release" / lab
    say(f"{lab}: student version in {folder}")
    if exchange:
        course.run(f"release {lab} to the exchange", lambda: course.api.release_assignment(lab))
        say(f"{lab}: released to the exchange; trainees can fetch it from the Assignments tab")
    return folder


def collect(course: Course, lab: str, *, say: Callable[[str], None] = print) -> None:
    lab = course.lab(lab)
    course.run(f"collect {lab}", lambda: course.api.collect(lab))
    say(f"{lab}: submissions collected into {course.root / 'submitted'}")


def feedback(course: Course, lab: str, *, exchange: bool = False, say: Callable[[str], None] = print) -> Path:
    lab = course.lab(lab)
    course.run(f"generate feedback for {lab}", lambda: course.api.generate_feedback(lab))
    say(f"{lab}: feedback in {course.root / 'feedback'} (one HTML file per trainee)")
    if exchange:
        course.run(f"return feedback for {lab}", lambda: course.api.release_feedback(lab))
        say(f"{lab}: feedback returned through the exchange")
    return course.root / "feedback"


def in_gradebook(course: Course, lab: str) -> bool:
    """Whether ``lab`` was released into this course's gradebook (grading needs its source cells there)."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(course.api.coursedir.db_url) as book:
        try:
            book.find_assignment(lab)
        except MissingEntry:
            return False
    return True
