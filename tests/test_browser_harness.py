"""The browser harness itself: JupyterLab in headless Chromium shows what the cells did."""

from __future__ import annotations

import sys

import pytest

from jupyterlab_page import BrowserHarnessError, jupyterlab_server, run_notebook_in_browser, write_notebook


def test_page_shows_output_error_and_the_cells_after_it(tmp_path):
    nb = write_notebook(tmp_path / "smoke.ipynb", [
        'print("hello")',
        'raise ValueError("boom")',
        'from IPython.display import HTML, display\ndisplay(HTML("<b>after</b>"))',
    ])  # fmt: skip
    page = run_notebook_in_browser(nb, screenshot=tmp_path / "smoke.png")

    hello, boom, after = page.cells
    assert [c.index for c in page.cells] == [0, 1, 2]
    assert hello.executed and hello.execution_count == 1
    assert hello.text.strip() == "hello" and not hello.error

    assert boom.error, boom.html
    assert "ValueError" in boom.error_text and "boom" in boom.error_text
    assert "boom" in boom.text  # the traceback is on the page, not only in the DOM
    assert any(o.error and o.mime_type == "application/vnd.jupyter.stderr" for o in boom.outputs)

    assert after.execution_count == 3, "the cell after the error was not run"
    assert after.text.strip() == "after" and not after.error
    assert "<b>after</b>" in after.html

    assert page.kernel == "python3"
    assert page.offsite == [], f"the page reached beyond the server: {page.offsite}"
    assert page.screenshot and page.screenshot.stat().st_size > 10_000


def test_server_passes_its_environment_to_kernels_and_reports_a_stuck_cell(tmp_path):
    source = ['import os, sys\nprint(os.environ["LABKIT_HARNESS_PROBE"], sys.executable)']
    write_notebook(tmp_path / "env.ipynb", source)
    before = (tmp_path / "env.ipynb").read_bytes()
    write_notebook(tmp_path / "stuck.ipynb", ["import time\ntime.sleep(600)"])
    with jupyterlab_server(tmp_path, env={"LABKIT_HARNESS_PROBE": "probe-42"}) as lab:
        (cell,) = lab.run_notebook("env.ipynb").cells
        assert cell.text.split() == ["probe-42", sys.executable]
        with pytest.raises(BrowserHarnessError, match=r"cell 0 did not finish within 3s"):
            lab.run_notebook("stuck.ipynb", cell_timeout=3)
        assert lab.api("api/kernels") == [], "the runs left kernels behind"
        process = lab.process
    assert process.poll() is not None, "the server outlived its block"
    assert (tmp_path / "env.ipynb").read_bytes() == before, "the page saved the notebook"
