"""Shared fixtures: every test runs against the real pinned binaries.

The whole suite shares one state root (a temporary folder) and the user's binary
cache, so the binaries are provisioned once. A session-scoped sandbox serves the
tests that only need *a* cluster; tests of the lifecycle itself start their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from labkit.sandbox import binaries, procs
from labkit.sandbox.controlplane import Sandbox
from labkit.sandbox.state import all_sandboxes


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="session", autouse=True)
def state_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("state")
    os.environ["LABKIT_STATE_DIR"] = str(root)
    yield root
    for state in all_sandboxes():  # nothing a failed test started outlives the suite
        Sandbox(state.name).down(say=_quiet)


@pytest.fixture(scope="session")
def tools() -> binaries.Toolset:
    return binaries.ensure(say=print)


@pytest.fixture(scope="session")
def sandbox(tools: binaries.Toolset) -> Sandbox:
    sb = Sandbox("shared")
    sb.up(say=_quiet, nodes=0)  # the control plane alone: tests that need nodes start their own
    yield sb
    sb.down(purge=True, say=_quiet)


def run_labkit(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """The `labkit` command as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "labkit", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def kubectl(sb: Sandbox, *args: str, check: bool = True, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    result = subprocess.run(
        [str(binaries.toolset()["kubectl"]), *args],
        capture_output=True, text=True, timeout=120, input=input,
        env={**os.environ, "KUBECONFIG": str(sb.state.kubeconfig), **(env or {})},
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result


def kubectl_json(sb: Sandbox, *args: str) -> dict:
    return json.loads(kubectl(sb, *args, "-o", "json").stdout)


def eventually(predicate: Callable[[], object], timeout: float = 60, what: str = "condition") -> object:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})")


def module_cluster(name: str, nodes: int):  # noqa: ANN201 - a pytest fixture
    """A sandbox with ``nodes`` nodes, started once for a test module (as its ``cluster`` fixture)."""

    @pytest.fixture(scope="module")
    def cluster(tools: binaries.Toolset, request: pytest.FixtureRequest) -> Sandbox:
        failed_before = request.session.testsfailed
        sb = Sandbox(name)
        sb.up(say=_quiet, nodes=nodes)
        yield sb
        # After a failure the state (components' logs, pods' folders) is kept for a look.
        sb.down(purge=request.session.testsfailed == failed_before, say=_quiet)

    return cluster


@pytest.fixture
def ns(cluster: Sandbox, request: pytest.FixtureRequest) -> str:
    """A namespace of the module's ``cluster`` named after the test, with its default ServiceAccount."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:40].strip("-")
    kubectl(cluster, "create", "namespace", name)
    eventually(lambda: kubectl(cluster, "-n", name, "get", "serviceaccount", "default", check=False).returncode == 0,
               what="the default ServiceAccount")  # fmt: skip
    yield name
    kubectl(cluster, "delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(sandbox: Sandbox) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(sandbox, "create", "namespace", name)
    yield name
    kubectl(sandbox, "delete", "namespace", name, "--wait=false", check=False)


def sandbox_processes(sb: Sandbox) -> list[int]:
    """Every live process whose command line points into this sandbox's state folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and procs.mentions(args, sb.state.root):
            found.append(int(entry.name))
    return found
