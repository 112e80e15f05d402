"""What a trainee sees in JupyterLab: a real server, a real notebook, headless Chromium.

A test writes (or picks) a notebook, and this module starts ``jupyter lab`` from the
running Python's environment on a free port with a random token, in a folder of the
test's choosing, with the environment variables the test gives it (they reach the
kernels, which inherit the server's environment). ``tests/browser/jupyterlab.mjs``
then opens the notebook in Chromium (Playwright), runs its code cells one at a time
as a user would, and reports for each what the page shows: the text of its output
area, whether an error output is shown, and the output area's HTML. The server and
its kernels are stopped afterwards, whatever happened.

    from jupyterlab_page import run_notebook_in_browser, write_notebook  # tests/ is on sys.path under pytest

    nb = write_notebook(tmp_path / "t.ipynb", ["print('hello')", "1/0"])
    page = run_notebook_in_browser(nb, env={"LABKIT_STATE_DIR": "..."})
    assert page.cells[1].error and "ZeroDivisionError" in page.cells[1].text

Several notebooks against one server:

    with jupyterlab_server(tmp_path) as lab:
        first = lab.run_notebook("a.ipynb")
        second = lab.run_notebook("b.ipynb", screenshot=tmp_path / "b.png")

The server is isolated from the user's Jupyter set-up: its config, data, runtime,
settings and workspace folders and IPYTHONDIR are fresh temporary folders; its one
kernel, ``python3``, is this Python (``sys.executable``); news, update checks and the
extension manager's index are off, autosave is off (a course notebook opened here is
not rewritten), and the preferred kernel starts without a "Select Kernel" dialog.

Needs ``/usr/bin/chromium`` (Debian package ``chromium``) and ``tests/browser/node_modules``
(``npm ci`` there); ``make setup`` installs both, and a test fails, saying so, without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

HERE = Path(__file__).resolve().parent
BROWSER_DIR = HERE / "browser"
SCRIPT = BROWSER_DIR / "jupyterlab.mjs"
CHROMIUM = Path(os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium"))

#: How long the page may take to load and start its kernel, and one cell to finish (seconds).
LOAD_TIMEOUT = 90.0
CELL_TIMEOUT = 60.0

# JupyterLab's user settings for the test server: nothing reaches for the internet, nothing
# asks the (absent) user a question, all cells are attached to the page, nothing is saved.
LAB_SETTINGS: dict[str, dict] = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "autoStartDefaultKernel": True,
        "windowingMode": "none",
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {
        "autosave": False,
        "confirmClosingDocument": False,
    },
    "@jupyterlab/extensionmanager-extension/plugin.jupyterlab-settings": {"enabled": False},
    "@jupyterlab/apputils-extension/sessionDialogs.jupyterlab-settings": {"skipKernelRestartDialog": True},
}

SERVER_CONFIG = {
    "LabApp": {
        "news_url": None,
        "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
        "extension_manager": "readonly",
    },
    "ServerApp": {"open_browser": False},
    "MappingKernelManager": {"default_kernel_name": "python3"},
}


@dataclass(frozen=True)
class CellOutput:
    """One output of a cell as rendered: its MIME type (``data-mime-type``) and visible text."""

    mime_type: str
    text: str
    error: bool  # rendered as stderr/error (JupyterLab shows tracebacks as application/vnd.jupyter.stderr)


@dataclass(frozen=True)
class CellResult:
    """A code cell after the page ran it."""

    index: int  # position among all the notebook's cells (markdown ones too), from 0
    source: str
    executed: bool  # False for an empty cell, which JupyterLab does not run
    execution_count: int | None  # the number in the cell's prompt, [n]
    text: str  # innerText of the cell's output area, as the page renders it
    error: bool  # the page shows an error (stderr/traceback) output for this cell
    error_text: str  # innerText of those error outputs, joined
    html: str  # innerHTML of the output area
    outputs: tuple[CellOutput, ...]
    seconds: float  # from the keypress to the cell's end

    @classmethod
    def from_json(cls, data: Mapping) -> CellResult:
        outputs = tuple(CellOutput(o["mimeType"], o["text"], o["error"]) for o in data["outputs"])
        return cls(
            index=data["index"], source=data["source"], executed=data["executed"],
            execution_count=data["executionCount"], text=data["text"], error=data["error"],
            error_text=data["errorText"], html=data["html"], outputs=outputs, seconds=data["seconds"],
        )  # fmt: skip


@dataclass(frozen=True)
class PageResult:
    """Every code cell of one notebook as the page showed it, in order."""

    notebook: str  # its path under the server's root
    cells: list[CellResult]  # the code cells only
    screenshot: Path | None
    kernel: str | None = None  # the kernel's name, as the server reports it (python3)
    console: list[str] = field(default_factory=list)  # the page's console errors and uncaught exceptions
    offsite: list[str] = field(default_factory=list)  # requests the page tried beyond the server (none resolve)
    seconds: float = 0.0

    def cell(self, index: int) -> CellResult:
        """The code cell at ``index`` among *all* the notebook's cells."""
        for cell in self.cells:
            if cell.index == index:
                return cell
        raise KeyError(f"no code cell at index {index} in {self.notebook} (code cells: {[c.index for c in self.cells]})")


class BrowserHarnessError(AssertionError):
    """The page could not be driven: JupyterLab did not load, no kernel, a cell never finished."""


def write_notebook(path: Path | str, sources: Sequence[str], *, kernel: str = "python3",
                   markdown: Mapping[int, str] | None = None) -> Path:  # fmt: skip
    """A notebook at ``path`` of one code cell per source, for kernel ``kernel``.

    ``markdown`` maps positions to markdown cells inserted there (``{0: "# Title"}``).
    """
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cells = [nbformat.v4.new_code_cell(src) for src in sources]
    for pos, text in sorted((markdown or {}).items()):
        cells.insert(pos, nbformat.v4.new_markdown_cell(text))
    nb.cells = cells
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, with what to do; None when they can."""
    problems = []
    if not CHROMIUM.exists():
        problems.append(f"{CHROMIUM} is missing (as root: apt-get install -y chromium, or `make system`)")
    node = shutil.which("node")
    if node is None:
        problems.append("node is missing (Node.js 20 or newer: as root, `make system`)")
    else:
        version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        try:
            major = int(version.lstrip("v").split(".")[0])
        except ValueError:
            major = 0
        if major < 20:
            problems.append(f"node is {version or 'unusable'}: Playwright needs Node.js 20 or newer")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        problems.append(f"{BROWSER_DIR}/node_modules is missing (cd {BROWSER_DIR} && npm ci, or `make setup`)")
    if not problems:
        return None
    return "the browser tests need headless Chromium and Playwright: " + "; ".join(problems)


def require_browser() -> None:
    """Fail the calling test, with instructions, where the browser or Playwright is missing."""
    why = browser_missing()
    if why:
        pytest.fail(why, pytrace=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, token: str, method: str = "GET", timeout: float = 5) -> tuple[int, bytes]:
    """HTTP to the server, straight (it is on loopback: no proxy), authenticated by its token."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method,
                                 headers={"Authorization": f"token {token}"})  # fmt: skip
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class JupyterLabServer:
    """A running ``jupyter lab``; ``run_notebook`` drives a notebook under ``root`` in Chromium."""

    root: Path
    url: str  # base URL, ending in /
    token: str
    process: subprocess.Popen
    home: Path  # the server's private Jupyter folders and its log
    log_path: Path

    def log(self, tail: int = 60) -> str:
        """The last ``tail`` lines of the server's log (stdout and stderr)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    def api(self, path: str) -> object:
        """GET one of the server's REST resources (``api/kernels``, ``api/sessions``...), as JSON."""
        status, body = _request(f"{self.url}{path.lstrip('/')}", self.token)
        if status != 200:
            raise BrowserHarnessError(f"GET {path}: HTTP {status}")
        return json.loads(body)

    def run_notebook(self, notebook: Path | str, *, screenshot: Path | str | None = None,
                     cell_timeout: float = CELL_TIMEOUT, load_timeout: float = LOAD_TIMEOUT,
                     keep_kernel: bool = False) -> PageResult:  # fmt: skip
        """Open ``notebook`` (a path under ``root``, or relative to it) and run its code cells in the page.

        The notebook gets a fresh kernel, shut down afterwards; with ``keep_kernel`` one it already has
        is used, and is left running (for a later run of the same notebook to go on with).
        Raises ``BrowserHarnessError`` when the page cannot be driven (see the message and server log).
        """
        require_browser()
        nb_path = Path(notebook)
        if not nb_path.is_absolute():
            nb_path = self.root / nb_path
        try:
            rel = nb_path.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise BrowserHarnessError(f"{nb_path} is not under the server's root {self.root}") from None
        import nbformat

        n_cells = len(nbformat.read(nb_path, as_version=4).cells)
        out = Path(tempfile.mkstemp(prefix="page-", suffix=".json", dir=self.home)[1])
        cmd = [
            shutil.which("node") or "node", str(SCRIPT), "--url", self.url, "--token", self.token, "--notebook", rel.as_posix(),
            "--out", str(out), "--cell-timeout", str(cell_timeout), "--load-timeout", str(load_timeout),
            "--chromium", str(CHROMIUM),
        ]  # fmt: skip
        if keep_kernel:
            cmd.append("--keep-kernel")
        if screenshot is not None:
            screenshot = Path(screenshot).resolve()
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--screenshot", str(screenshot)]
        budget = load_timeout + (n_cells + 1) * cell_timeout + 60
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=budget)
        except subprocess.TimeoutExpired as e:
            raise BrowserHarnessError(
                f"the browser did not finish {rel} within {budget:.0f}s\n"
                f"--- browser ---\n{e.stderr or ''}\n--- server log ---\n{self.log()}"
            ) from None
        if proc.returncode != 0:
            raise BrowserHarnessError(
                f"the browser could not run {rel} (exit {proc.returncode}):\n{proc.stderr.strip()}\n"
                f"--- server log ---\n{self.log()}"
            )
        data = json.loads(out.read_text())
        out.unlink(missing_ok=True)
        return PageResult(
            notebook=rel.as_posix(),
            cells=[CellResult.from_json(c) for c in data["cells"]],
            screenshot=Path(data["screenshot"]) if data.get("screenshot") else None,
            kernel=(data.get("kernel") or {}).get("name"),
            console=list(data.get("console", [])),
            offsite=list(data.get("offsite", [])),
            seconds=time.monotonic() - started,
        )


def _write_private_jupyter(home: Path) -> dict[str, str]:
    """The server's own Jupyter folders under ``home``; returns the environment that points at them."""
    dirs = {name: home / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython", "path")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    (dirs["config"] / "jupyter_server_config.json").write_text(json.dumps(SERVER_CONFIG, indent=1))
    for name, settings in LAB_SETTINGS.items():
        target = dirs["settings"] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(settings, indent=1))
    kernel = dirs["path"] / "kernels" / "python3"
    kernel.mkdir(parents=True, exist_ok=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "metadata": {"debugger": True},
    }, indent=1))  # fmt: skip
    return {
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "JUPYTER_PATH": str(dirs["path"]),  # searched first: its python3 kernel wins
        "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
        "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
        "IPYTHONDIR": str(dirs["ipython"]),
    }


def _die_with_parent() -> None:
    """In the server's process, before exec: a SIGTERM when the test process dies, however it dies.

    (The server stops its kernels on SIGTERM.)"""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(process: subprocess.Popen, url: str, token: str) -> None:
    """Shut the server down through its API (it stops its kernels), then make sure of it."""
    import psutil

    try:
        children = psutil.Process(process.pid).children()  # kernels and terminals, each in its own session
    except psutil.Error:
        children = []
    if process.poll() is None:
        if url:
            with contextlib.suppress(OSError):
                _request(f"{url}api/shutdown", token, "POST")
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def jupyterlab_server(root: Path | str, env: Mapping[str, str] | None = None, *,
                      start_timeout: float = 60, extra_args: Sequence[str] = ()) -> Iterator[JupyterLabServer]:  # fmt: skip
    """``jupyter lab`` serving ``root``, with ``env`` added to its (and so its kernels') environment.

    Stopped on leaving the block, kernels included, even when the block fails.
    """
    require_browser()
    root = Path(root).resolve()
    home = Path(tempfile.mkdtemp(prefix="labkit-jupyterlab-"))
    server_env = {k: v for k, v in os.environ.items() if k not in ("JUPYTER_TOKEN", "JPY_API_TOKEN")}
    server_env.update(_write_private_jupyter(home))
    # The kernels find this environment's tools (labkit, jupyter, ...) first, as under `make lab`.
    server_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), server_env.get("PATH", "")])
    server_env.update(env or {})
    token = secrets.token_hex(24)
    log_path = home / "server.log"
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={_free_port()}",
        f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
        *(["--allow-root"] if os.geteuid() == 0 else []), *extra_args,
    ]  # fmt: skip
    process = None
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, cwd=root, env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
        server = JupyterLabServer(root=root, url="", token=token, process=process, home=home, log_path=log_path)
        # The port it really has (should another process have taken that one, it moves on to the next)
        # is in the file it writes once it listens.
        info = Path(server_env["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{process.pid}.json"
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise BrowserHarnessError(f"jupyter lab exited ({process.returncode}) before answering:\n{server.log()}")
            if not server.url and info.exists():
                with contextlib.suppress(ValueError, KeyError):
                    server.url = f"http://127.0.0.1:{json.loads(info.read_text())['port']}/"
            if server.url:
                with contextlib.suppress(OSError):
                    status, _ = _request(f"{server.url}api/status", token, timeout=2)
                    if status == 200 and _request(f"{server.url}lab", token, timeout=10)[0] == 200:
                        break
            if time.monotonic() > deadline:
                raise BrowserHarnessError(f"jupyter lab did not answer within {start_timeout:.0f}s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if process is not None:
            _stop(process, server.url, token)
        shutil.rmtree(home, ignore_errors=True)


def run_notebook_in_browser(notebook: Path | str, *, root: Path | str | None = None,
                            env: Mapping[str, str] | None = None, screenshot: Path | str | None = None,
                            cell_timeout: float = CELL_TIMEOUT, load_timeout: float = LOAD_TIMEOUT,
                            extra_args: Sequence[str] = (), start_timeout: float = 60) -> PageResult:  # fmt: skip
    """Start a server in ``root`` (default: the notebook's folder), run ``notebook`` in the page, stop it."""
    notebook = Path(notebook).resolve()
    with jupyterlab_server(root or notebook.parent, env, extra_args=extra_args, start_timeout=start_timeout) as lab:
        return lab.run_notebook(notebook, screenshot=screenshot, cell_timeout=cell_timeout, load_timeout=load_timeout)
