"""Mistakes, as a trainee sees them: in a real kernel (nbclient) and on the page, in JupyterLab in Chromium.

Each expected problem (bad YAML, a manifest the API server refuses, a misspelt
object, a wait that times out on an image that cannot be pulled, a request to a
workload with no ready pod, a failed check) must show its message and hint as the
cell's error output, without a traceback; a bug in the trainee's own code keeps its
traceback. The cells after a failed one still run when run one by one.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from conftest import module_cluster
from jupyterlab_page import require_browser, run_notebook_in_browser, write_notebook
from nbclient import NotebookClient

from labkit.sandbox.controlplane import Sandbox

cluster = module_cluster("errors", nodes=1)

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - {{name: web, image: "{image}", ports: [{{containerPort: 8080}}]}}
"""

CELLS = [
    'import labkit\nfrom labkit import checks\nlab = labkit.start_lab("errors")',
    # 1: YAML a trainee mistyped
    'lab.apply("""\nkind: Deployment\nmetadata: {name: web\nspec:\n  replicas: 2\n""")',
    # 2: a manifest the API server refuses
    f"lab.apply('''{DEPLOYMENT.format(name='web', replicas=-1, image='labkit/web:1.0')}''')",
    # 3: a misspelt name, with the real one there
    f"lab.apply('''{DEPLOYMENT.format(name='web', replicas=1, image='labkit/web:1.0')}''')\n"
    'lab.wait_ready("deployment/wbe")',
    # 4: an image that cannot be pulled, and a wait that runs out
    f"lab.apply('''{DEPLOYMENT.format(name='broken', replicas=1, image='labkit/web:9.9')}''')\n"
    'lab.wait_ready("deployment/broken", timeout=12)',
    # 5: a request to a workload with no ready pod
    'lab.http("deployment/broken", "/version")',
    # 6: a failed check
    'checks.deployment(lab, "broken", replicas=1, wait=2)',
    # 7: a bug in the trainee's own code
    'settings = {}\nsettings["replicas"] + 1',
    # 8: a check that passes
    'answer = 42\nchecks.answer("answer", 42)',
    'print("still running")\nlab.close()',
]
GRADED = {6: ("broken-check", 2), 8: ("answer-check", 1)}  # cells that are graded tasks, and their points

# What each cell must show (all of it), and for the expected problems: no traceback.
EXPECTED = {
    1: ["✘", "is not valid YAML", "line"],
    2: ["✘", "The API server refused deployment.apps/web", "spec.replicas", "must be greater than or equal to 0"],
    3: ["✘", "There is no deployment/wbe", "Did you mean deployment/web?"],
    4: ["✘", "deployment/broken was not ready after 12 s", "ImagePull", "labkit/web:9.9"],
    5: ["✘", "deployment/broken has no ready pod to answer"],
    6: ["✘", "Deployment broken is not fully rolled out and ready", "Hint:"],
}
TRACEBACK_SIGNS = ("Traceback", "File \"", "----> ", "site-packages")


def _notebook(folder: Path) -> Path:
    path = write_notebook(folder / "mistakes.ipynb", CELLS)
    notebook = nbformat.read(path, as_version=4)
    for index, (grade_id, points) in GRADED.items():
        notebook.cells[index].metadata["nbgrader"] = {"grade": True, "grade_id": grade_id, "points": points,
                                                      "locked": True, "solution": False, "schema_version": 3}
    nbformat.write(notebook, path)
    return path


def _lab_env(cluster: Sandbox) -> dict[str, str]:
    return {"KUBECONFIG": str(cluster.state.kubeconfig), "LABKIT_CLUSTER": "kubeconfig"}


def _error_text(cell: nbformat.NotebookNode) -> str:
    return "\n".join("\n".join(o.get("traceback", [])) for o in cell.outputs if o.output_type == "error")


def test_a_kernel_shows_each_mistake_as_its_message_and_a_bug_with_its_traceback(cluster: Sandbox, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    for key, value in _lab_env(cluster).items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(_notebook(tmp_path), as_version=4)
    NotebookClient(notebook, timeout=120, allow_errors=True, resources={"metadata": {"path": str(tmp_path)}}).execute()
    cells = notebook.cells
    for index, expected in EXPECTED.items():
        shown = _error_text(cells[index])
        for text in expected:
            assert text in shown, f"cell {index} shows {shown!r}, without {text!r}"
        assert not any(sign in shown for sign in TRACEBACK_SIGNS), f"cell {index} shows a traceback: {shown}"
    bug = _error_text(cells[7])
    assert "KeyError" in bug and "settings[" in bug, f"the bug lost its traceback: {bug}"
    # A failed wait keeps, on its last status line too, the reason the pods gave.
    status = " ".join(o.get("data", {}).get("text/html", "") for o in cells[4].outputs if o.output_type == "display_data")
    assert "✘" in status and "ErrImagePull" in status and "12\u00a0s" in status, status
    assert "still running" in "".join(o.get("text", "") for o in cells[9].outputs)


def test_jupyterlab_shows_each_mistake_on_the_page(cluster: Sandbox, tmp_path: Path) -> None:
    require_browser()
    page = run_notebook_in_browser(_notebook(tmp_path), env={**os.environ, **_lab_env(cluster)},
                                   screenshot=tmp_path / "mistakes.png", cell_timeout=120)  # fmt: skip
    for index, expected in EXPECTED.items():
        cell = page.cell(index)
        assert cell.executed and cell.error, f"cell {index} shows no error on the page: {cell.text!r}"
        for text in expected:
            assert text in cell.text, f"cell {index} shows {cell.text!r} on the page, without {text!r}"
        assert not any(sign in cell.text for sign in TRACEBACK_SIGNS), f"cell {index} shows a traceback: {cell.text}"
    assert "KeyError" in page.cell(7).text and "settings[" in page.cell(7).text
    closing = page.cell(9).text
    assert "still running" in closing
    # Closing the lab tallies the graded tasks as their visible checks went: the failed check, the passed answer.
    assert "Your visible checks: 1 of 3 points" in closing, closing
    assert "broken-check" in closing and "✘ failed" in closing and "answer-check" in closing and "✔ passed" in closing
    assert page.offsite == []
