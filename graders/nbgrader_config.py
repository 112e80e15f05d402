"""nbgrader's configuration for the course: `labkit course ...` runs nbgrader with it.

The course root is this folder; the source notebooks are the repository's `notebooks/`
(`labkit course` passes that path, so nbgrader run by hand needs
`--CourseDirectory.source_directory=../notebooks`). Gradebook, releases, submissions,
autograded copies and feedback are written here and kept out of version control.
"""

import os

c = get_config()  # noqa: F821 - nbgrader provides it

c.CourseDirectory.course_id = os.environ.get("LABKIT_COURSE_ID", "labkit")
c.CourseDirectory.source_directory = "../notebooks"

# JupyterHub: the exchange folder every user of the hub can read and write (nbgrader's default is
# /srv/nbgrader/exchange). On a single machine it is not used.
c.Exchange.root = os.environ.get("LABKIT_EXCHANGE", "/srv/nbgrader/exchange")

# A lab waits on a live cluster (rollouts, probes): give each cell time, and each notebook a kernel of
# its own that starts clean.
c.ExecutePreprocessor.timeout = 300
c.ExecutePreprocessor.startup_timeout = 120

# The stub a trainee sees in place of a solution.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Grading outside the trainee's kernel (labkit.course.execute): nbgrader's Execute step is replaced by labkit's,
# which runs the instructor's checks in a grader kernel of its own. `labkit course` sets this too; it is here so
# that nbgrader run by hand (`nbgrader autograde`, the formgrader) grades the same way.
from labkit.course.execute import autograde_preprocessors  # noqa: E402

c.Autograde.autograde_preprocessors = autograde_preprocessors()
