"""The grading stage: place submissions, start a grading cluster of this run's own, autograde, clean up.

``autograde`` places the given submissions where nbgrader looks for them, starts a
fresh grading sandbox named for this run (``grading-<id>``: two runs at once, of two
labs or by two instructors, never share or purge each other's), and re-executes
every submission with nbgrader's ``autograde``, several at a time, showing progress.
How each notebook is run and scored, outside the trainee's kernel, is
``labkit.course.execute``. When the run ends, however it ends, its sandbox is
stopped and deleted (``keep=True`` leaves it running for a look).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from labkit.course import confine, release
from labkit.course.gradebook import Result
from labkit.errors import LabkitError

if TYPE_CHECKING:
    from labkit.course.root import Course

GRADING_SANDBOX = "grading"  # the prefix of every grading run's sandbox
STUDENT_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def submit(course: Course, lab: str, paths: list[Path]) -> list[str]:
    """Place submissions where nbgrader looks (``submitted/STUDENT/LAB/NOTEBOOK``); the students.

    A notebook file is the student named by its file name (or, if it has the lab's own file name, by
    its folder's); a folder is a student, named by it, holding their notebook."""
    lab = course.lab(lab)
    expected = course.notebooks(lab)
    students = []
    for path in paths:
        path = path.expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.ipynb"))
            student = path.name
        elif path.suffix == ".ipynb" and path.is_file():
            files = [path]
            student = path.parent.name if path.name in expected else path.stem
        else:
            raise LabkitError(f"{path} is neither a notebook (.ipynb) nor a folder of one.")
        if not files:
            raise LabkitError(f"{path} holds no notebook.")
        student = STUDENT_ID.sub("-", student).strip("-.") or "trainee"
        target = course.root / "submitted" / student / lab
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for file in files:
            # One notebook per lab: a trainee's copy is graded as that notebook, whatever its file is called.
            name = file.name if file.name in expected or len(expected) != 1 else expected[0]
            shutil.copy2(file, target / name)
        students.append(student)
    return students


def autograde(course: Course, lab: str, paths: list[Path] | None = None, *, cluster: str = "sandbox",
              parallel: int = 1, keep: bool = False, say: Callable[[str], None] = print) -> list[Result]:  # fmt: skip
    """Grade ``lab``'s submissions (those given, else all submitted) against a fresh cluster, ``parallel``
    at a time (each lab run waits on its cluster more than it computes, so a few at once finish sooner)."""
    lab = course.lab(lab)
    if not (course.root / "release" / lab).exists() or not release.in_gradebook(course, lab):
        course.release(lab, say=say)
    students = submit(course, lab, paths) if paths else course.submitted(lab)
    if not students:
        raise LabkitError(f"No submissions of {lab} to grade.",
                          hint=f"Pass them: `labkit course autograde {lab} alice.ipynb bob/ ...`, or collect them.")  # fmt: skip
    parallel = max(1, min(parallel, len(students)))
    alone = course.grades_alone(lab) if parallel > 1 else ""
    if alone:
        say(f"{lab} {alone}: its submissions are graded one at a time.")
        parallel = 1
    unconfined = confine.unavailable()
    if unconfined:
        say(f"the trainees' kernels run unconfined, as the grading user, on this machine: {unconfined}")
    results = []
    with grading_cluster(cluster, keep=keep, say=say):
        say(f"grading {len(students)} submission{'s' if len(students) > 1 else ''} of {lab}"
            + (f", {parallel} at a time" if parallel > 1 else "") + "...")
        graded = _grade_here(course, lab, students) if parallel == 1 else _grade_in_workers(course, lab, students, parallel)
        for number, (student, seconds, error) in enumerate(graded, 1):
            result = course.score(lab, student)
            result.seconds, result.error = seconds, error
            results.append(result)
            failed = f"; not passed: {', '.join(result.failed)}" if result.failed else ""
            flagged = f"; FLAGGED: {len(result.flags)} (labkit course scores {lab})" if result.flags else ""
            say(f"[{number}/{len(students)}] {student}: {result.score:g}/{result.max_score:g} in {seconds:.1f} s"
                f"{failed}{flagged}" + (f" (nbgrader: {error})" if error else ""))  # fmt: skip
    return results


def _grade_here(course: Course, lab: str, students: list[str]) -> Iterator[tuple[str, float, str]]:
    """Grade in this process, one after another: (student, seconds, nbgrader's error) as each is done."""
    for student in students:
        started = time.monotonic()
        outcome = course.api.autograde(lab, student, force=True, create=True)
        yield student, time.monotonic() - started, _failure(outcome)


def _grade_in_workers(course: Course, lab: str, students: list[str], workers: int) -> Iterator[tuple[str, float, str]]:
    """Grade ``workers`` shares of the students at once: one here, the others each in a process of its own
    (``python -m labkit.course``); they share the gradebook, whose writes are short. Yields as each
    submission is done."""
    shares = [students[i::workers] for i in range(workers)]
    done: queue.Queue[tuple[str, float, str] | None] = queue.Queue()
    for share in shares[1:]:
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([sys.executable, "-m", "labkit.course", str(course.root), str(course.source), lab, *share],
                                stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
        threading.Thread(target=_relay, args=(proc, share, log, done), daemon=True).start()
    running = len(shares) - 1
    for item in _grade_here(course, lab, shares[0]):
        yield item
        while True:  # what the workers finished meanwhile
            try:
                other = done.get_nowait()
            except queue.Empty:
                break
            running -= other is None
            if other is not None:
                yield other
    while running:
        other = done.get()
        running -= other is None
        if other is not None:
            yield other


def _failure(outcome: dict) -> str:
    """Why nbgrader could not grade a submission ("" if it could): the last error its log names (not its closing
    "see the above traceback")."""
    if outcome.get("success"):
        return ""
    text = "\n".join(filter(None, (outcome.get("log"), outcome.get("error"))))
    errors = [line.strip() for line in text.splitlines()
              if re.match(r"^\s*[A-Za-z_.]*(Error|Exception|Exit)\b.*:", line) and "NbGraderException" not in line]  # fmt: skip
    return errors[-1] if errors else (text.strip().splitlines() or ["failed"])[-1]


def _relay(proc: subprocess.Popen, share: list[str], log: Any, done: queue.Queue) -> None:
    """Pass a worker's results on as they come; a worker that dies marks what it did not grade."""
    graded = set()
    try:
        for line in proc.stdout:
            try:
                student, seconds, error = json.loads(line)
            except ValueError:
                continue  # something else printed on the worker's stdout
            graded.add(student)
            done.put((student, seconds, error))
        proc.wait()
        if proc.returncode != 0 or len(graded) < len(share):
            log.seek(0)
            tail = log.read().strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            for student in share:
                if student not in graded:
                    done.put((student, 0.0, f"grading process failed: {tail[0]}"))
    finally:
        log.close()
        done.put(None)


def worker(argv: list[str]) -> int:
    """``python -m labkit.course ROOT SOURCE LAB STUDENT...``: grade those students, a JSON line for each."""
    from labkit.course.root import Course

    root, source, lab, *students = argv
    course = Course(Path(root), Path(source))
    for student in students:
        started = time.monotonic()
        outcome = course.api.autograde(lab, student, force=True, create=True)
        print(json.dumps([student, time.monotonic() - started, _failure(outcome)]), flush=True)
    return 0


def grading_sandbox_name() -> str:
    """A name no other grading run on this machine uses (a sandbox name is at most 40 characters)."""
    return f"{GRADING_SANDBOX}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def grading_cluster(cluster: str, *, keep: bool = False, say: Callable[[str], None] = print) -> Iterator[str | None]:
    """Point the notebooks nbgrader runs at the grading cluster: a fresh sandbox of this run's own (its name is
    yielded), stopped and deleted when the run ends unless ``keep``; or ``$KUBECONFIG`` (None is yielded)."""
    saved = {key: os.environ.get(key) for key in ("KUBECONFIG", "LABKIT_CLUSTER")}
    sandbox = None
    try:
        if cluster == "sandbox":
            from labkit.sandbox.controlplane import Sandbox

            sandbox = Sandbox(grading_sandbox_name())
            say(f"starting a fresh grading sandbox ({sandbox.name})...")
            sandbox.up(say=lambda _: None)
            os.environ["KUBECONFIG"] = str(sandbox.state.kubeconfig)
        elif cluster != "kubeconfig":
            raise LabkitError(f"--cluster {cluster!r}: grade against `sandbox` (a fresh local one) or `kubeconfig`.")
        elif not os.environ.get("KUBECONFIG"):
            raise LabkitError("--cluster kubeconfig needs $KUBECONFIG set to the grading cluster's kubeconfig.")
        os.environ["LABKIT_CLUSTER"] = "kubeconfig"
        yield sandbox.name if sandbox else None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if sandbox is not None:
            if keep:
                say(f"the grading sandbox {sandbox.name} is still running: `labkit sandbox down --name {sandbox.name} "
                    "--purge` removes it")  # fmt: skip
            else:
                sandbox.down(purge=True, say=lambda _: None)
