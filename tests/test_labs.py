"""The labs as a trainee and an instructor meet them: executed end to end, released, and autograded.

The labs' source notebooks (with their solutions) run with papermill against a
three-node sandbox; nbgrader releases them and grades submissions made from
the released version: blank, complete, one task done, and one that raises.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import forgeries
from conftest import eventually, kubectl, kubectl_json, module_cluster

from labkit.course import GRADING_SANDBOX, Course
from labkit.paths import cache_root
from labkit.sandbox.controlplane import Sandbox
from labkit.sandbox.state import all_sandboxes

REPOSITORY = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPOSITORY / "notebooks"
LABS = {"01-deploy-and-scale": ("deploy-and-scale.ipynb", 13), "02-rollouts-and-rollbacks": ("rollouts-and-rollbacks.ipynb", 16),
        "03-failure-and-self-healing": ("failure-and-self-healing.ipynb", 14),
        "04-consensus-and-quorum": ("consensus-and-quorum.ipynb", 14), "05-resilience-patterns": ("resilience-patterns.ipynb", 14)}

cluster = module_cluster("labs", nodes=3)


def lab_env(cluster: Sandbox) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(cluster.state.kubeconfig), "LABKIT_CLUSTER": "kubeconfig"}


def errors(notebook: nbformat.NotebookNode) -> list[str]:
    return [f"{o['ename']}: {o['evalue']}" for c in notebook.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]  # fmt: skip


def lab_namespaces(cluster: Sandbox, lab: str) -> list[str]:
    items = kubectl_json(cluster, "get", "namespaces", "-l", f"labkit.io/lab={lab}")["items"]
    return [ns["metadata"]["name"] for ns in items if not ns["metadata"].get("deletionTimestamp")]


@pytest.mark.parametrize("lab", sorted(LABS))
def test_each_lab_runs_end_to_end_and_cleans_up(cluster: Sandbox, lab: str, tmp_path: Path) -> None:
    notebook, _ = LABS[lab]
    out = tmp_path / notebook
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOKS / lab / notebook), str(out), "--cwd", str(tmp_path),
         "--execution-timeout", "300"],
        capture_output=True, text=True, env=lab_env(cluster), timeout=600,
    )  # fmt: skip
    executed = nbformat.read(out, as_version=4)
    assert done.returncode == 0 and not errors(executed), f"{lab} failed: {errors(executed)}\n{done.stderr[-3000:]}"
    text = "\n".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "✔" in text and "is being deleted" in text
    assert lab_namespaces(cluster, lab) == [], "the lab's namespace outlived the lab"


NOTEBOOK_SERVER = r"""
import os, sys, papermill
os.chdir(sys.argv[1])
papermill.execute_notebook(sys.argv[2], "executed.ipynb", kernel_name="python3", execution_timeout=300)
"""


def test_a_trainee_on_jupyterhub_does_lab_04_in_the_namespace_prepared_for_them(cluster: Sandbox, tmp_path: Path) -> None:
    # The class's cluster prepared as the instructor guide says (`labkit course trainees ... | kubectl apply -f -`);
    # the trainee's JupyterLab pod runs as their ServiceAccount, in their namespace, with the labs' Role and no more.
    prepared = subprocess.run([sys.executable, "-m", "labkit", "course", "trainees", "ana"], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    kubectl(cluster, "apply", "-f", "-", input=prepared.stdout)
    lab, (notebook, _) = "04-consensus-and-quorum", LABS["04-consensus-and-quorum"]
    try:
        # Their home (a volume, as KubeSpawner gives one) holds the lab's notebook, fetched from the exchange.
        shutil.copy(NOTEBOOKS / lab / notebook, tmp_path / notebook)
        kubectl(cluster, "apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jupyter-ana", "namespace": "lab-ana"},
             "spec": {"serviceAccountName": "trainee", "restartPolicy": "Never",
                      "volumes": [{"name": "home", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
                      "containers": [{"name": "notebook", "image": "python:3.12",
                                      "command": ["python3", "-c", NOTEBOOK_SERVER, "/home/jovyan", notebook],
                                      "volumeMounts": [{"name": "home", "mountPath": "/home/jovyan"}],
                                      "env": [{"name": "LABKIT_CACHE_DIR", "value": str(cache_root())}]}]}}))  # fmt: skip

        def finished() -> str | None:
            phase = kubectl_json(cluster, "-n", "lab-ana", "get", "pod", "jupyter-ana")["status"].get("phase")
            return phase if phase in ("Succeeded", "Failed") else None

        phase = eventually(finished, timeout=400, what="the trainee's run of the lab")
        logs = kubectl(cluster, "-n", "lab-ana", "logs", "jupyter-ana", check=False).stdout
        assert (tmp_path / "executed.ipynb").exists(), logs[-3000:]
        executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
        assert phase == "Succeeded" and not errors(executed), f"{errors(executed)}\n{logs[-3000:]}"
        text = "\n".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "this Kubernetes cluster (service account in namespace lab-ana)" in text, text[:2000]
        assert "✔" in text and "what it made is being deleted" in text

        def may(*args: str) -> str:
            return kubectl(cluster, "auth", "can-i", *args, "--as=system:serviceaccount:lab-ana:trainee", check=False).stdout.strip()

        # ... and it could not have done anything outside: no namespaces of its own, nothing in another one.
        assert may("create", "networkchaos.chaos-mesh.org", "-n", "lab-ana") == "yes"
        assert may("create", "namespaces") == may("create", "pods", "-n", "default") == may("delete", "nodes") == "no"
    finally:
        kubectl(cluster, "delete", "-f", "-", "--wait=false", "--ignore-not-found", input=prepared.stdout, check=False)


# -- the instructor's side ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Course:
    root = tmp_path_factory.mktemp("course")
    shutil.copy(REPOSITORY / "graders" / "nbgrader_config.py", root)
    return Course(root, NOTEBOOKS)


def _cells(path: Path) -> list[nbformat.NotebookNode]:
    return nbformat.read(path, as_version=4).cells


def test_the_released_lab_has_no_solutions_and_no_hidden_tests(course: Course) -> None:
    for lab, (notebook, _) in LABS.items():
        source = _cells(NOTEBOOKS / lab / notebook)
        released = _cells(course.release(lab, say=lambda _: None) / notebook)
        assert len(released) == len(source)
        text = "\n".join(c.source for c in released)
        assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
        for before, after in zip(source, released):
            meta = before.metadata.get("nbgrader", {})
            if meta.get("solution"):
                solution = before.source.split("### BEGIN SOLUTION")[1].split("### END SOLUTION")[0]
                assert solution.strip() not in after.source and "raise NotImplementedError()" in after.source
            if meta.get("grade") and "BEGIN HIDDEN TESTS" in before.source:
                hidden = before.source.split("### BEGIN HIDDEN TESTS")[1].split("### END HIDDEN TESTS")[0]
                assert hidden.strip() not in after.source
                assert after.source.strip(), "a check cell must keep its visible part"


def _submission(course: Course, folder: Path, lab: str, student: str, answers: dict[str, str]) -> Path:
    """The released notebook with the given answer cells (by grade_id) filled in, as a trainee's folder."""
    notebook, _ = LABS[lab]
    nb = nbformat.read(course.root / "release" / lab / notebook, as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            cell.source = answers[grade_id]
    target = folder / student
    target.mkdir(parents=True)
    nbformat.write(nb, target / notebook)
    return target


def _solutions(lab: str) -> dict[str, str]:
    """The source notebook's answer cells, by grade_id."""
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in _cells(NOTEBOOKS / lab / LABS[lab][0])
            if c.metadata.get("nbgrader", {}).get("solution")}  # fmt: skip


def _blank_and_complete(course: Course, folder: Path, lab: str) -> list[Path]:
    """``lab`` released, and two trainees' folders: one left blank, one with the solutions."""
    course.release(lab, say=lambda _: None)
    return [_submission(course, folder, lab, "blank", {}), _submission(course, folder, lab, "complete", _solutions(lab))]


PARTIAL_TASK2 = """
lab.apply('''
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: web, image: labkit/web:1.0, ports: [{containerPort: 8080}]}
''')
lab.wait_ready("deployment/web")
"""


def test_autograding_scores_only_what_each_submission_did(course: Course, tmp_path: Path) -> None:
    lab = "01-deploy-and-scale"
    notebook, full = LABS[lab]
    course.release(lab, say=lambda _: None)
    solutions = _solutions(lab)
    task1 = solutions["task1-answer"]
    honest = {
        "blank": {}, "complete": solutions, "first-task": {"task1-answer": task1},
        # Task 1 done, then a cell that raises: the rest of the notebook is still run and graded.
        "raises": {"task1-answer": task1, "task2-answer": "lab.apply('kind: [not, a, manifest')"},
        # Task 2 half done: the Deployment, without its probe, configuration or requests.
        "partial": {"task1-answer": task1, "task2-answer": PARTIAL_TASK2},
    }  # fmt: skip
    escapes = {"escapes": {"task1-answer": forgeries.ESCAPES}}
    # Every task but one done: that task earns nothing from what the others did.
    but_one = {f"without-{task}": {k: v for k, v in solutions.items() if k != f"{task}-answer"}
               for task in ("task1", "task2", "task3", "task4", "task5")}  # fmt: skip
    submissions = [_submission(course, tmp_path, lab, student, answers)
                   for student, answers in {**honest, **forgeries.LAB01, **escapes, **but_one}.items()]  # fmt: skip
    log: list[str] = []
    results = {r.student: r for r in course.autograde(lab, submissions, parallel=2, say=log.append)}
    scores = {s: r.score for s, r in results.items()}
    assert {s: scores[s] for s in honest} == {"blank": 0, "complete": full, "first-task": 3, "raises": 3,
                                             "partial": 3 + 0.8}, "\n".join(log)  # fmt: skip
    # A forgery earns nothing, and the instructor hears of it (except a silenced error, which fails the check
    # in the trainee's kernel too, and so tells nothing).
    assert {s: scores[s] for s in forgeries.LAB01} == dict.fromkeys(forgeries.LAB01, 0), "\n".join(log)
    flagged = {s for s, r in results.items() if r.flags}
    assert flagged == set(forgeries.LAB01) - {"silenced-errors"}, {s: r.flags for s, r in results.items()}
    assert any("passed in the notebook's own kernel but not when the grader checked" in f
               for f in results["replaced-checks"].flags)  # fmt: skip
    assert any("kernel exited during task1-answer" in f for f in results["exits-kernel"].flags)
    assert any("wrote 1 measurement(s) of its own" in f for f in results["fake-results"].flags)
    assert results["raises"].failed == ["task2-check", "task3-check", "task4-check", "task5-check"]
    assert "grading 17 submissions of 01-deploy-and-scale, 2 at a time..." in log
    assert sorted(line.split("]")[0] for line in log if line.startswith("[")) == sorted(f"[{n}/17" for n in range(1, 18))
    for student in but_one:
        task = student.removeprefix("without-") + "-check"
        assert {t.name: t.score for t in results[student].tasks}[task] == 0, (student, results[student].tasks)
    # The trainee's kernel ran as the trainee's account, confined: no answer key, no admin credentials, nothing
    # written outside its folder, no other namespace, and nothing it started outlived it.
    assert scores["escapes"] == 0
    escaped = nbformat.read(course.root / "autograded" / "escapes" / lab / notebook, as_version=4)
    report = next(json.loads(line.split(" ", 1)[1]) for c in escaped.cells for o in c.get("outputs", [])
                  for line in o.get("text", "").splitlines() if line.startswith("ESCAPES "))  # fmt: skip
    assert all(report[key].startswith("blocked") for key in ("read the hidden tests", "read an admin kubeconfig",
                                                             "write into this Python", "list another namespace")), report
    assert not (course.root / "forged.txt").exists(), "the kernel wrote into the course root"
    late = course.root / "autograded" / "escapes" / lab / "late.txt"
    assert late.exists(), "its process never ran, so this proves nothing"
    last = late.read_text()
    time.sleep(2)
    assert late.read_text() == last, "a process the trainee's kernel started outlived it"
    assert any(line.startswith("[") and "replaced-checks: 0/13" in line and "FLAGGED" in line for line in log)
    # The run's own grading sandbox is gone with it.
    assert not [s.name for s in all_sandboxes() if s.name.startswith(GRADING_SANDBOX)]
    # The graded copy says what failed, in words a trainee can act on: the bad YAML; every missed check of task 2,
    # each with its hint, and the points it earned.
    graded = nbformat.read(course.root / "autograded" / "raises" / lab / notebook, as_version=4)
    assert "is not valid YAML" in json.dumps([c.get("outputs", []) for c in graded.cells])
    partial = nbformat.read(course.root / "autograded" / "partial" / lab / notebook, as_version=4)
    check = next(c for c in partial.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "task2-check")
    shown = "".join(o.get("text", "") for o in check.outputs if o.output_type == "stream")
    assert shown.count("✘") == 4 and shown.count("Hint:") >= 3 and "has no readiness probe" in shown, shown
    assert "0.8 of 4 points: 1 of 5 checks passed" in shown
    # In the gradebook, a forged submission's flagged task waits for the instructor's look.
    from nbgrader.api import Gradebook

    with Gradebook(course.api.coursedir.db_url) as book:
        grade = book.find_grade("task1-check", "deploy-and-scale", lab, "replaced-checks")
        assert grade.needs_manual_grade and grade.auto_score == 0
        assert not book.find_grade("task1-check", "deploy-and-scale", lab, "complete").needs_manual_grade


def test_two_grading_runs_at_once_keep_to_their_own_sandboxes(tmp_path: Path) -> None:
    # Two instructors (two course roots) grade at the same moment on one machine, each on a fresh sandbox.
    runs = []
    for instructor in ("ines", "omar"):
        root = tmp_path / instructor
        root.mkdir()
        shutil.copy(REPOSITORY / "graders" / "nbgrader_config.py", root)
        complete = root / "complete"
        complete.mkdir()
        shutil.copy(NOTEBOOKS / "01-deploy-and-scale" / LABS["01-deploy-and-scale"][0], complete)
        env = {**os.environ, "LABKIT_COURSE_ROOT": str(root)}
        runs.append(subprocess.Popen([sys.executable, "-m", "labkit", "course", "autograde", "01", str(complete)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))  # fmt: skip
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        assert "complete: 13/13" in err and "complete      13/13" in out, out + err  # its progress, its table
    names = [line.split("(")[1].split(")")[0] for _, err in outputs for line in err.splitlines()
             if line.startswith("starting a fresh grading sandbox")]  # fmt: skip
    assert len(set(names)) == 2, names
    assert not [s.name for s in all_sandboxes() if s.name.startswith(GRADING_SANDBOX)]


@pytest.mark.slow
def test_the_failure_lab_grades_one_at_a_time_full_marks_and_zero(course: Course, cluster: Sandbox, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(cluster.state.kubeconfig))  # graded on the module's sandbox
    lab = "03-failure-and-self-healing"
    _, full = LABS[lab]
    submissions = _blank_and_complete(course, tmp_path, lab)
    log: list[str] = []
    results = {r.student: r for r in course.autograde(lab, submissions, cluster="kubeconfig", parallel=2,
                                                      say=log.append)}  # fmt: skip
    assert {s: (r.score, r.max_score) for s, r in results.items()} == {"blank": (0, full), "complete": (full, full)}, \
        "\n".join(log)
    assert f"{lab} takes whole nodes away from its cluster: its submissions are graded one at a time." in log
    graded = course.root / "autograded" / "complete" / lab / "labkit-results.json"
    runs = json.loads(graded.read_text())["runs"].values()
    assert [r["fault"] for run in runs for r in run["recoveries"]] == ["a worker pod is killed", "a node is lost"]
    # The instructor's view of the cohort: the complete run recovered from both; the blank one never from the node.
    measured = {(r["student"], r["fault"]): r for r in course.recoveries(lab, graded=True)}
    assert measured[("complete", "a node is lost")]["ttr"] is not None
    assert measured[("blank", "a node is lost")]["ttr"] is None
    table = subprocess.run([sys.executable, "-m", "labkit", "course", "recoveries", "03", "--graded"], capture_output=True,
                           text=True, env={**lab_env(cluster), "LABKIT_COURSE_ROOT": str(course.root)}, timeout=60)  # fmt: skip
    assert "a node is lost" in table.stdout and "blank" in table.stdout, table.stdout + table.stderr


def test_the_cohorts_recoveries_lab_after_lab(tmp_path: Path) -> None:
    # What trainees' runs saved (labkit.recovery's own records), as collected into a course root.
    from labkit.lab.recovery import RESULTS_FILE, Recovery

    root = tmp_path / "course"
    shutil.copy(REPOSITORY / "graders" / "nbgrader_config.py", root.mkdir() or root)
    runs = {("ana", "03-failure-and-self-healing"): [("a node is lost", 50, 70)],
            ("ana", "05-resilience-patterns"): [("latency", 4, 9), ("partition", 2, 5)],
            ("bo", "03-failure-and-self-healing"): [("a node is lost", 52, None)],
            ("bo", "05-resilience-patterns"): [("latency", 6, 15)]}  # fmt: skip
    for (student, lab), faults in runs.items():
        folder = root / "submitted" / student / lab
        folder.mkdir(parents=True)
        records = [Recovery(fault, "deployment/api", 1000.0, 1000.0 + ttd, None, 1000.0 + ttr if ttr else None).as_dict()
                   for fault, ttd, ttr in faults]  # fmt: skip
        (folder / RESULTS_FILE).write_text(json.dumps({"runs": {"r1": {"lab": lab, "recoveries": records}}}))
    course = Course(root, NOTEBOOKS)
    assert [r["lab"] for r in course.recoveries()] == ["03-failure-and-self-healing"] * 2 + ["05-resilience-patterns"] * 3
    table = subprocess.run([sys.executable, "-m", "labkit", "course", "recoveries", "--root", str(root)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = table.stdout.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line.split()}
    assert row["03-failure-and-self-healing"][1:4] == ["2", "51.0", "s"] and row["03-failure-and-self-healing"][-1] == "bo"
    assert row["05-resilience-patterns"][1] == "3" and "9.0 s" in lines[2], table.stdout  # median of 9, 5, 15
    assert row["ana"][1:] == ["70.0", "s", "7.0", "s"] and row["bo"][1:] == ["never", "15.0", "s"], table.stdout


@pytest.mark.slow
@pytest.mark.parametrize("lab", ["04-consensus-and-quorum", "05-resilience-patterns"])
def test_the_later_labs_grade_full_marks_and_zero(course: Course, cluster: Sandbox, tmp_path: Path, lab: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(cluster.state.kubeconfig))  # graded on the module's sandbox
    _, full = LABS[lab]
    submissions = _blank_and_complete(course, tmp_path, lab)
    log: list[str] = []
    # One at a time: each measures the cluster (elections, tail latencies) and would disturb the other's figures.
    results = {r.student: r for r in course.autograde(lab, submissions, cluster="kubeconfig", parallel=1, say=log.append)}
    assert {s: (r.score, r.max_score) for s, r in results.items()} == {"blank": (0, full), "complete": (full, full)}, \
        "\n".join(log) + "\n" + "\n".join(f"{s}: {r.failed}" for s, r in results.items())


def test_the_command_line_grades_and_reports(course: Course, cluster: Sandbox, tmp_path: Path) -> None:
    lab = "01-deploy-and-scale"
    course.release(lab, say=lambda _: None)
    blank = _submission(course, tmp_path, lab, "dana", {})
    env = {**lab_env(cluster), "LABKIT_COURSE_ROOT": str(course.root)}
    done = subprocess.run([sys.executable, "-m", "labkit", "course", "autograde", "01", str(blank), "--cluster",
                           "kubeconfig"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "dana" in done.stdout and "0/13" in done.stdout, done.stdout
    scores = subprocess.run([sys.executable, "-m", "labkit", "course", "scores", lab], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert "dana" in scores.stdout and "task1-check" in scores.stdout
    feedback = subprocess.run([sys.executable, "-m", "labkit", "course", "feedback", lab], capture_output=True,
                              text=True, env=env, timeout=300)  # fmt: skip
    assert feedback.returncode == 0, feedback.stderr
    page = (course.root / "feedback" / "dana" / lab / "deploy-and-scale.html").read_text()
    # The feedback page shows each task's points and every check it missed, with its hint.
    assert "0 of 3 points" in page and "✘" in page and "has no answer yet" in page
    unknown = subprocess.run([sys.executable, "-m", "labkit", "course", "release", "99"], capture_output=True, text=True,
                             env=env, timeout=120)  # fmt: skip
    assert unknown.returncode == 1 and "There is no lab '99'" in unknown.stderr and "Traceback" not in unknown.stderr
