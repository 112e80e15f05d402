"""The instructor's reports: the cohort's operational figures, lab after lab.

``recoveries`` gathers every time-to-detect and time-to-recover measurement
(``labkit.lab.recovery``) of a lab's runs: as submitted (the trainee's own session,
when they acted) or as graded (the measurements the grader made itself while
re-running each submission; a trainee's kernel cannot write those). The tables
show them per fault, per lab and per trainee.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Callable

from labkit.course.gradebook import RESULTS_FILE, read_results

if TYPE_CHECKING:
    from labkit.course.root import Course


def recoveries(course: Course, lab: str | None = None, *, graded: bool = False) -> list[dict]:
    """One dict per measurement of ``lab`` (default: of every lab, in course order), with its ``student`` and
    ``lab``."""
    folder = course.root / ("autograded" if graded else "submitted")
    found = []
    for name in [course.lab(lab)] if lab else course.labs():
        for path in sorted(folder.glob(f"*/{name}/{RESULTS_FILE}")):
            runs = read_results(path).get("runs", {})
            if not isinstance(runs, dict):
                continue  # a damaged file: that trainee has no figures
            for run in runs.values():
                records = run.get("recoveries", []) if isinstance(run, dict) else []
                found += [{**record, "student": path.parts[-3], "lab": name} for record in records
                          if isinstance(record, dict) and "fault" in record]  # fmt: skip
    return found


def grouped(records: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record[key], []).append(record)
    return groups


def median(values: list) -> str:
    known = sorted(v for v in values if v is not None)
    return f"{statistics.median(known):.1f} s" if known else "-"


def recovery_table(title: str, groups: dict[str, list[dict]], say: Callable[[str], None] = print) -> None:
    """Per group (a fault, a lab): its runs, the median times to detect, act and recover, who never recovered."""
    say(f"{title:<32}{'RUNS':>5}  {'DETECTED (median)':>18}  {'ACTED (median)':>15}  {'RECOVERED (median)':>19}  "
        "NEVER RECOVERED")
    for name, group in groups.items():
        acted = [r["acted"] - r["started"] if r.get("acted") else None for r in group]
        never = sorted({r["student"] for r in group if r.get("ttr") is None})
        say(f"{name[:31]:<32}{len(group):>5}  {median([r.get('ttd') for r in group]):>18}  {median(acted):>15}  "
            f"{median([r.get('ttr') for r in group]):>19}  {', '.join(never) or '-'}")


def cohort(records: list[dict], say: Callable[[str], None] = print) -> None:
    """The cohort across the course: how fast it detects and recovers lab after lab, then each trainee's trend."""
    by_lab = grouped(records, "lab")
    recovery_table("LAB", by_lab, say)
    say("\nTime to recover per trainee (median over the lab's faults; 'never' if one was not recovered)")
    say(f"{'TRAINEE':<20}" + "".join(f"{lab[:14]:>16}" for lab in by_lab))
    for student in sorted({r["student"] for r in records}):
        cells = []
        for group in by_lab.values():
            own = [r for r in group if r["student"] == student]
            cells.append("-" if not own else "never" if any(r.get("ttr") is None for r in own)
                         else median([r["ttr"] for r in own]))  # fmt: skip
        say(f"{student[:19]:<20}" + "".join(f"{cell:>16}" for cell in cells))
