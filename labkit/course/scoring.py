"""A task's checks, run one by one in the grader's kernel: points per check, and every miss with its hint.

``labkit.course.execute`` sends each graded cell here instead of running it
whole. The cell's top-level statements run in order in the grader's namespace
(where the lab's own cells defined ``lab``, its helpers and its measurements);
each ``assert`` and each call that is not ``print`` or ``checks.passed`` is a
*check*, worth an equal share of the task's points. A failing check does not
stop the others: it is reported with its message and hint, and the next runs.
The trainee's answers come as values read from their kernel (``labkit.course.
answers``), so ``checks.answer`` compares plain numbers, strings and lists, never
an object of the trainee's making.

The cell's last output is a ``Score``: nbgrader reads its plain text (the points,
as a number: partial credit), a notebook shows its table, and the grader reads
its JSON.
"""

from __future__ import annotations

import ast
import html
import io
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from labkit import checks
from labkit.course import answers
from labkit.errors import LabkitError

MIME = "application/vnd.labkit.grade+json"
QUIET_CALLS = {"print", "display", "passed"}  # calls that say something without checking anything


@dataclass
class CheckResult:
    check: str  # the statement, as written
    passed: bool
    message: str = ""  # what was wrong, and the hint


@dataclass
class Score:
    grade_id: str
    points: float
    score: float
    checks: list[CheckResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"grade_id": self.grade_id, "points": self.points, "score": self.score,
                "checks": [asdict(c) for c in self.checks]}  # fmt: skip

    def __repr__(self) -> str:  # nbgrader's partial credit: the cell's result as a number
        return f"{self.score:g}"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        return {"text/plain": repr(self), "text/html": self.html(), MIME: self.as_dict()}

    def html(self) -> str:
        passed = sum(c.passed for c in self.checks)
        rows = "".join(
            f'<tr><td style="color:{"#1a7f37" if c.passed else "#cf222e"};vertical-align:top">{"✔" if c.passed else "✘"}'
            f'</td><td style="text-align:left"><code>{html.escape(_short(c.check))}</code>'
            + ("" if c.passed else f'<pre style="margin:2px 0;white-space:pre-wrap;word-break:normal">'
                                   f'{html.escape(c.message)}</pre>') + "</td></tr>"
            for c in self.checks)  # fmt: skip
        return (f'<div><b>{self.score:g} of {self.points:g} points</b> ({passed} of {len(self.checks)} checks passed)'
                f'<table style="margin-top:4px">{rows}</table></div>')


def is_check(statement: ast.stmt) -> bool:
    """A top-level ``assert`` or call (not ``print``, ``display`` or ``checks.passed``: a check function, such as
    ``checks.deployment(...)`` or one the cell defines); or a block (``if``, ``for``, ``try``...) holding an
    ``assert`` or a call of ``checks``. A block of other calls (``try: put(...)``) prepares, it does not check."""
    if isinstance(statement, ast.Assert):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
        return _called(statement.value) not in QUIET_CALLS
    if isinstance(statement, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
        return any(isinstance(node, ast.Assert) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                                                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "checks"
                                                    and node.func.attr not in QUIET_CALLS)
                   for node in ast.walk(statement))  # fmt: skip
    return False


def _called(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def grade(source: str, points: float, grade_id: str, given: str, scope: dict) -> Score:
    """Run the graded cell ``source`` check by check in ``scope`` with the trainee's answers ``given`` (the JSON
    ``labkit.course.answers`` read from their kernel); its Score. What the checks print is the cell's output."""
    tree = ast.parse(source)
    statements = tree.body
    count = sum(map(is_check, statements)) or 1
    results: list[CheckResult] = []
    broken = ""  # a statement before the checks that failed: why the checks after it could not run
    checks.grading_answers(answers.decode(given))
    try:
        for statement in statements:
            text = ast.get_source_segment(source, statement) or ast.unparse(statement)
            code = compile(ast.Module([statement], type_ignores=[]), f"<{grade_id}>", "exec")
            try:
                exec(code, scope)  # noqa: S102 - the instructor's own cell, in the grader's kernel
            except BaseException as exc:  # noqa: BLE001 - every failure is reported, none stops the task
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                message = _explain(exc, text, broken)
                if is_check(statement):
                    results.append(CheckResult(text, False, message))
                    print(f"✘ {message}", flush=True)
                else:
                    broken = broken or f"`{_short(text)}` failed: {message}"
                continue
            if is_check(statement):
                results.append(CheckResult(text, True))
    finally:
        checks.grading_answers(None)
    if not results:  # a cell with no checks at all passes when it runs through
        results.append(CheckResult(source.strip(), not broken, broken))
    earned = sum(c.passed for c in results) * points / count if results else 0.0
    score = Score(grade_id, points, round(min(points, earned), 2), results)
    print(f"{score.score:g} of {points:g} points: {sum(c.passed for c in results)} of {len(results)} checks passed",
          flush=True)  # fmt: skip
    return score


def _explain(exc: BaseException, text: str, broken: str) -> str:
    """What a failed check says: its own message and hint; for anything else, what went wrong where."""
    if isinstance(exc, LabkitError):
        return str(exc)
    if isinstance(exc, AssertionError):
        return str(exc) or f"`{_short(text)}` does not hold."
    if isinstance(exc, NameError) and broken:
        return f"not checked: {broken}"
    where = traceback.extract_tb(exc.__traceback__)[-1:]
    line = f" (line {where[0].lineno} of {where[0].filename})" if where else ""
    return f"could not be checked: {type(exc).__name__}: {exc}{line}"


def _short(text: str, width: int = 120) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width and "\n" not in text.strip() else first[: width - 1] + "…"


def finish(scope: dict) -> dict:
    """At the end of a graded run, in the grader's kernel: the measurements its lab made (as the results file
    keeps them), then the lab closed (experiments removed, lost nodes back; the namespace is the grader's to
    delete)."""
    from labkit.lab import Lab

    labs = [value for value in scope.values() if isinstance(value, Lab)]
    runs = {lab.run_id: {"lab": lab.id, "namespace": lab.namespace, "recoveries": [r.as_dict() for r in lab.recoveries]}
            for lab in labs}  # fmt: skip
    out = io.StringIO()
    saved, sys.stdout = sys.stdout, out  # closing says so; the grader does not need to hear it
    try:
        for lab in labs:
            lab.close(quiet=True)
    finally:
        sys.stdout = saved
    return runs
