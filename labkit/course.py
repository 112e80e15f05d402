"""The grading pipeline: nbgrader, made to work from a fresh checkout, against a fresh cluster.

The course root is ``graders/`` (``nbgrader_config.py``, the gradebook and
nbgrader's step folders); its source notebooks are the repository's
``notebooks/``. Each command is one of nbgrader's, run through its Python API:

* ``release``: ``generate_assignment`` (the student version: solutions replaced by
  stubs, hidden tests removed), and with an exchange ``release_assignment``;
* ``collect``: nbgrader's ``collect`` from the exchange;
* ``autograde``: places the given submissions where nbgrader looks for them, starts
  a fresh grading sandbox (or uses ``$KUBECONFIG``), and re-executes every
  submission with ``autograde``, one trainee at a time, showing progress; each run
  of a lab makes its own namespace, so submissions never see each other's state;
* ``feedback``: ``generate_feedback``, and with an exchange ``release_feedback``;
* ``scores``: the gradebook's scores, per task.

nbgrader calls ``alembic`` by name, so this Python's ``bin`` goes first on PATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from labkit.errors import LabkitError

REPOSITORY = Path(__file__).resolve().parent.parent
GRADING_SANDBOX = "grading"
STUDENT_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def default_root() -> Path:
    """``$LABKIT_COURSE_ROOT``, else the repository's ``graders/``."""
    return Path(os.environ.get("LABKIT_COURSE_ROOT") or REPOSITORY / "graders")


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

    @property
    def failed(self) -> list[str]:
        return [t.name for t in self.tasks if t.score < t.max_score]


class Course:
    """One nbgrader course root."""

    def __init__(self, root: Path | None = None, source: Path | None = None, exchange: Path | None = None) -> None:
        self.root = (root or default_root()).resolve()
        config_file = self.root / "nbgrader_config.py"
        if not config_file.exists():
            raise LabkitError(f"{self.root} is not a course root: it has no nbgrader_config.py.",
                              hint="Use the repository's graders/ folder, or pass --root to one that has it.")  # fmt: skip
        self.source = (source or REPOSITORY / "notebooks").resolve()
        self.exchange = exchange
        _nbgrader_on_path()
        self._api: Any = None

    # -- nbgrader ----------------------------------------------------------------------------

    @property
    def api(self) -> Any:
        if self._api is None:
            from sqlalchemy.exc import SAWarning

            # nbgrader's gradebook code trips SQLAlchemy's autoflush warnings; they say nothing to an instructor.
            warnings.filterwarnings("ignore", category=SAWarning)
            from nbgrader.apps import NbGraderAPI
            from nbgrader.coursedir import CourseDirectory
            from traitlets.config import Config
            from traitlets.config.loader import PyFileConfigLoader

            config = Config()
            config.merge(PyFileConfigLoader("nbgrader_config.py", path=str(self.root)).load_config())
            config.CourseDirectory.root = str(self.root)
            config.CourseDirectory.source_directory = str(self.source)
            if self.exchange is not None:
                config.Exchange.root = str(self.exchange)
            with _in(self.root):
                self._api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)
        return self._api

    def labs(self) -> list[str]:
        return sorted(p.name for p in self.source.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))

    def _lab(self, lab: str) -> str:
        labs = self.labs()
        matches = [name for name in labs if name == lab] or [name for name in labs if name.startswith(lab)]
        if len(matches) != 1:
            raise LabkitError(f"There is no lab {lab!r}." if not matches else f"{lab!r} could be {', '.join(matches)}.",
                              hint=f"The labs are: {', '.join(labs)}.")  # fmt: skip
        return matches[0]

    def grades_alone(self, lab: str) -> str:
        """Why two runs of ``lab`` at once on one cluster would disturb each other ('' if they would not), as its
        notebooks' metadata ``labkit.grade_alone`` says: a lab that stops nodes, or that measures tail latency."""
        import nbformat

        reasons = [nbformat.read(self.source / lab / name, as_version=4).metadata.get("labkit", {}).get("grade_alone")
                   for name in self.notebooks(lab)]  # fmt: skip
        return next((r if isinstance(r, str) else "needs its cluster to itself" for r in reasons if r), "")

    def notebooks(self, lab: str) -> list[str]:
        return sorted(p.name for p in (self.source / lab).glob("*.ipynb"))

    def _run(self, what: str, call: Callable[[], dict]) -> dict:
        with _in(self.root):
            result = call()
        if not result.get("success"):
            detail = (result.get("error") or result.get("log") or "").strip()
            raise LabkitError(f"nbgrader could not {what}.\n{detail[-3000:]}")
        return result

    # -- the commands --------------------------------------------------------------------------

    def release(self, lab: str, *, exchange: bool = False, say: Callable[[str], None] = print) -> Path:
        """The student version of ``lab`` in ``release/LAB``; also to the exchange if asked. Its folder."""
        lab = self._lab(lab)
        self._run(f"generate the student version of {lab}", lambda: self.api.generate_assignment(lab, force=True))
        folder = self.root / "release" / lab
        say(f"{lab}: student version in {folder}")
        if exchange:
            self._run(f"release {lab} to the exchange", lambda: self.api.release_assignment(lab))
            say(f"{lab}: released to the exchange; trainees can fetch it from the Assignments tab")
        return folder

    def collect(self, lab: str, *, say: Callable[[str], None] = print) -> None:
        lab = self._lab(lab)
        self._run(f"collect {lab}", lambda: self.api.collect(lab))
        say(f"{lab}: submissions collected into {self.root / 'submitted'}")

    def submit(self, lab: str, paths: list[Path]) -> list[str]:
        """Place submissions where nbgrader looks (``submitted/STUDENT/LAB/NOTEBOOK``); the students.

        A notebook file is the student named by its file name (or, if it has the lab's own file name, by
        its folder's); a folder is a student, named by it, holding their notebook."""
        lab = self._lab(lab)
        expected = self.notebooks(lab)
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
            target = self.root / "submitted" / student / lab
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for file in files:
                # One notebook per lab: a trainee's copy is graded as that notebook, whatever its file is called.
                name = file.name if file.name in expected or len(expected) != 1 else expected[0]
                shutil.copy2(file, target / name)
            students.append(student)
        return students

    def submitted(self, lab: str) -> list[str]:
        folder = self.root / "submitted"
        return sorted(p.name for p in folder.iterdir() if (p / lab).is_dir()) if folder.is_dir() else []

    def autograde(self, lab: str, paths: list[Path] | None = None, *, cluster: str = "sandbox", parallel: int = 1,
                  say: Callable[[str], None] = print) -> list[Result]:  # fmt: skip
        """Grade ``lab``'s submissions (those given, else all submitted) against a fresh cluster, ``parallel``
        at a time (each lab run waits on its cluster more than it computes, so a few at once finish sooner)."""
        lab = self._lab(lab)
        if not (self.root / "release" / lab).exists() or not self._in_gradebook(lab):
            self.release(lab, say=say)
        students = self.submit(lab, paths) if paths else self.submitted(lab)
        if not students:
            raise LabkitError(f"No submissions of {lab} to grade.",
                              hint=f"Pass them: `labkit course autograde {lab} alice.ipynb bob/ ...`, or collect them.")  # fmt: skip
        parallel = max(1, min(parallel, len(students)))
        alone = self.grades_alone(lab) if parallel > 1 else ""
        if alone:
            say(f"{lab} {alone}: its submissions are graded one at a time.")
            parallel = 1
        results = []
        with grading_cluster(cluster, say=say):
            say(f"grading {len(students)} submission{'s' if len(students) > 1 else ''} of {lab}"
                + (f", {parallel} at a time" if parallel > 1 else "") + "...")
            graded = self._grade_here(lab, students) if parallel == 1 else self._grade_in_workers(lab, students, parallel)
            for number, (student, seconds, error) in enumerate(graded, 1):
                result = self.score(lab, student)
                result.seconds, result.error = seconds, error
                results.append(result)
                failed = f"; not passed: {', '.join(result.failed)}" if result.failed else ""
                say(f"[{number}/{len(students)}] {student}: {result.score:g}/{result.max_score:g} in {seconds:.1f} s"
                    f"{failed}" + (f" (nbgrader: {error})" if error else ""))  # fmt: skip
        return results

    def _grade_here(self, lab: str, students: list[str]) -> Iterator[tuple[str, float, str]]:
        """Grade in this process, one after another: (student, seconds, nbgrader's error) as each is done."""
        for student in students:
            started = time.monotonic()
            outcome = self.api.autograde(lab, student, force=True, create=True)
            yield student, time.monotonic() - started, _failure(outcome)

    def _grade_in_workers(self, lab: str, students: list[str], workers: int) -> Iterator[tuple[str, float, str]]:
        """Grade ``workers`` shares of the students at once: one here, the others each in a process of its
        own (``python -m labkit.course``); they share the gradebook, whose writes are short. Yields as each
        submission is done."""
        shares = [students[i::workers] for i in range(workers)]
        done: queue.Queue[tuple[str, float, str] | None] = queue.Queue()
        for share in shares[1:]:
            log = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen([sys.executable, "-m", "labkit.course", str(self.root), str(self.source), lab, *share],
                                    stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
            threading.Thread(target=_relay, args=(proc, share, log, done), daemon=True).start()
        running = len(shares) - 1
        for item in self._grade_here(lab, shares[0]):
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

    def _in_gradebook(self, lab: str) -> bool:
        from nbgrader.api import Gradebook, MissingEntry

        with Gradebook(self.api.coursedir.db_url) as book:
            try:
                book.find_assignment(lab)
            except MissingEntry:
                return False
        return True

    def score(self, lab: str, student: str) -> Result:
        from nbgrader.api import Gradebook, MissingEntry

        with Gradebook(self.api.coursedir.db_url) as book:
            try:
                submission = book.find_submission(lab, student)
            except MissingEntry:
                max_score = book.find_assignment(lab).max_score
                return Result(student, 0.0, max_score, [], error="not graded")
            tasks = [TaskScore(g.name, g.score, g.max_score) for nb in submission.notebooks for g in nb.grades
                     if g.max_score]  # fmt: skip
            return Result(student, submission.score, submission.max_score, tasks)

    def scores(self, lab: str) -> list[Result]:
        lab = self._lab(lab)
        return [self.score(lab, student) for student in self.submitted(lab)]

    def recoveries(self, lab: str | None = None, *, graded: bool = False) -> list[dict]:
        """The time-to-detect and time-to-recover measurements (``labkit.recovery``) of each trainee's run of
        ``lab`` (default: of every lab, in course order): as submitted (the trainee's own session, when they
        acted), or as graded (the re-run). One dict per measurement, with its ``student`` and ``lab``."""
        from labkit.recovery import RESULTS_FILE

        folder = self.root / ("autograded" if graded else "submitted")
        found = []
        for name in [self._lab(lab)] if lab else self.labs():
            for path in sorted(folder.glob(f"*/{name}/{RESULTS_FILE}")):
                try:
                    runs = json.loads(path.read_text()).get("runs", {})
                except (OSError, ValueError):
                    continue  # a damaged file: that trainee has no figures
                for run in runs.values():
                    found += [{**record, "student": path.parts[-3], "lab": name} for record in run.get("recoveries", [])]
        return found

    def feedback(self, lab: str, *, exchange: bool = False, say: Callable[[str], None] = print) -> Path:
        lab = self._lab(lab)
        self._run(f"generate feedback for {lab}", lambda: self.api.generate_feedback(lab))
        say(f"{lab}: feedback in {self.root / 'feedback'} (one HTML file per trainee)")
        if exchange:
            self._run(f"return feedback for {lab}", lambda: self.api.release_feedback(lab))
            say(f"{lab}: feedback returned through the exchange")
        return self.root / "feedback"


def _failure(outcome: dict) -> str:
    """nbgrader's own error for a submission it could not grade (the last line of its message), or ""."""
    if outcome.get("success"):
        return ""
    text = (outcome.get("error") or outcome.get("log") or "").strip()
    return text.splitlines()[-1] if text else "failed"


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


def _worker(argv: list[str]) -> int:
    """``python -m labkit.course ROOT SOURCE LAB STUDENT...``: grade those students, a JSON line for each."""
    root, source, lab, *students = argv
    course = Course(Path(root), Path(source))
    for student in students:
        started = time.monotonic()
        outcome = course.api.autograde(lab, student, force=True, create=True)
        print(json.dumps([student, time.monotonic() - started, _failure(outcome)]), flush=True)
    return 0


@contextlib.contextmanager
def grading_cluster(cluster: str, *, say: Callable[[str], None] = print) -> Iterator[None]:
    """Point the notebooks nbgrader runs at the grading cluster: a fresh sandbox named ``grading`` (made
    anew for each grading run, so results never depend on what came before), or ``$KUBECONFIG``."""
    saved = {key: os.environ.get(key) for key in ("KUBECONFIG", "LABKIT_CLUSTER")}
    try:
        if cluster == "sandbox":
            from labkit.sandbox.controlplane import Sandbox

            sandbox = Sandbox(GRADING_SANDBOX)
            sandbox.down(purge=True, say=lambda _: None)
            say("starting a fresh grading sandbox...")
            sandbox.up(say=lambda _: None)
            os.environ["KUBECONFIG"] = str(sandbox.state.kubeconfig)
        elif cluster != "kubeconfig":
            raise LabkitError(f"--cluster {cluster!r}: grade against `sandbox` (a fresh local one) or `kubeconfig`.")
        elif not os.environ.get("KUBECONFIG"):
            raise LabkitError("--cluster kubeconfig needs $KUBECONFIG set to the grading cluster's kubeconfig.")
        os.environ["LABKIT_CLUSTER"] = "kubeconfig"
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _in(folder: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _nbgrader_on_path() -> None:
    """nbgrader runs ``alembic`` (and kernels) by name: this Python's bin folder goes first on PATH."""
    folder = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != folder:
        os.environ["PATH"] = folder + os.pathsep + path


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
