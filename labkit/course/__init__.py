"""The grading pipeline: nbgrader, made to work from a fresh checkout, against a fresh cluster, one stage a module.

* ``root``: the course root (``graders/``) and nbgrader's API on it; ``Course`` is
  every stage's entry point;
* ``release``: the student version out, submissions in, feedback back;
* ``grade``: autograding a cohort on a grading cluster of the run's own;
* ``execute``, ``scoring``, ``answers``, ``transfer``: how one submission is run and
  scored outside the trainee's kernel, so that its grade cannot be forged; ``workspace``
  and ``confine``: where the trainee's kernel works (a namespace, as a trainee's account)
  and what it may touch on the grading machine (under bubblewrap);
* ``gradebook``: the scores and the grader's flags; ``reports``: the cohort's
  times to detect and recover.
"""

from labkit.course.gradebook import Result, TaskScore
from labkit.course.grade import GRADING_SANDBOX, grading_cluster
from labkit.course.root import Course, default_root

__all__ = ["Course", "GRADING_SANDBOX", "Result", "TaskScore", "default_root", "grading_cluster"]
