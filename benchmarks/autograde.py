"""What autograding a lab costs, beside autograding a notebook of the same size that touches no cluster.

Both are graded the way an instructor grades them, with ``labkit course autograde``
(nbgrader's autograde through its API, one submission at a time), in course roots
of their own, in the same run:

* **lab**: N copies of Lab 01's solution, graded against a fresh grading sandbox
  (three nodes; each submission makes its own namespace, deploys, scales and is
  checked);
* **plain**: N copies of a notebook with the same cells, nbgrader metadata and
  points as Lab 01, whose code cells do trivial arithmetic instead.

It grades each kind twice: one submission after another (the seconds each takes:
median of N, and the range), and as a cohort, several at a time as ``autograde``
does by default (the whole run's seconds over N). It prints both, the lab's
ratio to the plain notebook for each, and, apart, the one-off start of the
grading sandbox.

    python benchmarks/autograde.py [--submissions 5] [--parallel 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.course import Course, grading_cluster  # noqa: E402
from labkit.sandbox import binaries  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
LAB = "01-deploy-and-scale"
NOTEBOOK = "deploy-and-scale.ipynb"
PLAIN = "00-plain"


def plain_copy(source: Path, target: Path) -> None:
    """Lab 01 with every code cell doing arithmetic: same cells, same grade ids and points, no cluster."""
    nb = nbformat.read(source, as_version=4)
    answer = "value_0"
    for number, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            answer = f"value_{number}"
            cell.source = f"### BEGIN SOLUTION\n{answer} = sum(range({number}))\n### END SOLUTION"
        elif meta.get("grade"):  # checked as the labs' checks are: the answer read as a value, by the grader
            cell.source = (f"from labkit import checks\nchecks.answer({answer!r}, sum(range({answer[6:]})))\n"
                           f"### BEGIN HIDDEN TESTS\nassert isinstance(checks.given({answer!r}), int)\n"
                           "### END HIDDEN TESTS")  # fmt: skip
        else:
            cell.source = f"print({number} * 2)"
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)


def course_root(folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(REPOSITORY / "graders" / "nbgrader_config.py", folder)
    return folder


def submissions(course: Course, lab: str, notebook: Path, count: int, folder: Path) -> list[Path]:
    paths = []
    for n in range(1, count + 1):
        target = folder / lab / f"trainee-{n}"
        target.mkdir(parents=True)
        shutil.copy(notebook, target / notebook.name)
        paths.append(target)
    return paths


def grade(course: Course, lab: str, paths: list[Path], parallel: int) -> tuple[list[float], float]:
    """Each submission's seconds, and the whole run's."""
    started = time.monotonic()
    results = course.autograde(lab, paths, cluster="kubeconfig", parallel=parallel,
                               say=lambda line: print(line, file=sys.stderr))  # fmt: skip
    elapsed = time.monotonic() - started
    low = [r for r in results if r.score < r.max_score]
    if low:
        raise SystemExit(f"{lab}: {', '.join(f'{r.student} scored {r.score}/{r.max_score}' for r in low)}; "
                         "a solution must score full marks, so the figures would measure a failure.")  # fmt: skip
    return [r.seconds for r in results], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=min(4, os.cpu_count() or 1),
                        help="submissions graded at a time in the cohort run (default: the CPUs, up to 4)")
    args = parser.parse_args()
    binaries.ensure(say=print)
    with tempfile.TemporaryDirectory(prefix="labkit-bench-grade-") as scratch_dir:
        scratch = Path(scratch_dir)
        os.environ["LABKIT_STATE_DIR"] = str(scratch / "state")
        source = scratch / "source"
        shutil.copytree(REPOSITORY / "notebooks" / LAB, source / LAB)
        plain_copy(REPOSITORY / "notebooks" / LAB / NOTEBOOK, source / PLAIN / NOTEBOOK)
        lab_course = Course(course_root(scratch / "lab-course"), source)
        plain_course = Course(course_root(scratch / "plain-course"), source)
        for course, lab in ((lab_course, LAB), (plain_course, PLAIN)):
            course.release(lab, say=lambda _: None)
        lab_paths = submissions(lab_course, LAB, source / LAB / NOTEBOOK, args.submissions, scratch / "submitted")
        plain_paths = submissions(plain_course, PLAIN, source / PLAIN / NOTEBOOK, args.submissions, scratch / "submitted")

        started = time.monotonic()
        with grading_cluster("sandbox", say=lambda _: None):  # a sandbox of the run's own, removed at its end
            sandbox_start = time.monotonic() - started
            # The cluster is up: grade against it as the autograde command does, and the plain notebooks
            # the same way (they never connect), one kind after the other.
            lab_seconds, _ = grade(lab_course, LAB, lab_paths, 1)
            plain_seconds, _ = grade(plain_course, PLAIN, plain_paths, 1)
            _, lab_cohort = grade(lab_course, LAB, lab_paths, args.parallel)
            _, plain_cohort = grade(plain_course, PLAIN, plain_paths, args.parallel)

    cells = len(nbformat.read(REPOSITORY / "notebooks" / LAB / NOTEBOOK, as_version=4).cells)
    n = args.submissions
    print()
    print(f"Autograding Lab {LAB} beside a notebook of the same {cells} cells that touches no cluster; "
          f"{n} submissions of each, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"  {'one after another, seconds each':<44}{'median':>8}   range")
    for name, seconds in (("lab (deploys, scales, checks a live cluster)", lab_seconds), ("plain notebook", plain_seconds)):
        print(f"    {name:<42}{statistics.median(seconds):6.2f} s   {min(seconds):.2f}-{max(seconds):.2f}")
    print(f"    {'lab / plain':<42}{statistics.median(lab_seconds) / statistics.median(plain_seconds):6.1f}x")
    print(f"  {f'as a cohort, {args.parallel} at a time: run seconds / {n}':<44}")
    print(f"    {'lab':<42}{lab_cohort / n:6.2f} s")
    print(f"    {'plain notebook':<42}{plain_cohort / n:6.2f} s")
    print(f"    {'lab / plain':<42}{lab_cohort / plain_cohort:6.1f}x")
    print(f"  {'grading sandbox start (once per run)':<46}{sandbox_start:6.2f} s")


if __name__ == "__main__":
    main()
