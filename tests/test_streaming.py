"""An operator's toolbox against the real API server: kubectl exec, attach, cp and port-forward, and the official
Python client's stream and portforward helpers, served by the node agent as a kubelet serves them; and the API
server's own way into the pod network: pods/proxy, services/proxy, kubectl proxy, a webhook and an aggregated API
served by pods."""

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


# -- the API server reaches the pod network --------------------------------------------------------

SERVER = r'''
import json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # an admission webhook: objects labelled forbidden=yes are refused
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        labels = review["request"]["object"]["metadata"].get("labels") or {}
        allowed = labels.get("forbidden") != "yes"
        response = {"uid": review["request"]["uid"], "allowed": allowed}
        if not allowed:
            response["status"] = {"code": 403, "message": "the gate refuses objects labelled forbidden=yes"}
        self._send(200, {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})

    def do_GET(self):  # an aggregated API: demo.labkit.io/v1, with one resource
        if self.path.split("?")[0] == "/apis/demo.labkit.io/v1":
            self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "demo.labkit.io/v1",
                             "resources": [{"name": "greetings", "namespaced": False, "kind": "Greeting",
                                            "verbs": ["get", "list"]}]})
        elif self.path.split("?")[0] == "/apis/demo.labkit.io/v1/greetings":
            self._send(200, {"kind": "GreetingList", "apiVersion": "demo.labkit.io/v1", "metadata": {},
                             "items": [{"kind": "Greeting", "apiVersion": "demo.labkit.io/v1",
                                        "metadata": {"name": "hello"}, "served_by": self.headers.get("X-Remote-User")}]})
        else:
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

server = ThreadingHTTPServer(("0.0.0.0", 8443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/tls/tls.crt", "/tls/tls.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
'''


def _serving_certificate(name: str) -> tuple[bytes, bytes]:
    """A self-signed serving certificate for ``name`` (its own CA), and its key, as PEM."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def gate(cluster: Sandbox, ns: str) -> tuple[str, bytes]:
    """A pod serving HTTPS on 8443 behind Service ``gate`` (443): an admission webhook and an aggregated API."""
    import base64
    import json

    cert, key = _serving_certificate(f"gate.{ns}.svc")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gate-tls"}, "type": "kubernetes.io/tls",
              "data": {"tls.crt": base64.b64encode(cert).decode(), "tls.key": base64.b64encode(key).decode()}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gate"}, "data": {"server.py": SERVER}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gate", "labels": {"app": "gate"}},
           "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
               "name": "gate", "image": "python:3.12", "command": ["python", "/app/server.py"],
               "ports": [{"containerPort": 8443}], "readinessProbe": {"tcpSocket": {"port": 8443}, "periodSeconds": 1},
               "volumeMounts": [{"name": "app", "mountPath": "/app"}, {"name": "tls", "mountPath": "/tls"}]}],
               "volumes": [{"name": "app", "configMap": {"name": "gate"}}, {"name": "tls", "secret": {"secretName": "gate-tls"}}]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gate"},
               "spec": {"selector": {"app": "gate"}, "ports": [{"port": 443, "targetPort": 8443}]}}  # fmt: skip
    for item in (secret, config, pod, service):
        kubectl(cluster, "-n", ns, "apply", "-f", "-", input=json.dumps(item))
    kubectl(cluster, "-n", ns, "wait", "--for=condition=Ready", "pod/gate", "--timeout=60s")
    return ns, cert


def test_pods_and_services_proxy_and_kubectl_proxy(cluster: Sandbox, box: str) -> None:
    through_pod = kubectl(cluster, "get", "--raw", f"/api/v1/namespaces/{box}/pods/box:8080/proxy/").stdout
    assert "Directory listing" in through_pod
    kubectl(cluster, "-n", box, "expose", "pod", "box", "--port=80", "--target-port=8080")
    through_service = kubectl(cluster, "get", "--raw", f"/api/v1/namespaces/{box}/services/box:80/proxy/").stdout
    assert "Directory listing" in through_service
    port = _free_port()
    proxy = subprocess.Popen([_kubectl(), "proxy", f"--port={port}"], stdout=subprocess.PIPE, text=True,
                             env=_env(cluster))  # fmt: skip
    try:
        assert "Starting to serve" in proxy.stdout.readline()
        url = f"http://127.0.0.1:{port}/api/v1/namespaces/{box}/services/box:80/proxy/"
        assert b"Directory listing" in urllib.request.urlopen(url, timeout=10).read()
    finally:
        proxy.terminate()
        proxy.wait(10)


def test_an_admission_webhook_served_by_a_pod_refuses_a_label(cluster: Sandbox, gate: tuple[str, bytes]) -> None:
    import base64
    import json

    ns, cert = gate
    webhook = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
               "metadata": {"name": f"gate-{ns}"},
               "webhooks": [{"name": "gate.labkit.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                             "failurePolicy": "Fail", "timeoutSeconds": 10,
                             "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                             "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                                        "resources": ["configmaps"]}],
                             "clientConfig": {"caBundle": base64.b64encode(cert).decode(),
                                              "service": {"namespace": ns, "name": "gate", "path": "/validate"}}}]}  # fmt: skip
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(webhook))
    try:
        bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bad", "labels": {"forbidden": "yes"}}}
        done = eventually(lambda: (lambda d: d if "denied" in d.stderr or d.returncode == 0 else None)(
            kubectl(cluster, "-n", ns, "create", "-f", "-", input=json.dumps(bad), check=False)), timeout=30,
            what="the webhook to answer")  # fmt: skip
        assert done.returncode != 0, "the labelled ConfigMap was let in"
        assert 'admission webhook "gate.labkit.io" denied the request: the gate refuses objects labelled forbidden=yes' \
            in done.stderr, done.stderr
        good = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "good"}}
        kubectl(cluster, "-n", ns, "create", "-f", "-", input=json.dumps(good))
    finally:
        kubectl(cluster, "delete", "validatingwebhookconfiguration", f"gate-{ns}", check=False)


def test_an_apiservice_backed_by_a_pod(cluster: Sandbox, gate: tuple[str, bytes]) -> None:
    import json

    ns, _ = gate
    service = {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": "v1.demo.labkit.io"},
               "spec": {"group": "demo.labkit.io", "version": "v1", "groupPriorityMinimum": 100, "versionPriority": 10,
                        "insecureSkipTLSVerify": True, "service": {"namespace": ns, "name": "gate", "port": 443}}}  # fmt: skip
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(service))
    try:
        def available() -> bool:
            conditions = kubectl_json(cluster, "get", "apiservice", "v1.demo.labkit.io")["status"].get("conditions", [])
            return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)

        eventually(available, timeout=60, what="the APIService to become Available")
        listing = json.loads(kubectl(cluster, "get", "--raw", "/apis/demo.labkit.io/v1/greetings").stdout)
        assert [item["metadata"]["name"] for item in listing["items"]] == ["hello"]
        assert listing["items"][0]["served_by"] == "kubernetes-admin"  # the front proxy's headers, as the aggregator sends them
        names = kubectl(cluster, "api-resources", "--api-group=demo.labkit.io", "-o", "name").stdout.split()
        assert names == ["greetings.demo.labkit.io"]
    finally:
        kubectl(cluster, "delete", "apiservice", "v1.demo.labkit.io", check=False)


def test_kubectl_debug_runs_an_ephemeral_container_in_the_pod(cluster: Sandbox, box: str) -> None:
    done = _in_terminal([_kubectl(), "-n", box, "debug", "box", "--image=busybox", "-it", "--target=main",
                         "--container=debugger"],
                        ["wget -qO- http://127.0.0.1:8080/ | grep -c Directory; hostname; echo $((3*14))\r", "exit\r"],
                        _env(cluster))  # fmt: skip
    assert "\n2\r\nbox\r\n42\r\n" in done.stdout, done.stdout  # the pod's network and hostname
    status = kubectl_json(cluster, "-n", box, "get", "pod", "box")["status"]
    (debugger,) = status["ephemeralContainerStatuses"]
    assert debugger["name"] == "debugger" and debugger["ready"] is False and debugger["restartCount"] == 0
    assert debugger["state"]["terminated"]["exitCode"] == 0 and debugger["containerID"].startswith("labkit://")
    events = kubectl_json(cluster, "-n", box, "get", "events", "--field-selector", "involvedObject.name=box")["items"]
    started = [e for e in events if e["involvedObject"].get("fieldPath") == "spec.ephemeralContainers{debugger}"]
    assert {"Created", "Started"} <= {e["reason"] for e in started}
    # The pod's own containers were left as they were.
    assert all(s["restartCount"] == 0 and "running" in s["state"] for s in status["containerStatuses"])
    described = kubectl(cluster, "-n", box, "describe", "pod", "box").stdout
    assert "Ephemeral Containers:\n  debugger:" in described
