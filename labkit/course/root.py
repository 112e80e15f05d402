"""One nbgrader course root, and nbgrader's API run against it from any folder.

The course root is ``graders/`` (``nbgrader_config.py``, the gradebook and
nbgrader's step folders); its source notebooks are the repository's
``notebooks/``. Each stage of the pipeline (``release``, ``grade``, ``gradebook``,
``reports``) works on a ``Course``; its methods are the stages' entry points.
nbgrader calls ``alembic`` by name, so this Python's ``bin`` goes first on PATH.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from labkit.errors import LabkitError

REPOSITORY = Path(__file__).resolve().parents[2]


def default_root() -> Path:
    """``$LABKIT_COURSE_ROOT``, else the repository's ``graders/``."""
    return Path(os.environ.get("LABKIT_COURSE_ROOT") or REPOSITORY / "graders")


def nbgrader_config(root: Path, source: Path, exchange: Path | None = None) -> Any:
    """nbgrader's configuration for the course at ``root``: its ``nbgrader_config.py``, with the source folder
    and the grading steps labkit adds (``labkit.course.execute``), whatever that file says."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    from labkit.course import execute

    config = Config()
    config.merge(PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config())
    config.CourseDirectory.root = str(root)
    config.CourseDirectory.source_directory = str(source)
    config.Autograde.autograde_preprocessors = execute.autograde_preprocessors()
    if exchange is not None:
        config.Exchange.root = str(exchange)
    return config


class Course:
    """One nbgrader course root (see the module's docstring); the pipeline's stages as methods."""

    def __init__(self, root: Path | None = None, source: Path | None = None, exchange: Path | None = None) -> None:
        self.root = (root or default_root()).resolve()
        if not (self.root / "nbgrader_config.py").exists():
            raise LabkitError(f"{self.root} is not a course root: it has no nbgrader_config.py.",
                              hint="Use the repository's graders/ folder, or pass --root to one that has it.")  # fmt: skip
        self.source = (source or REPOSITORY / "notebooks").resolve()
        self.exchange = exchange
        nbgrader_on_path()
        self._api: Any = None

    @property
    def api(self) -> Any:
        """nbgrader's ``NbGraderAPI`` for this course (made on first use: importing nbgrader takes a while)."""
        if self._api is None:
            from sqlalchemy.exc import SAWarning

            # nbgrader's gradebook code trips SQLAlchemy's autoflush warnings; they say nothing to an instructor.
            warnings.filterwarnings("ignore", category=SAWarning)
            from nbgrader.apps import NbGraderAPI
            from nbgrader.coursedir import CourseDirectory

            config = nbgrader_config(self.root, self.source, self.exchange)
            with inside(self.root):
                self._api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)
        return self._api

    # -- the labs -------------------------------------------------------------------------------

    def labs(self) -> list[str]:
        return sorted(p.name for p in self.source.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))

    def lab(self, lab: str) -> str:
        """The lab ``lab`` names: a whole name, or its unique beginning ("01")."""
        labs = self.labs()
        matches = [name for name in labs if name == lab] or [name for name in labs if name.startswith(lab)]
        if len(matches) != 1:
            raise LabkitError(f"There is no lab {lab!r}." if not matches else f"{lab!r} could be {', '.join(matches)}.",
                              hint=f"The labs are: {', '.join(labs)}.")  # fmt: skip
        return matches[0]

    def notebooks(self, lab: str) -> list[str]:
        return sorted(p.name for p in (self.source / lab).glob("*.ipynb"))

    def grades_alone(self, lab: str) -> str:
        """Why two runs of ``lab`` at once on one cluster would disturb each other ('' if they would not), as its
        notebooks' metadata ``labkit.grade_alone`` says: a lab that stops nodes, or that measures tail latency."""
        import nbformat

        reasons = [nbformat.read(self.source / lab / name, as_version=4).metadata.get("labkit", {}).get("grade_alone")
                   for name in self.notebooks(lab)]  # fmt: skip
        return next((r if isinstance(r, str) else "needs its cluster to itself" for r in reasons if r), "")

    def run(self, what: str, call: Callable[[], dict]) -> dict:
        """One of nbgrader's API calls, from the course root; its failure as a LabkitError with nbgrader's words."""
        with inside(self.root):
            result = call()
        if not result.get("success"):
            detail = (result.get("error") or result.get("log") or "").strip()
            raise LabkitError(f"nbgrader could not {what}.\n{detail[-3000:]}")
        return result

    # -- the stages -------------------------------------------------------------------------------

    def release(self, lab: str, *, exchange: bool = False, say: Callable[[str], None] = print) -> Path:
        from labkit.course import release

        return release.release(self, lab, exchange=exchange, say=say)

    def collect(self, lab: str, *, say: Callable[[str], None] = print) -> None:
        from labkit.course import release

        release.collect(self, lab, say=say)

    def feedback(self, lab: str, *, exchange: bool = False, say: Callable[[str], None] = print) -> Path:
        from labkit.course import release

        return release.feedback(self, lab, exchange=exchange, say=say)

    def submit(self, lab: str, paths: list[Path]) -> list[str]:
        from labkit.course import grade

        return grade.submit(self, lab, paths)

    def submitted(self, lab: str) -> list[str]:
        folder = self.root / "submitted"
        return sorted(p.name for p in folder.iterdir() if (p / lab).is_dir()) if folder.is_dir() else []

    def autograde(self, lab: str, paths: list[Path] | None = None, *, cluster: str = "sandbox", parallel: int = 1,
                  keep: bool = False, say: Callable[[str], None] = print) -> list:  # fmt: skip
        from labkit.course import grade

        return grade.autograde(self, lab, paths, cluster=cluster, parallel=parallel, keep=keep, say=say)

    def score(self, lab: str, student: str):  # noqa: ANN201 - a gradebook.Result
        from labkit.course import gradebook

        return gradebook.score(self, lab, student)

    def scores(self, lab: str) -> list:
        from labkit.course import gradebook

        lab = self.lab(lab)
        return [gradebook.score(self, lab, student) for student in self.submitted(lab)]

    def recoveries(self, lab: str | None = None, *, graded: bool = False) -> list[dict]:
        from labkit.course import reports

        return reports.recoveries(self, lab, graded=graded)


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Work in ``folder`` for a while (nbgrader reads its configuration and gradebook from the working folder)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def nbgrader_on_path() -> None:
    """nbgrader runs ``alembic`` (and kernels) by name: this Python's bin folder goes first on PATH."""
    folder = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != folder:
        os.environ["PATH"] = folder + os.pathsep + path
