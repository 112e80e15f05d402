"""Each lab's solution, graded again and again on a busy two-core machine: always full marks, and by what margin.

The checks that rest on measurements (a lost node's recovery, tail latencies under
faults, a retry storm's amplification) must pass for a correct solution however
loaded the grading machine is. This grades N copies of each lab's solution (its
source notebook, solutions and all) with ``labkit course autograde``, one lab at a
time on a fresh grading sandbox of the run's own, and prints for each lab how many
scored full marks, then each measured figure against the threshold its check holds
it to: the median and the worst over the runs, and the worst's margin (the figure
over the threshold, or the threshold over the figure, whichever way the check
goes; above 1.0 passes).

    python benchmarks/grading_margins.py [--runs 10] [--labs 03,05] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.course import Course  # noqa: E402
from labkit.course.gradebook import RESULTS_FILE  # noqa: E402
from labkit.sandbox import binaries  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]

# A measured figure: (lab, name, threshold, "above" or "below", where to read it in a graded run).
FIGURES = [
    ("03", "node loss: seconds to whole again", 150.0, "below", ("recovery", "a node is lost")),
    ("05", "p99 naive / resilient", 1.5, "above", ("printed", r"p99 ([0-9.]+)x lower with the patterns")),
    ("05", "accepted tasks' wait under overload, ms", 15000.0, "below",
     ("printed", r"accepted tasks waited at most ([0-9.]+) ms")),
    ("05", "retry storm: calls per submission / bound", 1.0, "above",
     ("printed", r"retry storm: ([0-9.]+) calls per submission with 1\.3, ([0-9.]+) with 1\.0")),
]  # fmt: skip


def printed(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "\n".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []) if o.get("output_type") == "stream")


def figure(folder: Path, notebook: str, where: tuple[str, str]) -> float | None:
    """One graded run's figure, from the grader's record or from what its checks printed."""
    kind, key = where
    if kind == "recovery":
        runs = json.loads((folder / RESULTS_FILE).read_text()).get("runs", {})
        found = [r.get("ttr") for run in runs.values() for r in run.get("recoveries", []) if r.get("fault") == key]
        return found[0] if found else None
    match = re.search(key, printed(folder / notebook))
    if not match:
        return None
    if len(match.groups()) == 2:  # the storm: its amplification over the bound its check holds it to
        storm, bounded = map(float, match.groups())
        return storm / max(2.0, 2 * bounded)
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--labs", default="01,02,03,04,05", help="comma-separated lab numbers")
    parser.add_argument("--parallel", type=int, default=2, help="for labs that may be graded several at a time")
    args = parser.parse_args()
    binaries.ensure(say=print)
    summary: list[tuple[str, int, int, float]] = []
    figures: dict[str, list[float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="labkit-bench-margins-") as scratch_dir:
        scratch = Path(scratch_dir)
        os.environ["LABKIT_STATE_DIR"] = str(scratch / "state")
        for number in args.labs.split(","):
            root = scratch / f"course-{number}"
            root.mkdir()
            shutil.copy(REPOSITORY / "graders" / "nbgrader_config.py", root)
            course = Course(root, REPOSITORY / "notebooks")
            lab = course.lab(number)
            notebook = course.notebooks(lab)[0]
            copies = []
            for n in range(1, args.runs + 1):
                folder = scratch / "submissions" / lab / f"solution-{n:02d}"
                folder.mkdir(parents=True)
                shutil.copy(REPOSITORY / "notebooks" / lab / notebook, folder / notebook)
                copies.append(folder)
            started = time.monotonic()
            results = course.autograde(lab, copies, parallel=args.parallel, say=lambda line: print(line, file=sys.stderr))
            elapsed = time.monotonic() - started
            full = sum(r.score == r.max_score and not r.error for r in results)
            summary.append((lab, full, len(results), elapsed / len(results)))
            for r in results:
                if r.score < r.max_score or r.error:
                    print(f"  {lab} {r.student}: {r.score:g}/{r.max_score:g}, not passed: {', '.join(r.failed)} {r.error}",
                          file=sys.stderr)  # fmt: skip
            for lab_number, name, *_, where in FIGURES:
                if lab_number == number:
                    figures[name] = [figure(root / "autograded" / r.student / lab, notebook, where) for r in results]

    print(f"\nEach lab's solution graded {args.runs} times ({os.cpu_count()} CPUs)")
    print(f"  {'lab':<32}{'full marks':>12}{'seconds each':>14}")
    for lab, full, total, seconds in summary:
        print(f"  {lab:<32}{f'{full}/{total}':>12}{seconds:>12.1f} s")
    if figures:
        print("\nMeasured figures against their checks' thresholds (margin of the worst run; above 1.0 passes)")
        print(f"  {'figure':<46}{'threshold':>10}{'median':>10}{'worst':>10}{'margin':>8}")
    for _, name, threshold, way, _ in FIGURES:
        values = [v for v in figures.get(name, []) if v is not None]
        if name not in figures:
            continue
        if not values:
            print(f"  {name:<46}{threshold:>10g}{'-':>10}{'-':>10}{'-':>8}  (not measured)")
            continue
        worst = max(values) if way == "below" else min(values)
        margin = threshold / worst if way == "below" else worst / threshold
        missing = len(figures[name]) - len(values)
        print(f"  {name:<46}{threshold:>10g}{statistics.median(values):>10.2f}{worst:>10.2f}{margin:>8.2f}"
              + (f"  ({missing} runs without it)" if missing else ""))  # fmt: skip


if __name__ == "__main__":
    main()
