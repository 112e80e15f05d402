"""``python -m labkit.course ROOT SOURCE LAB STUDENT...``: a grading worker (see ``labkit.course.grade``)."""

import sys

from labkit.course.grade import worker

sys.exit(worker(sys.argv[1:]))
