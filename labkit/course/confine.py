"""The trainee's kernel, confined while it is graded: this machine read-only, the grader's secrets out of sight.

A submission's code runs on the grading machine, as the grading user. Under
bubblewrap (``bwrap``, Debian's ``bubblewrap``) its kernel runs in namespaces of
its own, as a sandbox for untrusted code does:

* the filesystem read-only, but for the submission's own folder and the kernel's
  private folder (its connection file, sockets, home, temporary files: ``$TMPDIR``);
* out of sight (empty): the sandboxes' state (their keys and admin kubeconfigs), the
  course root (the gradebook, the source notebooks with their hidden tests, other
  trainees' submissions), the source notebooks' folder, and Jupyter's runtime folder
  (the other kernels' keys, and the private folders of every kernel of every graded
  run: ``private_folder``);
* a PID namespace of its own, which goes with the kernel: nothing it starts outlives
  it; no capabilities and no new privileges, even as root.

The network stays this machine's: the kernel reaches the cluster, with the
credentials the grader gives it (a trainee's service account, see
``labkit.course.execute``). Where bubblewrap cannot run (not installed; no user
namespaces for an ordinary user), grading says so and runs the kernel as it is.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager


@functools.lru_cache(maxsize=1)
def private_folder(prefix: str) -> Path:
    """A new folder only this user may open, under Jupyter's runtime folder (which a confined kernel does not see):
    for a kernel of a graded run, its connection file, sockets, home and temporary files."""
    from jupyter_core.paths import jupyter_runtime_dir

    parent = Path(jupyter_runtime_dir()) / "labkit"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def unavailable() -> str:
    """Why kernels cannot be confined here ("" when they can): bubblewrap missing, or failing to start."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed: `apt-get install bubblewrap`"
    done = subprocess.run(command(["true"], writable=[], hidden=[]), capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return f"bubblewrap cannot start here: {done.stderr.strip()[-300:]}"
    return ""


def command(argv: list[str], *, writable: list[Path], hidden: list[Path]) -> list[str]:
    """``argv`` under bubblewrap: everything read-only, ``hidden`` folders empty, ``writable`` ones as they are."""
    line = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--unshare-pid", "--unshare-ipc", "--unshare-user", "--uid", str(os.getuid()), "--gid", str(os.getgid()),
            "--cap-drop", "ALL", "--die-with-parent",  # jupyter starts kernels in a session of their own already
            # Inside, the kernel's parent is the namespace's init, pid 1, which ipykernel would read as its parent's
            # death; told its parent is pid 1, it leaves the watch to bubblewrap's --die-with-parent.
            "--setenv", "JPY_PARENT_PID", "1"]  # fmt: skip
    for folder in hidden:
        if folder.is_dir():
            line += ["--tmpfs", str(folder.resolve())]
    for folder in writable:  # after the hidden ones: a submission's folder inside the course root is seen again
        line += ["--bind", str(folder.resolve()), str(folder.resolve())]
    return [*line, "--", *argv]


class ConfinedKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel runs under ``command``: set ``writable`` and ``hidden`` before it starts."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.writable: list[Path] = []
        self.hidden: list[Path] = []

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        return command(super().format_kernel_cmd(extra_arguments), writable=self.writable, hidden=self.hidden)
