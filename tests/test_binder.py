"""The Binder environment (``binder/``): what repo2docker builds from it, run here as Binder runs it.

repo2docker itself needs Docker, which this machine lacks; so the build step and the session start
are run as they would run in the image: ``postBuild`` from the repository's root with the
environment's Python first on PATH, ``start`` with the command that would open JupyterLab.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import eventually

from labkit.paths import cache_root
from labkit.sandbox import binaries
from labkit.sandbox.controlplane import Sandbox

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_environment_has_the_python_and_go_labkit_needs() -> None:
    environment = yaml.safe_load((BINDER / "environment.yml").read_text())
    assert environment["channels"] == ["conda-forge"]
    wanted = {re.split(r"[=<>]", d)[0]: d for d in environment["dependencies"] if isinstance(d, str)}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    python = _version(wanted["python"].split("=")[1])
    assert python >= _version(pyproject["project"]["requires-python"].lstrip(">=")), wanted["python"]
    go_minimum = tomllib.loads((ROOT / "labkit/sandbox/versions.toml").read_text())["go"]["minimum"]
    assert wanted["go"] == f"go>={'.'.join(go_minimum.split('.')[:2])}", (wanted["go"], go_minimum)
    # apt.txt gives the pod network the tools `make system` installs elsewhere
    makefile = (ROOT / "Makefile").read_text()
    packages = set(re.findall(r"\w+:([\w-]+)", re.search(r"SYSTEM_TOOLS := (.*)", makefile).group(1)))
    assert packages <= set((BINDER / "apt.txt").read_text().split()), packages


def test_post_build_installs_labkit_and_the_pinned_binaries() -> None:
    # The environment's Python first on PATH, as in the image; the binaries are found in (or built into) the
    # cache, which is what `labkit sandbox install` reports at the end.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(BINDER / "postBuild")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    toolset = binaries.toolset()
    for name in ("etcd", "kube-apiserver", "kubectl"):
        assert toolset[name].exists(), name


def test_a_session_start_brings_the_sandbox_up_behind_jupyterlab(tmp_path: Path) -> None:
    # A home of its own (the log goes there), with the binaries postBuild put in the image's cache.
    env = {**os.environ, "HOME": str(tmp_path), "LABKIT_CACHE_DIR": str(cache_root()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    started = time.monotonic()
    done = subprocess.run([str(BINDER / "start"), "echo", "jupyterlab here"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "jupyterlab here", done
    assert time.monotonic() - started < 30, "start waited for the sandbox instead of opening JupyterLab"
    sandbox = Sandbox("default")
    try:
        log = tmp_path / "labkit-sandbox.log"
        eventually(lambda: "Sandbox 'default' is up" in log.read_text(), timeout=180, what="the sandbox binder/start started")
        status = sandbox.status()
        assert status["running"] and status["network"]["mode"] in ("root", "rootless"), status
    finally:
        sandbox.down(purge=True, say=lambda _: None)
