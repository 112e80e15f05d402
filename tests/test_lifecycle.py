"""Starting, stopping and breaking sandboxes: each test runs its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import eventually, kubectl, run_labkit, sandbox_processes

from labkit.sandbox import procs
from labkit.sandbox.controlplane import Sandbox


def _quiet(_: str) -> None:
    pass


@pytest.fixture
def fresh(tools, request) -> Sandbox:  # noqa: ANN001
    """A sandbox of this test's own, purged afterwards whatever happened."""
    sb = Sandbox(request.node.name.replace("_", "-")[:40].strip("-").lower())
    yield sb
    sb.down(purge=True, say=_quiet)


def _listening(sb: Sandbox, config: dict) -> list[int]:
    return [port for port in config["ports"].values() if procs.listening(port)]


def test_down_leaves_no_process_and_no_port(fresh: Sandbox) -> None:
    up = run_labkit("sandbox", "up", "--name", fresh.name)
    assert up.returncode == 0, up.stderr
    assert "is up" in up.stderr and "eval" in up.stderr  # says how to use it
    config = fresh.state.load()
    assert len(sandbox_processes(fresh)) == 6  # supervisor, four components, the node agent
    assert len(_listening(fresh, config)) == len(config["ports"])

    down = run_labkit("sandbox", "down", "--name", fresh.name)
    assert down.returncode == 0 and "stopped" in down.stderr
    assert sandbox_processes(fresh) == []
    assert _listening(fresh, config) == []

    again = run_labkit("sandbox", "down", "--name", fresh.name)
    assert again.returncode == 0 and "not running" in again.stderr


def test_down_after_a_component_was_killed_by_hand(fresh: Sandbox) -> None:
    config = fresh.up(say=_quiet)
    status = fresh.state.status()
    os.kill(status["components"]["etcd"]["pid"], signal.SIGKILL)
    os.kill(status["components"]["kube-scheduler"]["pid"], signal.SIGKILL)
    fresh.down(say=_quiet)
    assert sandbox_processes(fresh) == []
    assert _listening(fresh, config) == []


def test_killed_supervisor_takes_its_components_with_it(fresh: Sandbox) -> None:
    config = fresh.up(say=_quiet)
    os.kill(fresh.state.supervisor_pid(), signal.SIGKILL)
    eventually(lambda: sandbox_processes(fresh) == [], timeout=20, what="the components to exit")
    assert run_labkit("sandbox", "status", "--name", fresh.name, "--json").returncode == 3  # stopped
    fresh.up(say=_quiet)  # and it comes back with its state
    assert kubectl(fresh, "get", "--raw", "/readyz").stdout.strip() == "ok"
    fresh.down(say=_quiet)
    assert _listening(fresh, config) == []


def test_cluster_state_survives_down_and_up_but_not_purge(fresh: Sandbox) -> None:
    fresh.up(say=_quiet)
    kubectl(fresh, "create", "namespace", "keep-me")
    kubectl(fresh, "-n", "keep-me", "create", "configmap", "notes", "--from-literal=day=1")
    fresh.down(say=_quiet)
    fresh.up(say=_quiet)
    data = json.loads(kubectl(fresh, "-n", "keep-me", "get", "configmap", "notes", "-o", "json").stdout)["data"]
    assert data == {"day": "1"}

    purge = run_labkit("sandbox", "down", "--name", fresh.name, "--purge")
    assert purge.returncode == 0 and "purged" in purge.stderr
    assert not fresh.state.root.exists()
    fresh.up(say=_quiet)
    assert kubectl(fresh, "get", "namespace", "keep-me", check=False).returncode != 0


def test_two_named_sandboxes_run_side_by_side(tools) -> None:  # noqa: ANN001
    one, two = Sandbox("side-one"), Sandbox("side-two")
    try:
        # Started at the same moment, as parallel graders would.
        starting = [subprocess.Popen([sys.executable, "-m", "labkit", "sandbox", "up", "--name", sb.name],
                                     stderr=subprocess.PIPE, text=True) for sb in (one, two)]  # fmt: skip
        for process in starting:
            assert process.wait(timeout=180) == 0, process.stderr.read()
        ports_one = set(one.state.load()["ports"].values())
        ports_two = set(two.state.load()["ports"].values())
        assert not ports_one & ports_two
        kubectl(one, "create", "namespace", "only-in-one")
        assert kubectl(two, "get", "namespace", "only-in-one", check=False).returncode != 0
        one.down(say=_quiet)  # stopping one leaves the other alone
        assert kubectl(two, "get", "--raw", "/readyz").stdout.strip() == "ok"
        assert sandbox_processes(one) == [] and len(sandbox_processes(two)) == 6
    finally:
        one.down(purge=True, say=_quiet)
        two.down(purge=True, say=_quiet)


def test_a_port_in_use_moves_the_sandbox_to_another_port(fresh: Sandbox) -> None:
    config = fresh.up(say=_quiet)
    fresh.down(say=_quiet)
    old = config["ports"]["apiserver"]
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", old))
    squatter.listen()
    try:
        result = run_labkit("sandbox", "up", "--name", fresh.name)
        assert result.returncode == 0, result.stderr
        assert f"Port {old} (apiserver) is in use" in result.stderr
        new = fresh.state.load()["ports"]["apiserver"]
        assert new != old
        # The kubeconfig follows the move.
        assert f":{new}" in fresh.state.kubeconfig.read_text()
        assert kubectl(fresh, "get", "--raw", "/readyz").stdout.strip() == "ok"
    finally:
        squatter.close()


def test_corrupt_state_gives_a_clear_message(fresh: Sandbox) -> None:
    fresh.up(say=_quiet)
    fresh.down(say=_quiet)
    fresh.state.config_file.write_text("{not json")
    for command in (["up"], ["status"], ["down"]):
        result = run_labkit("sandbox", *command, "--name", fresh.name)
        assert result.returncode == 1
        assert "corrupt" in result.stderr and "--purge" in result.stderr
        assert "Traceback" not in result.stderr
    # --purge is the way out, and it works on a corrupt folder.
    assert run_labkit("sandbox", "down", "--name", fresh.name, "--purge").returncode == 0
    assert not fresh.state.root.exists()


def test_damaged_certificates_give_a_clear_message(fresh: Sandbox) -> None:
    fresh.up(say=_quiet)
    fresh.down(say=_quiet)
    fresh.state.pki.cert("apiserver").write_text("garbage")
    result = run_labkit("sandbox", "up", "--name", fresh.name)
    assert result.returncode == 1 and "not a valid PEM" in result.stderr and "--purge" in result.stderr
    fresh.state.pki.key("admin").unlink()
    result = run_labkit("sandbox", "up", "--name", fresh.name)
    assert result.returncode == 1 and "incomplete" in result.stderr


def test_a_foreign_folder_is_not_taken_over(fresh: Sandbox) -> None:
    fresh.state.root.mkdir(parents=True)
    (fresh.state.root / "thesis.tex").write_text("precious")
    result = run_labkit("sandbox", "up", "--name", fresh.name)
    assert result.returncode == 1
    assert "not a labkit sandbox folder" in result.stderr and "Traceback" not in result.stderr
    assert (fresh.state.root / "thesis.tex").read_text() == "precious"


def test_etcd_data_damage_is_reported_with_its_log(fresh: Sandbox) -> None:
    fresh.up(say=_quiet)
    fresh.down(say=_quiet)
    for wal in (fresh.state.etcd_data / "member" / "wal").glob("*.wal"):
        wal.write_bytes(b"\0garbage" * 100)
    start = time.monotonic()
    result = run_labkit("sandbox", "up", "--name", fresh.name, "--timeout", "60")
    assert result.returncode == 1
    assert "etcd keeps exiting" in result.stderr and "--purge" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 60  # it notices the crash loop, not a timeout


def test_bad_names_are_refused() -> None:
    result = run_labkit("sandbox", "up", "--name", "Bad_Name")
    assert result.returncode == 1 and "not a valid sandbox name" in result.stderr


def test_down_of_a_sandbox_that_never_existed() -> None:
    result = run_labkit("sandbox", "down", "--name", "never-made")
    assert result.returncode == 0 and "nothing to stop" in result.stderr


def test_list_and_status_of_stopped_sandboxes(fresh: Sandbox) -> None:
    fresh.up(say=_quiet)
    listed = run_labkit("sandbox", "list").stdout
    assert any(line.split()[:2] == [fresh.name, "running"] for line in listed.splitlines())
    fresh.down(say=_quiet)
    listed = run_labkit("sandbox", "list").stdout
    assert any(line.split()[:2] == [fresh.name, "stopped"] for line in listed.splitlines())
    status = run_labkit("sandbox", "status", "--name", fresh.name)
    assert status.returncode == 3 and "stopped" in status.stdout
    missing = run_labkit("sandbox", "status", "--name", "not-there")
    assert missing.returncode == 3 and "does not exist" in missing.stdout
