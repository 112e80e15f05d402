"""An operator's toolbox against the real API server: kubectl exec, attach, cp and port-forward, and the official
Python client's stream and portforward helpers, served by the node agent as a kubelet serves them."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import eventually, kubectl, kubectl_json, module_cluster

from labkit.sandbox import binaries
from labkit.sandbox.controlplane import Sandbox

cluster = module_cluster("streaming", nodes=1)

POD = """
apiVersion: v1
kind: Pod
metadata: {name: box}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: python:3.12
    workingDir: /work
    env: [{name: GREETING, value: hello}]
    command: [python, -m, http.server, "8080"]
    resources: {limits: {memory: 200Mi}}
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
  - name: side
    image: busybox
    command: [sleep, "3600"]
"""


def _env(cluster: Sandbox) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(cluster.state.kubeconfig)}


def _kubectl() -> str:
    return str(binaries.toolset()["kubectl"])


@pytest.fixture
def box(cluster: Sandbox, ns: str) -> str:
    kubectl(cluster, "-n", ns, "apply", "-f", "-", input=POD)
    kubectl(cluster, "-n", ns, "wait", "--for=condition=Ready", "pod/box", "--timeout=60s")
    return ns


def test_exec_runs_in_the_container_as_its_process_does_and_passes_the_exit_code(cluster: Sandbox, box: str) -> None:
    done = kubectl(cluster, "-n", box, "exec", "box", "-c", "main", "--", "sh", "-c",
                   'echo "$GREETING from $(hostname) in $(pwd) as $(id -u)"; echo oops >&2; exit 3', check=False)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hello from box in /work as 0\n"
    assert "oops" in done.stderr and "command terminated with exit code 3" in done.stderr
    # Its files are the container's: the agent's machine is untouched, the container's own process sees them.
    kubectl(cluster, "-n", box, "exec", "box", "-c", "main", "--", "sh", "-c", "echo mine > /usr/labkit-exec-test")
    assert not Path("/usr/labkit-exec-test").exists()
    seen = kubectl(cluster, "-n", box, "exec", "box", "-c", "main", "--", "cat", "/usr/labkit-exec-test").stdout
    assert seen == "mine\n"
    # The other container of the pod has its own files, and shares the pod's network.
    other = kubectl(cluster, "-n", box, "exec", "box", "-c", "side", "--", "ls", "/usr/labkit-exec-test", check=False)
    assert other.returncode != 0 and "No such file" in other.stderr
    page = kubectl(cluster, "-n", box, "exec", "box", "-c", "side", "--", "wget", "-qO-", "http://127.0.0.1:8080/")
    assert "Directory listing" in page.stdout


def test_exec_with_stdin_and_a_missing_command(cluster: Sandbox, box: str) -> None:
    done = kubectl(cluster, "-n", box, "exec", "-i", "box", "-c", "main", "--", "sh", "-c", "wc -c; cat >/dev/null",
                   input="x" * 100_000)  # fmt: skip
    assert done.stdout.strip() == "100000"
    missing = kubectl(cluster, "-n", box, "exec", "box", "--", "no-such-tool", check=False)
    assert missing.returncode != 0 and missing.stdout == ""
    assert 'exec: "no-such-tool": executable file not found in $PATH' in missing.stderr
    gone = kubectl(cluster, "-n", box, "exec", "box", "-c", "nope", "--", "true", check=False)
    assert gone.returncode != 0 and 'container nope is not valid for pod box' in gone.stderr


def _in_terminal(command: list[str], keys: list[str], env: dict[str, str], columns: int = 100,
                 rows: int = 30) -> subprocess.CompletedProcess:  # fmt: skip
    """``command`` run on a terminal of ``columns`` x ``rows`` (util-linux's script), typing ``keys`` one by one."""
    script = shutil.which("script")
    if script is None:
        pytest.skip("util-linux's script is not installed")
    line = f"stty cols {columns} rows {rows}; " + " ".join(command)
    process = subprocess.Popen([script, "-qec", line, "/dev/null"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env)  # fmt: skip
    time.sleep(3)
    for key in keys:
        process.stdin.write(key.encode())
        process.stdin.flush()
        time.sleep(1)
    out, _ = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, out.decode(errors="replace"))


def test_exec_on_a_terminal_follows_its_size_and_passes_the_exit_code(cluster: Sandbox, box: str) -> None:
    done = _in_terminal([_kubectl(), "-n", box, "exec", "-it", "box", "-c", "side", "--", "sh"],
                        ["stty size; tty; echo $((6*7))\r", "exit 5\r"], _env(cluster))  # fmt: skip
    assert "30 100" in done.stdout and "/dev/pts/" in done.stdout and "42" in done.stdout, done.stdout
    assert done.returncode == 5, done.stdout


def test_run_interactive_attaches_and_removes_the_pod(cluster: Sandbox, ns: str) -> None:
    done = subprocess.run([_kubectl(), "-n", ns, "run", "once", "-i", "--rm", "--image=busybox", "--restart=Never",
                           "--", "sh", "-c", "read line; echo got $line; exit 4"], input="ping\n", capture_output=True,
                          text=True, timeout=90, env=_env(cluster))  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert "got ping" in done.stdout
    assert "falling back" not in done.stderr.lower() and "unable to upgrade" not in done.stderr, done.stderr
    eventually(lambda: kubectl(cluster, "-n", ns, "get", "pod", "once", check=False).returncode != 0,
               what="the pod to be removed")  # fmt: skip


def test_attach_to_a_terminal_container(cluster: Sandbox, ns: str) -> None:
    done = _in_terminal([_kubectl(), "-n", ns, "run", "shell", "-it", "--rm", "--image=busybox", "--restart=Never",
                         "--", "sh"], ["tty; echo $((7*6))\r", "exit\r"], _env(cluster))  # fmt: skip
    assert "/dev/pts/" in done.stdout and "42" in done.stdout, done.stdout
    assert "Session ended" in done.stdout, done.stdout


def test_cp_both_ways(cluster: Sandbox, box: str, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3_000_000))
    kubectl(cluster, "-n", box, "cp", str(blob), "box:/tmp/blob", "-c", "main")
    digest = kubectl(cluster, "-n", box, "exec", "box", "-c", "main", "--", "md5sum", "/tmp/blob").stdout.split()[0]
    assert digest == hashlib.md5(blob.read_bytes()).hexdigest()
    back = tmp_path / "back"
    kubectl(cluster, "-n", box, "cp", "box:/tmp/blob", str(back), "-c", "main")
    assert back.read_bytes() == blob.read_bytes()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_port_forward_several_ports_and_connections(cluster: Sandbox, box: str) -> None:
    web, dead = _free_port(), _free_port()
    forward = subprocess.Popen([_kubectl(), "-n", box, "port-forward", "pod/box", f"{web}:8080", f"{dead}:9999"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cluster))  # fmt: skip
    try:
        assert "Forwarding from 127.0.0.1" in forward.stdout.readline()
        pages = [urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=10).read() for _ in range(5)]
        assert all(b"Directory listing" in page for page in pages)
        with pytest.raises(OSError):  # nothing listens on 9999 in the pod: the connection is dropped ...
            urllib.request.urlopen(f"http://127.0.0.1:{dead}/", timeout=10).read()
    finally:
        forward.terminate()
        _, errors = forward.communicate(timeout=30)
    # ... and kubectl says why, in the runtime's words.
    assert f"an error occurred forwarding {dead} -> 9999" in errors, errors
    assert "dial tcp4 127.0.0.1:9999: connect: connection refused" in errors, errors


def test_the_python_client_streams_and_forwards(cluster: Sandbox, box: str) -> None:
    from kubernetes import client, config
    from kubernetes.stream import portforward, stream

    api = client.CoreV1Api(config.new_client_from_config(str(cluster.state.kubeconfig)))
    session = stream(api.connect_get_namespaced_pod_exec, "box", box, container="main",
                     command=["sh", "-c", "read x; echo got $x; exit 2"], stdin=True, stdout=True, stderr=True,
                     tty=False, _preload_content=False)  # fmt: skip
    session.write_stdin("it\n")
    session.run_forever(timeout=30)
    assert session.read_stdout().strip() == "got it" and session.returncode == 2
    forward = portforward(api.connect_get_namespaced_pod_portforward, "box", box, ports="8080,9999")
    sock = forward.socket(8080)
    sock.setblocking(True)
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.0 200") and forward.error(8080) is None
    assert "connect: connection refused" in forward.error(9999)


def test_an_exec_counts_toward_the_containers_memory(cluster: Sandbox, box: str) -> None:
    # A real runtime runs an exec in the container's cgroup: memory it takes can get the container OOM-killed.
    kubectl(cluster, "-n", box, "exec", "box", "-c", "main", "--", "python", "-c",
            "import time; x = bytearray(400 << 20); time.sleep(30)", check=False)  # fmt: skip

    def killed() -> dict | None:
        status = kubectl_json(cluster, "-n", box, "get", "pod", "box")["status"]["containerStatuses"]
        main = next(s for s in status if s["name"] == "main")
        return main if main["lastState"].get("terminated", {}).get("reason") == "OOMKilled" else None

    main = eventually(killed, timeout=60, what="the container to be OOM-killed")
    assert main["restartCount"] == 1
