"""Grading outside the trainee's kernel: nbgrader's Execute step, with a second kernel that decides the grade.

nbgrader runs a notebook's hidden tests in the trainee's own kernel, where the
trainee's code could have replaced whatever they call: labkit's checks, its
client, builtins, IPython's error display. So here the submission still runs in
its own kernel, as the trainee wrote it, and beside it runs a **grader kernel**
that executes only the instructor's code, from the source notebook, against the
same namespace of the grading cluster, with the grader's own credentials:

* a cell of the trainee's, or a locked cell by default, runs in the trainee's kernel;
* a locked cell marked ``"labkit": {"runs": "both"}`` (imports, ``start_lab``,
  helpers, manifests) runs in both;
* a locked cell marked ``"labkit": {"runs": "grader"}`` (a fault injected and
  measured, which the checks rely on) runs in the grader's kernel alone; what it
  assigns is handed to the trainee's kernel as data (``labkit.course.transfer``);
* a graded cell runs in the trainee's kernel (what the trainee saw), then check by
  check in the grader's (``labkit.course.scoring``), with the trainee's answers
  read out of their kernel as plain values (``labkit.course.answers``). The
  grader's output and score replace the kernel's.

Roles come from the instructor's source notebook, never from the submission. A
grade therefore depends only on the cluster's state and the answers' values. The
trainee's kernel works in a namespace made for the run, as a trainee's account
there (``labkit.course.workspace``), confined on this machine (``labkit.course.confine``).
The grader notes what it saw for the instructor (``flags``): a check that passed
in the trainee's kernel and not in the grader's, an answer that was an object,
a kernel that exited, a results file the notebook wrote itself. ``FlagCells``
marks the flagged tasks "needs manual grade" in the gradebook; the grader's record
(every check, the flags, the measurements it made) is ``labkit-results.json``
beside the graded notebook.
"""

from __future__ import annotations

import copy
import json
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbgrader.preprocessors import Execute, NbGraderPreprocessor

from labkit.course import answers, confine, scoring, transfer
from labkit.course.gradebook import RESULTS_FILE, read_results
from labkit.course.workspace import Workspace

ROLES = ("kernel", "both", "grader")
HIDDEN_TIMEOUT = 60  # seconds for the grader's short requests to the trainee's kernel


def autograde_preprocessors() -> list:
    """nbgrader's autograde steps, with its Execute replaced by ``GradingExecute`` and ``FlagCells`` after the
    grades are saved."""
    from nbconvert.preprocessors import ClearMetadataPreprocessor
    from nbgrader.preprocessors import AssignLatePenalties, CheckCellMetadata, IgnorePattern, LimitOutput, SaveAutoGrades

    return [GradingExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput, SaveAutoGrades, FlagCells,
            AssignLatePenalties, CheckCellMetadata]  # fmt: skip


@dataclass
class Role:
    kind: str  # "kernel", "both", "grader" or "grade"
    source: str = ""  # the instructor's source of a trusted cell
    points: float = 0.0


@dataclass
class Flag:
    message: str
    grade_id: str | None = None  # the task it concerns, if one

    def as_dict(self) -> dict:
        return {"message": self.message, "grade_id": self.grade_id}


def roles(source: nbformat.NotebookNode) -> dict[str, Role]:
    """Each trusted cell of the instructor's notebook by grade_id: graded cells and locked cells, with their role."""
    found = {}
    for cell in source.cells:
        meta = cell.metadata.get("nbgrader", {})
        grade_id = meta.get("grade_id")
        if cell.cell_type != "code" or not grade_id or meta.get("solution"):
            continue  # a trainee's answer cell is theirs: it runs in their kernel
        if meta.get("grade"):
            found[grade_id] = Role("grade", cell.source, float(meta.get("points", 0)))
        elif meta.get("locked"):
            runs = cell.metadata.get("labkit", {}).get("runs", "kernel")
            found[grade_id] = Role(runs if runs in ROLES else "kernel", cell.source)
    return found


def _errors(outputs: list) -> bool:
    return any(o.get("output_type") == "error" or (o.get("output_type") == "stream" and o.get("name") == "stderr")
               for o in outputs)  # fmt: skip


def _text(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def _over_socket_files(manager: Any, folder: Path) -> Any:
    """A kernel manager whose kernel keeps its connection file and talks over socket files in ``folder`` (a private
    one: only its owner can open them, and the other kernel of the run does not see it), not over loopback ports."""
    manager.connection_file = str(folder / "kernel.json")
    manager.transport, manager.ip = "ipc", str(folder / "kernel")
    return manager


class GraderKernel:
    """The grader's own kernel: a fresh IPython with a profile, working folder and sys.path of its own (nothing a
    submission brought can be imported there), running only the instructor's code."""

    def __init__(self, kernel_name: str, env: dict[str, str], timeout: int | None, startup_timeout: int, log: Any) -> None:
        self.home = confine.private_folder("grader-")
        (self.home / "ipython").mkdir()
        self.notebook = nbformat.v4.new_notebook()
        env = {**env, "IPYTHONDIR": str(self.home / "ipython"), "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1"}
        self.client = NotebookClient(self.notebook, timeout=timeout, startup_timeout=startup_timeout, log=log,
                                     kernel_name=kernel_name, allow_errors=True,
                                     resources={"metadata": {"path": str(self.home)}})  # fmt: skip
        self.client.km = _over_socket_files(self.client.create_kernel_manager(), self.home)
        self.client.start_new_kernel(env=env)
        self.client.start_new_kernel_client()

    def run(self, source: str) -> list:
        """Run ``source``; its outputs (errors among them)."""
        cell = nbformat.v4.new_code_cell(source)
        self.notebook.cells.append(cell)
        try:
            self.client.execute_cell(cell, len(self.notebook.cells) - 1, store_history=False)
        except DeadKernelError:
            cell.outputs.append(nbformat.v4.new_output("error", ename="DeadKernelError", evalue="the grader's kernel died",
                                                       traceback=["The grader's kernel died."]))  # fmt: skip
        return cell.outputs

    def value(self, expression: str) -> Any:
        """The JSON value ``expression`` gives in the grader's kernel (None if it fails)."""
        mark = f"labkit-value-{secrets.token_hex(6)}:"
        outputs = self.run(f"import json as _labkit_json\nprint({mark!r} + _labkit_json.dumps({expression}))")
        found = answers.read(_text(outputs), mark)
        return json.loads(found) if found else None

    def close(self) -> None:
        try:
            self.client._cleanup_kernel()
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


class GradingExecute(Execute):
    """nbgrader's Execute, with the grade decided in the grader's kernel (see the module's docstring)."""

    def preprocess(self, nb: nbformat.NotebookNode, resources: Any = None, km: Any = None) -> tuple:
        info = resources["nbgrader"]
        self.trusted = roles(self._source_notebook(info))
        self.flags: list[Flag] = []
        self.scores: dict[str, dict] = {}
        self.dead_at: str | None = None  # the cell in which the trainee's kernel died
        self.folder = Path(resources.get("metadata", {}).get("path") or ".")
        self.source_folder = self._source_path(info).parent
        self.workspace = Workspace(info["assignment"], warn=self.log.warning)
        NotebookClient.__init__(self, nb, km)
        self.reset_execution_trackers()
        self._check_assign_resources(resources)
        kernel = self.kernel_name or self.nb.metadata.get("kernelspec", {}).get("name") or "python3"
        runs: dict = {}
        try:
            self.grader = GraderKernel(kernel, self.workspace.grader_env(), self.timeout, self.startup_timeout, self.log)
            try:
                with self.setup_kernel(env=self.workspace.trainee_env()):
                    reply = self.wait_for_reply(self.kc.kernel_info())
                    self.nb.metadata["language_info"] = reply["content"]["language_info"]
                    for index, cell in enumerate(self.nb.cells):
                        self.preprocess_cell(cell, resources, index)
                runs = self.grader.value("__import__('labkit.course.scoring').course.scoring.finish(globals())") or {}
            finally:
                self.grader.close()
        finally:
            self.workspace.close()
        self.set_widgets_metadata()
        self._write_results(runs)
        self.resources["labkit"] = {"flags": [f.as_dict() for f in self.flags]}
        return self.nb, self.resources

    def create_kernel_manager(self) -> Any:
        """The trainee's kernel's manager: confined (``labkit.course.confine``) where bubblewrap runs, talking over
        socket files in the run's private folder."""
        if not confine.unavailable():
            self.kernel_manager_class = confine.ConfinedKernelManager
        manager = super().create_kernel_manager()
        if isinstance(manager, confine.ConfinedKernelManager):
            manager.writable, manager.hidden = [self.folder, self.workspace.folder], self._out_of_sight()
        return _over_socket_files(manager, self.workspace.folder)

    def _out_of_sight(self) -> list[Path]:
        """What the trainee's kernel must not see: every sandbox's state (keys, admin kubeconfigs), the course root
        (gradebook, other submissions), the source notebooks (hidden tests), Jupyter's runtime folder (other
        kernels' keys) and the graded kernels' private folders; not where this Python or labkit lives, which the
        kernel runs from."""
        from jupyter_core.paths import jupyter_runtime_dir
        from nbgrader.coursedir import CourseDirectory

        from labkit.paths import sandboxes_root

        needed = [Path(sys.prefix).resolve(), Path(__file__).resolve().parents[1]]
        folders = [sandboxes_root(), Path(CourseDirectory(config=self.config).root), self.source_folder,
                   Path(jupyter_runtime_dir()), self.grader.home.parent]  # fmt: skip
        return [f for f in folders if not any(n == f.resolve() or f.resolve() in n.parents for n in needed)]

    # -- cells ------------------------------------------------------------------------------------

    def preprocess_cell(self, cell: nbformat.NotebookNode, resources: Any, index: int) -> tuple:
        if cell.cell_type != "code":
            return cell, resources
        role = self._role(cell)
        if role.kind == "grade":
            self._grade(cell, role, resources, index)
        elif role.kind == "grader":
            cell.outputs = self.grader.run(role.source)
            self._hand_over(role.source, index)
        else:
            self._in_kernel(cell, resources, index)
            if role.kind == "both":
                outputs = self.grader.run(role.source)
                if _errors(outputs):
                    self.log.warning("The grader could not run cell %s: %s", index, _text(outputs)[-500:])
        return cell, resources

    def _role(self, cell: nbformat.NotebookNode) -> Role:
        """The cell's role: a trusted one only where the instructor's notebook has a locked or graded cell of that
        id (and then its source is the instructor's), else the trainee's kernel."""
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        role = self.trusted.get(grade_id) if grade_id else None
        if role is None or cell.metadata.get("nbgrader", {}).get("solution"):
            return Role("kernel")
        cell.source = role.source
        return role

    def _in_kernel(self, cell: nbformat.NotebookNode, resources: Any, index: int) -> None:
        """Run a cell in the trainee's kernel, as nbgrader does; once it has died, say so instead."""
        if self.dead_at is not None:
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                   text=f"(not run: the notebook's kernel had exited in {self.dead_at})\n")]  # fmt: skip
            return
        try:
            super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self.dead_at = cell.metadata.get("nbgrader", {}).get("grade_id") or f"cell {index + 1}"
            self.flags.append(Flag(f"the notebook's kernel exited during {self.dead_at}; the cells after it did not "
                                   "run in it, and its later answers are missing"))  # fmt: skip
            cell.outputs.append(nbformat.v4.new_output("error", ename="DeadKernelError", evalue="the kernel died",
                                                       traceback=["The notebook's kernel exited here."]))  # fmt: skip

    def _in_kernel_aside(self, code: str, index: int) -> str:
        """Run ``code`` in the trainee's kernel, outside the notebook; what it printed ("" if the kernel is gone)."""
        if self.dead_at is not None:
            return ""
        cell = nbformat.v4.new_code_cell(code)
        saved, self.timeout = self.timeout, HIDDEN_TIMEOUT
        notebook_cell = self.nb.cells[index]  # nbclient puts the cell it ran at its index: put the notebook's back
        try:
            self.execute_cell(cell, index, store_history=False)
        except DeadKernelError:
            self.dead_at = f"cell {index + 1}"
            self.flags.append(Flag(f"the notebook's kernel exited when the grader read from it at {self.dead_at}"))
            return ""
        finally:
            self.timeout = saved
            self.nb.cells[index] = notebook_cell
        if _errors(cell.outputs):  # the trainee's kernel may be in any state: worth a line in the log, no more
            self.log.warning("The grader's request to the notebook's kernel at cell %s failed: %s", index + 1,
                             " ".join(o.get("evalue", "") for o in cell.outputs if o.get("output_type") == "error"))
        return _text(cell.outputs)

    def _hand_over(self, source: str, index: int) -> None:
        """Give the trainee's kernel what a grader cell assigned, as data."""
        names = transfer.assigned(source)
        packed = self.grader.value(f"__import__('labkit.course.transfer').course.transfer.pack(globals(), {names!r})")
        if packed:
            self._in_kernel_aside(f"__import__('labkit.course.transfer').course.transfer.unpack({packed!r}, globals())", index)

    def _grade(self, cell: nbformat.NotebookNode, role: Role, resources: Any, index: int) -> None:
        grade_id = cell.metadata["nbgrader"]["grade_id"]
        in_kernel = copy.deepcopy(cell)
        self._in_kernel(in_kernel, resources, index)
        self.nb.cells[index] = cell  # the graded cell keeps the grader's outputs, not the kernel's run of it
        kernel_passed = self.dead_at is None and not _errors(in_kernel.outputs)
        code, mark = answers.export_code(answers.names_in(role.source))
        given = answers.read(self._in_kernel_aside(code, index), mark) or "{}"
        self.flags += [Flag(problem, grade_id) for problem in answers.problems(answers.decode(given))]
        outputs = self.grader.run("__import__('labkit.course.scoring').course.scoring.grade("
                                  f"{role.source!r}, {role.points!r}, {grade_id!r}, {given!r}, globals())")  # fmt: skip
        cell.outputs = outputs
        cell.execution_count = in_kernel.get("execution_count")
        score = next((o["data"][scoring.MIME] for o in outputs if o.get("output_type") == "execute_result"
                      and scoring.MIME in o.get("data", {})), None)  # fmt: skip
        if score is None:
            self.flags.append(Flag(f"the grader could not run {grade_id}: {_text(outputs)[-300:]}", grade_id))
            return
        self.scores[grade_id] = score
        if kernel_passed and score["score"] < score["points"]:
            self.flags.append(Flag(f"{grade_id} passed in the notebook's own kernel but not when the grader checked "
                                   f"({score['score']:g} of {score['points']:g}): the notebook may have changed "
                                   "labkit's checks, its client or builtins", grade_id))  # fmt: skip

    # -- the run's namespace and record -----------------------------------------------------------------

    def _source_path(self, info: dict) -> Path:
        from nbgrader.coursedir import CourseDirectory

        coursedir = CourseDirectory(config=self.config)
        folder = Path(coursedir.format_path(coursedir.source_directory, ".", info["assignment"]))
        return folder / f"{info['notebook']}.ipynb"

    def _source_notebook(self, info: dict) -> nbformat.NotebookNode:
        return nbformat.read(self._source_path(info), as_version=4)

    def _write_results(self, runs: dict) -> None:
        """The grader's record beside the graded notebook, in place of any the notebook wrote: the measurements
        the grader made, each task's checks, and the flags."""
        path = self.folder / RESULTS_FILE
        written = read_results(path).get("runs", {}) if path.exists() else {}
        theirs = {(r.get("fault"), r.get("started")) for run in written.values() if isinstance(run, dict)
                  for r in run.get("recoveries", []) if isinstance(r, dict)}  # fmt: skip
        ours = {(r["fault"], r["started"]) for run in runs.values() for r in run["recoveries"]}
        if theirs - ours:
            self.flags.append(Flag(f"the notebook wrote {len(theirs - ours)} measurement(s) of its own to {RESULTS_FILE}; "
                                   "the graded figures are the grader's"))  # fmt: skip
        record = {"runs": runs, "grading": {"tasks": self.scores, "flags": [f.as_dict() for f in self.flags],
                                            "confined": not confine.unavailable()}}  # fmt: skip
        try:
            path.write_text(json.dumps(record, indent=2))
        except OSError as exc:
            self.log.warning("The grader's record could not be written to %s: %s", path, exc)


class FlagCells(NbGraderPreprocessor):
    """After nbgrader saved the grades: a flagged task needs the instructor's look ("needs manual grade")."""

    def preprocess(self, nb: nbformat.NotebookNode, resources: Any) -> tuple:
        flags = resources.get("labkit", {}).get("flags", [])
        if not flags:
            return nb, resources
        from nbgrader.api import Gradebook

        info = resources["nbgrader"]
        graded = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
        marked = {f["grade_id"] for f in flags if f.get("grade_id")} or set(graded[:1])  # a run's flag: its first task
        with Gradebook(info["db_url"]) as book:
            for grade_id in marked & set(graded):
                grade = book.find_grade(grade_id, info["notebook"], info["assignment"], info["student"])
                grade.needs_manual_grade = True
            book.db.commit()
        return nb, resources
