"""`kubectl logs` through the real API server to the node agent's kubelet API, and the log files behind it."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import re
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import eventually, kubectl, kubectl_json, module_cluster, run_labkit

from labkit.sandbox import binaries, procs
from labkit.sandbox.controlplane import Sandbox, kubelet_port_name
from labkit.sandbox.node import logs

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")
CAPTURE = logs.Capture.start_new()  # as an agent has one, for the tests without a cluster


def _quiet(_: str) -> None:
    pass


# -- the log files, without a cluster --------------------------------------------------------------


def _capture(folder: Path, restart: int, script: str) -> None:
    """Run ``script`` with its output captured as attempt ``restart``, and wait until all of it is in the file."""
    log = logs.ContainerLog(folder, CAPTURE)
    stdout, stderr = log.open(restart)
    try:
        process = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    finally:
        os.close(stdout)
        os.close(stderr)
    process.wait(30)
    log.wait_closed(10)


def _read(folder: Path, restart: int = 0, **options) -> bytes:  # noqa: ANN003
    options = {"tail": None, "since": None, "timestamps": False, "limit_bytes": None, **options}
    return b"".join(logs.read(folder, restart, **options))


def test_lines_are_written_in_the_cri_format(tmp_path: Path) -> None:
    _capture(tmp_path, 0, "echo out; sleep 0.2; echo err >&2; sleep 0.2; printf 'no newline'")
    lines = (tmp_path / "0.log").read_bytes().splitlines()
    # stdout and stderr are separate pipes: lines are ordered as they arrive (hence the pauses)
    assert [line.split(b" ", 1)[1] for line in lines] == [b"stdout F out", b"stderr F err", b"stdout F no newline"]
    assert all(STAMP.match(line) for line in lines)
    assert _read(tmp_path) == b"out\nerr\nno newline\n"  # an unfinished last line is shown as a line


def test_a_long_line_is_split_and_shown_whole(tmp_path: Path) -> None:
    _capture(tmp_path, 0, "python3 -c \"print('x' * 40000)\"; echo next")
    tags = [line.split(b" ")[2] for line in (tmp_path / "0.log").read_bytes().splitlines()]
    assert tags == [b"P", b"P", b"F", b"F"]  # 16 KiB + 16 KiB + the rest, then the next line
    shown = _read(tmp_path, timestamps=True).splitlines()
    assert len(shown) == 2 and shown[0].endswith(b"x" * 40000)  # one timestamp per line, not per fragment
    assert _read(tmp_path, tail=1) == b"next\n"


def test_a_full_file_is_rotated_and_a_follower_keeps_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "MAX_FILE_BYTES", 4096)
    stdout, stderr = logs.ContainerLog(tmp_path, CAPTURE).open(0)
    follower = logs.follow(tmp_path, 0, tail=None, since=None, timestamps=False, limit_bytes=None)
    followed = b""
    for batch in range(8):  # each batch is less than a file, so the follower is never two rotations behind
        expected = b"".join(b"line %d\n" % i for i in range(batch * 50, batch * 50 + 50))
        os.write(stdout, expected)
        while not followed.endswith(expected):
            followed += next(follower)
    os.close(stdout)
    os.close(stderr)
    followed += b"".join(follower)  # ends: the attempt's pipes are closed
    assert followed == b"".join(b"line %d\n" % i for i in range(400))
    assert (tmp_path / "0.log.1").exists() and (tmp_path / "0.log").stat().st_size < 4096


def test_only_the_attempt_before_is_kept(tmp_path: Path) -> None:
    for restart in range(4):
        _capture(tmp_path, restart, f"echo attempt {restart}")
    assert logs.attempts(tmp_path) == [2, 3]
    assert _read(tmp_path, 2) == b"attempt 2\n"


# -- kubectl logs against a sandbox ----------------------------------------------------------------


cluster = module_cluster("logs", nodes=1)


def _logs(cluster: Sandbox, ns: str, *args: str) -> subprocess.CompletedProcess:
    return kubectl(cluster, "-n", ns, "logs", *args, check=False)


def _wait_for_output(cluster: Sandbox, ns: str, pod: str, text: str, *args: str) -> str:
    return eventually(lambda: text in (out := _logs(cluster, ns, pod, *args).stdout) and out, timeout=60,
                      what=f"{text!r} in the logs of {pod}")  # fmt: skip


def test_logs_tail_timestamps_and_byte_limit(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "numbers", "--image=busybox", "--",
            "sh", "-c", "echo starting >&2; sleep 0.5; i=1; while [ $i -le 10 ]; do echo line $i; i=$((i+1)); done; "
            "exec sleep 3600")  # fmt: skip
    everything = _wait_for_output(cluster, ns, "numbers", "line 10")
    assert everything == "starting\n" + "".join(f"line {i}\n" for i in range(1, 11))  # stderr too
    assert _logs(cluster, ns, "numbers", "--tail=3").stdout == "line 8\nline 9\nline 10\n"
    stamped = _logs(cluster, ns, "numbers", "--timestamps", "--tail=2").stdout.encode().splitlines()
    assert len(stamped) == 2 and all(STAMP.match(line) for line in stamped)
    assert stamped[1].endswith(b" line 10")
    assert _logs(cluster, ns, "numbers", "--limit-bytes=12").stdout == "starting\nlin"


def test_logs_since(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "timeline", "--image=busybox", "--",
            "sh", "-c", "echo early; sleep 8; echo late; exec sleep 3600")  # fmt: skip
    _wait_for_output(cluster, ns, "timeline", "late")
    assert _logs(cluster, ns, "timeline", "--since=5s").stdout == "late\n"  # `early` is at least 8 s old
    assert _logs(cluster, ns, "timeline", "--since=1h").stdout == "early\nlate\n"
    late = _logs(cluster, ns, "timeline", "--timestamps").stdout.splitlines()[1].split()[0]
    # --since-time has whole seconds on the wire: the second `late` was written in, 8 s after `early`.
    assert _logs(cluster, ns, "timeline", f"--since-time={late}").stdout == "late\n"


def test_logs_follow_streams_until_the_container_exits(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "ticker", "--image=busybox", "--restart=Never", "--",
            "sh", "-c", "i=1; while [ $i -le 6 ]; do echo tick $i; i=$((i+1)); sleep 1; done")  # fmt: skip
    _wait_for_output(cluster, ns, "ticker", "tick 1")
    follower = subprocess.Popen([str(binaries.toolset()["kubectl"]), "-n", ns, "logs", "-f", "ticker"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "KUBECONFIG": str(cluster.state.kubeconfig)})  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in follower.stdout], daemon=True).start()
    try:
        seen = [lines.get(timeout=30) for _ in range(6)]
        assert seen == [f"tick {i}" for i in range(1, 7)]
        assert follower.wait(30) == 0, follower.stderr.read()  # the container ended: so does the follow
    finally:
        follower.kill()
        follower.wait()


def test_follow_shows_lines_as_they_come(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "slow", "--image=busybox", "--",
            "sh", "-c", "echo first; sleep 3; echo second; exec sleep 3600")  # fmt: skip
    _wait_for_output(cluster, ns, "slow", "first")
    follower = subprocess.Popen([str(binaries.toolset()["kubectl"]), "-n", ns, "logs", "-f", "slow"],
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "KUBECONFIG": str(cluster.state.kubeconfig)})  # fmt: skip
    try:
        assert follower.stdout.readline() == "first\n"
        assert follower.stdout.readline() == "second\n"  # arrived while the follow was open
        assert follower.poll() is None  # the container still runs: the follow goes on
    finally:
        follower.kill()
        follower.wait()


def test_previous_shows_the_attempt_before_a_restart(cluster: Sandbox, ns: str) -> None:
    marker = f"/tmp/labkit-test-{uuid.uuid4().hex}"
    kubectl(cluster, "-n", ns, "run", "restarts", "--image=busybox", "--",
            "sh", "-c", f"if [ -e {marker} ]; then rm -f {marker}; echo second attempt; exec sleep 3600; fi; "
            f"touch {marker}; echo first attempt; exit 1")  # fmt: skip
    _wait_for_output(cluster, ns, "restarts", "second attempt")
    assert _logs(cluster, ns, "restarts", "--previous").stdout == "first attempt\n"
    assert _logs(cluster, ns, "restarts", "-p", "--tail=1", "--timestamps").stdout.endswith(" first attempt\n")
    pod = kubectl_json(cluster, "-n", ns, "get", "pod", "restarts")
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 1


def test_previous_without_a_restart_is_an_error(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "once", "--image=busybox", "--", "sh", "-c", "echo hi; exec sleep 3600")
    _wait_for_output(cluster, ns, "once", "hi")
    result = _logs(cluster, ns, "once", "--previous")
    assert result.returncode != 0
    assert 'previous terminated container "once" in pod "once" not found' in result.stderr


def test_multi_container_pod_and_unknown_container(cluster: Sandbox, ns: str) -> None:
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pair"}, "spec": {"containers": [
        {"name": name, "image": "busybox", "command": ["sh", "-c", f"echo from {name}; exec sleep 3600"]}
        for name in ("web", "sidecar")]}}  # fmt: skip
    kubectl(cluster, "-n", ns, "apply", "-f", "-", input=json.dumps(manifest))
    _wait_for_output(cluster, ns, "pair", "from sidecar", "-c", "sidecar")
    assert _logs(cluster, ns, "pair", "-c", "web").stdout == "from web\n"
    both = _logs(cluster, ns, "pair", "--all-containers", "--prefix").stdout.splitlines()
    assert sorted(both) == ["[pod/pair/sidecar] from sidecar", "[pod/pair/web] from web"]
    unknown = _logs(cluster, ns, "pair", "-c", "nope")
    assert unknown.returncode != 0 and "container nope is not valid for pod pair" in unknown.stderr


def test_a_container_that_cannot_start_says_why(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "nothing", "--image=example.com/no/such:1")
    result = eventually(lambda: (r := _logs(cluster, ns, "nothing")).stderr and r, what="an error from the node")
    assert 'container "nothing" in pod "nothing" is waiting to start' in result.stderr
    assert result.returncode != 0


# -- the kubelet API itself ------------------------------------------------------------------------


def _node_api(cluster: Sandbox, path: str, stem: str | None = None, token: str | None = None) -> tuple[int, str]:
    """GET ``path`` of node-1's kubelet API with client certificate ``stem`` (or a bearer ``token``, or as nobody),
    verifying the node's certificate."""
    pki = cluster.state.pki
    context = ssl.create_default_context(cafile=str(pki.cert("ca")))
    if stem:
        context.load_cert_chain(str(pki.cert(stem)), str(pki.key(stem)))
    port = cluster.state.load()["ports"][kubelet_port_name("node-1")]
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})  # fmt: skip
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_node_publishes_its_kubelet_port(cluster: Sandbox) -> None:
    node = kubectl_json(cluster, "get", "node", "node-1")
    port = cluster.state.load()["ports"][kubelet_port_name("node-1")]
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == port
    assert _node_api(cluster, "/healthz", "apiserver-kubelet-client") == (200, "ok")


def test_only_the_api_server_and_admins_are_served(cluster: Sandbox, ns: str) -> None:
    status, body = _node_api(cluster, "/healthz", "nodes/node-1")  # a valid certificate, but a node's
    assert status == 403 and body.startswith("Forbidden (user=system:node:node-1, verb=get, resource=nodes")
    assert _node_api(cluster, "/healthz", "admin") == (200, "ok")  # system:masters
    assert _node_api(cluster, "/healthz") == (401, "Unauthorized\n")  # no certificate, no token
    assert _node_api(cluster, "/healthz", token="not-a-token") == (401, "Unauthorized\n")


def test_a_service_accounts_token_reaches_what_its_role_allows_and_nothing_else(cluster: Sandbox, ns: str) -> None:
    # As a kubelet in webhook mode: the token is reviewed by the API server, the request authorized as the
    # API server would authorize the same request through pods/proxy.
    other = f"{ns}-other"[:60]
    kubectl(cluster, "create", "namespace", other)
    try:
        for where in (ns, other):
            kubectl(cluster, "-n", where, "run", "web", "--image=labkit/web:1.0", "--port=8080",
                    "--overrides", json.dumps({"spec": {"nodeName": "node-1"}}))  # fmt: skip
        kubectl(cluster, "-n", ns, "create", "serviceaccount", "trainee")
        kubectl(cluster, "-n", ns, "create", "role", "proxy", "--verb=get", "--resource=pods/proxy")
        kubectl(cluster, "-n", ns, "create", "rolebinding", "proxy", "--role=proxy", f"--serviceaccount={ns}:trainee")
        token = kubectl(cluster, "-n", ns, "create", "token", "trainee").stdout.strip()
        for where in (ns, other):
            eventually(lambda where=where: _node_api(cluster, f"/labkit/proxy/{where}/web/8080/healthz", "admin")[0] == 200,
                       what=f"web in {where} answering")  # fmt: skip
        assert _node_api(cluster, f"/labkit/proxy/{ns}/web/8080/version", token=token)[0] == 200
        status, body = _node_api(cluster, f"/labkit/proxy/{other}/web/8080/version", token=token)
        assert (status, body) == (403, f"Forbidden (user=system:serviceaccount:{ns}:trainee, verb=get, resource=pods, "
                                       "subresource(s)=[proxy])\n")  # fmt: skip
        status, body = _node_api(cluster, "/labkit/faults", token=token)
        assert status == 403 and "resource=nodes, subresource(s)=[proxy]" in body
    finally:
        kubectl(cluster, "delete", "namespace", other, "--wait=false", check=False)


def test_kubelet_wording_for_unknown_pods_and_containers(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "lonely", "--image=busybox", "--", "sh", "-c", "echo here; exec sleep 3600")
    _wait_for_output(cluster, ns, "lonely", "here")
    api = "apiserver-kubelet-client"
    assert _node_api(cluster, f"/containerLogs/{ns}/lonely/lonely", api) == (200, "here\n")
    assert _node_api(cluster, f"/containerLogs/{ns}/lonely/nope", api) == (
        404, 'container "nope" not found in pod "lonely"')
    assert _node_api(cluster, f"/containerLogs/{ns}/ghost/x", api) == (404, 'pod "ghost" does not exist')
    assert _node_api(cluster, f"/containerLogs/{ns}/lonely/lonely?tailLines=-1", api)[0] == 422


def test_since_time_in_the_future_shows_nothing(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "quiet", "--image=busybox", "--", "sh", "-c", "echo now; exec sleep 3600")
    _wait_for_output(cluster, ns, "quiet", "now")
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert _logs(cluster, ns, "quiet", f"--since-time={later}").stdout == ""
    assert _logs(cluster, ns, "quiet", "--tail=0").stdout == ""


def test_a_stopped_node_closes_its_kubelet_api(cluster: Sandbox) -> None:
    port = cluster.state.load()["ports"][kubelet_port_name("node-1")]
    assert run_labkit("sandbox", "node", "stop", "node-1", "--name", cluster.name).returncode == 0
    try:
        eventually(lambda: not procs.listening(port), timeout=10, what="the lost node's port to close")
    finally:
        run_labkit("sandbox", "node", "start", "node-1", "--name", cluster.name)
    eventually(lambda: procs.listening(port), timeout=30, what="the returned node's port to open")
    # `down` (the fixture's) then checks that no port of the sandbox, these included, is left open.
