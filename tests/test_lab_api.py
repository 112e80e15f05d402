"""The notebook API against a live sandbox: what a lab cell does, and what a trainee's mistakes lead to.

Each test drives ``labkit.start_lab`` in this process, as a notebook's kernel
would, against a one-node sandbox that ``$KUBECONFIG`` points at.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import yaml
from conftest import eventually, kubectl, kubectl_json, module_cluster

import labkit
from labkit import checks
from labkit.checks import CheckFailed
from labkit.lab import Lab
from labkit.sandbox.controlplane import Sandbox
from labkit.lab.view import LiveView

cluster = module_cluster("lab-api", nodes=1)

WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: labkit/web:IMAGE
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /readyz, port: 8080}, periodSeconds: 1}
"""


@pytest.fixture
def lab(cluster: Sandbox, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Lab:
    monkeypatch.setenv("KUBECONFIG", str(cluster.state.kubeconfig))
    monkeypatch.setenv("LABKIT_CLUSTER", "kubeconfig")
    lab = labkit.start_lab(request.node.name.removeprefix("test_").replace("_", "-")[:30], fresh=True)
    yield lab
    lab.close(quiet=True)


def namespace_phase(cluster: Sandbox, name: str) -> str | None:
    found = [ns for ns in kubectl_json(cluster, "get", "namespaces")["items"] if ns["metadata"]["name"] == name]
    return found[0]["status"]["phase"] if found else None


def test_a_lab_has_a_namespace_of_its_own_and_starting_again_keeps_it(lab: Lab, cluster: Sandbox) -> None:
    assert namespace_phase(cluster, lab.namespace) == "Active"
    again = labkit.start_lab(lab.id)
    assert again is lab and again.namespace == lab.namespace
    fresh = labkit.start_lab(lab.id, fresh=True)
    assert fresh.namespace != lab.namespace
    eventually(lambda: namespace_phase(cluster, lab.namespace) in (None, "Terminating"), what="the old namespace to go")
    fresh.close()
    eventually(lambda: namespace_phase(cluster, fresh.namespace) in (None, "Terminating"), what="closing to delete it")


def test_apply_wait_and_reach_the_app(lab: Lab) -> None:
    applied = lab.apply(WEB.replace("IMAGE", "2.0"))
    assert applied == ["deployment/web"]
    lab.wait_ready("deployment/web", timeout=60)
    response = lab.http("deployment/web", "/version")
    assert response.ok and "2.0" in response.text
    assert lab.http("deployment/web", "/version", port=9999).status == 502  # nothing listens there
    output = lab.kubectl("get deployment web -o name")
    assert output.strip() == "deployment.apps/web"
    assert any(e["reason"] == "ScalingReplicaSet" for e in lab.event_list())
    checks.deployment(lab, "web", replicas=1, image="labkit/web:2.0")
    with pytest.raises(CheckFailed, match="asks for 1 replicas; the task asks for 3"):
        checks.deployment(lab, "web", replicas=3)


ECHO = r"""
import json
from http.server import BaseHTTPRequestHandler, HTTPServer
class Echo(BaseHTTPRequestHandler):
    def answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        reply = json.dumps({"method": self.command, "path": self.path, "body": body,
                            "type": self.headers.get("Content-Type")}).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Length", str(len(reply))); self.end_headers(); self.wfile.write(reply)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *args): pass
HTTPServer(("0.0.0.0", 8000), Echo).serve_forever()
"""


def test_http_sends_each_method_with_its_body(lab: Lab) -> None:
    lab.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo"},
               "spec": {"containers": [{"name": "echo", "image": "python:3.12", "command": ["python3", "-c", ECHO],
                                        "ports": [{"containerPort": 8000}],
                                        "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1}}]}})  # fmt: skip
    lab.wait_ready("pod/echo", timeout=60)
    assert lab.http("pod/echo", "/tasks?state=done").json() == {"method": "GET", "path": "/tasks?state=done", "body": "",
                                                                "type": None}  # fmt: skip
    posted = lab.http("pod/echo", "/tasks", method="post", json={"kind": "sleep", "ms": 5})
    assert posted.status == 201 and posted.json() == {"method": "POST", "path": "/tasks", "type": "application/json",
                                                      "body": '{"kind": "sleep", "ms": 5}'}  # fmt: skip
    put = lab.http("pod/echo", "/config", method="PUT", data="MESSAGE=hi")
    assert (put.json()["method"], put.json()["body"], put.json()["type"]) == ("PUT", "MESSAGE=hi", "application/octet-stream")
    assert lab.http("pod/echo", "/tasks/7", method="DELETE").json()["method"] == "DELETE"
    with pytest.raises(labkit.LabkitError, match="not PATCH"):
        lab.http("pod/echo", "/", method="PATCH")
    with pytest.raises(labkit.LabkitError, match="either json= or data="):
        lab.http("pod/echo", "/", method="POST", json={}, data="x")


TRAINEE = r"""
import labkit
lab = labkit.start_lab("01-deploy-and-scale")
print("CLUSTER", lab.cluster.source, lab.namespace, flush=True)
lab.apply(WEB)
lab.wait_ready("deployment/web", timeout=90)
lab.kubectl("get deployment web -o name")
print("PODS", len(lab.pods("app=web")), flush=True)
lab.close()
print("LEFT", sorted(d["metadata"]["name"] for d in lab.cluster.request(
    "GET", f"/apis/apps/v1/namespaces/{lab.namespace}/deployments")["items"]), flush=True)
"""


def test_a_lab_in_a_trainees_pod_works_in_its_namespace_as_its_service_account(cluster: Sandbox) -> None:
    # As on JupyterHub on Kubernetes: the notebook server is a pod whose service account may edit its own
    # namespace and nothing else (it cannot make namespaces, list nodes, or see other trainees).
    ns = "trainee-ana"
    kubectl(cluster, "create", "namespace", ns)
    try:
        kubectl(cluster, "-n", ns, "create", "serviceaccount", "ana")
        kubectl(cluster, "-n", ns, "create", "rolebinding", "ana-edit", "--clusterrole=edit", f"--serviceaccount={ns}:ana")
        script = f"WEB = {WEB.replace('IMAGE', '1.0')!r}\n" + TRAINEE
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jupyter-ana", "namespace": ns},
               "spec": {"serviceAccountName": "ana", "restartPolicy": "Never",
                        "containers": [{"name": "notebook", "image": "python:3.12", "command": ["python3", "-c", script],
                                        "env": [{"name": "HOME", "value": "/tmp"}]}]}}  # fmt: skip
        kubectl(cluster, "apply", "-f", "-", input=json.dumps(pod))
        phase = eventually(lambda: kubectl_json(cluster, "-n", ns, "get", "pod", "jupyter-ana")["status"].get("phase")
                           in ("Succeeded", "Failed") and kubectl_json(cluster, "-n", ns, "get", "pod", "jupyter-ana"),
                           timeout=180, what="the trainee's lab to finish")  # fmt: skip
        logs = kubectl(cluster, "-n", ns, "logs", "jupyter-ana").stdout
        assert phase["status"]["phase"] == "Succeeded", logs
        assert f"CLUSTER in-cluster {ns}" in logs, logs  # its own namespace: it may not make one
        assert "deployment.apps/web" in logs and "PODS 1" in logs, logs  # kubectl found the service account too
        assert "LEFT []" in logs, logs  # closing removed what the lab made, by label
    finally:
        kubectl(cluster, "delete", "namespace", ns, "--wait=false")


def test_a_bad_release_fails_the_wait_with_the_reason(lab: Lab) -> None:
    manifest = WEB.replace("IMAGE", "3.0").replace("replicas: 1", "replicas: 1\n  progressDeadlineSeconds: 3")
    lab.apply(manifest)
    with pytest.raises(labkit.LabkitError) as failure:
        lab.wait_ready("deployment/web", timeout=60)
    assert "ProgressDeadlineExceeded" in str(failure.value) or "progress deadline" in str(failure.value)
    assert "readiness probe fails" in failure.value.hint  # why the pod is not ready
    lab.apply(WEB.replace("IMAGE", "nosuchtag"))
    with pytest.raises(labkit.LabkitError) as stuck:
        lab.wait_ready("deployment/web", timeout=8)
    assert "ImagePullBackOff" in failure.value.hint + stuck.value.hint or "ErrImagePull" in stuck.value.hint


def test_malformed_manifests_say_what_is_wrong(lab: Lab) -> None:
    cases = {
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n  data: {}\n": "is not valid YAML at line 4",
        "apiVersion: v1\nkind: ConfigMap\n": "has no metadata.name",
        "apiVersion: v1\nkind: Gadget\nmetadata: {name: x}\n": "no kind 'Gadget' in v1",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: bad}\nspec: {replicas: 1}\n": "spec.selector: Required value",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: kube-system}\n": "asks for namespace 'kube-system'",
        "": "is empty",
    }
    for manifest, message in cases.items():
        with pytest.raises(labkit.LabkitError, match=message):
            lab.apply(manifest)
    with pytest.raises(labkit.LabkitError, match="There is no deployment/ghost"):
        lab.wait_ready("deployment/ghost")


def test_a_deleted_namespace_is_explained_and_starting_again_recovers(lab: Lab, cluster: Sandbox) -> None:
    lab.kubectl(["delete", "namespace", lab.namespace, "--wait=false"], check=True)
    with pytest.raises(labkit.LabkitError, match="has been deleted") as gone:
        lab.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert "start_lab" in gone.value.hint
    again = labkit.start_lab(lab.id)
    assert again.namespace != lab.namespace
    again.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    again.close(quiet=True)


def test_an_interrupted_wait_says_what_happened_and_the_next_call_works(lab: Lab) -> None:
    lab.apply(WEB.replace("IMAGE", "3.0"))  # never ready: the wait would go on
    # The stop button is a SIGINT, as a kernel gets it (a shell may have started this process ignoring it).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main = threading.get_ident()
        threading.Timer(1.5, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
        with pytest.raises(labkit.LabkitError, match="Interrupted while waiting for deployment/web") as stopped:
            lab.wait_ready("deployment/web", timeout=60)
    finally:
        signal.signal(signal.SIGINT, before)
    assert "wait_ready" in stopped.value.hint
    lab.apply(WEB.replace("IMAGE", "1.0"))
    lab.wait_ready("deployment/web", timeout=60)


def test_the_live_view_follows_pods_and_nodes(lab: Lab) -> None:
    view = LiveView(lab)
    lab.apply(WEB.replace("IMAGE", "1.0"))
    eventually(lambda: "web-" in view.widget.value and "1/1" in view.widget.value and "node-1" in view.widget.value,
               timeout=60, what="the ready pod in the view")  # fmt: skip
    lab.delete("deployment/web")
    eventually(lambda: "no pods yet" in view.widget.value, timeout=60, what="the pod to leave the view")
    view.stop()


def test_answers_are_checked_with_feedback() -> None:
    # A notebook's answers are its globals: the check reads them from the caller's module.
    globals().update(placement="Scheduler ", wrong=4, unanswered=...)
    checks.answer("placement", "kube-scheduler", also=("scheduler",))
    for name in ("not_set", "unanswered"):
        with pytest.raises(CheckFailed, match="has no answer yet"):
            checks.answer(name, 3)
    with pytest.raises(CheckFailed, match="`wrong` is 4, which is not right.\nHint: count again"):
        checks.answer("wrong", 3, hint="count again")


def test_without_a_cluster_setting_a_named_sandbox_is_used(cluster: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("LABKIT_CLUSTER", f"sandbox:{cluster.name}")
    lab = labkit.start_lab("sandbox-choice", fresh=True)
    assert lab.cluster.sandbox == cluster.name and f"local sandbox {cluster.name!r}" in lab.cluster.description
    lab.close(quiet=True)
    monkeypatch.setenv("LABKIT_CLUSTER", "the-moon")
    with pytest.raises(labkit.LabkitError, match="not a way to find a cluster"):
        labkit.start_lab("sandbox-choice", fresh=True)


def test_a_trainee_account_works_in_its_own_namespace_with_a_token_or_a_plugin(
        cluster: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # fmt: skip
    # As on JupyterHub: a service account that may do anything in its namespace and nothing else.
    kubectl(cluster, "create", "namespace", "trainee-ann")
    kubectl(cluster, "-n", "trainee-ann", "create", "serviceaccount", "ann")
    kubectl(cluster, "-n", "trainee-ann", "create", "rolebinding", "ann", "--clusterrole=admin",
            "--serviceaccount=trainee-ann:ann")  # fmt: skip
    token = kubectl(cluster, "-n", "trainee-ann", "create", "token", "ann").stdout.strip()
    admin = yaml.safe_load(cluster.state.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    plugin = tmp_path / "login.sh"
    plugin.write_text("#!/bin/sh\necho '" + json.dumps({"apiVersion": "client.authentication.k8s.io/v1",
                      "kind": "ExecCredential", "status": {"token": token}}) + "'\n")  # fmt: skip
    plugin.chmod(0o755)
    (tmp_path / "token").write_text(token)
    users = {"token": {"token": token}, "token-file": {"tokenFile": "token"},
             "plugin": {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "./login.sh",
                                "interactiveMode": "Never"}}}
    for way, user in users.items():
        kubeconfig = tmp_path / f"{way}.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "class",
            "clusters": [{"name": "class", "cluster": server}], "users": [{"name": "ann", "user": user}],
            "contexts": [{"name": "class", "context": {"cluster": "class", "user": "ann", "namespace": "trainee-ann"}}],
        }))  # fmt: skip
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("LABKIT_CLUSTER", "kubeconfig")
        lab = labkit.start_lab(f"shared-{way}", fresh=True)
        assert lab.shared and lab.namespace == "trainee-ann", way
        lab.apply(f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: notes-{way}}}\ndata: {{a: b}}\n")
        assert "notes-" + way in lab.kubectl("get configmaps -o name", show=False)
        with pytest.raises(labkit.LabkitError, match="forbidden"):
            lab.nodes()  # the account may not see the cluster's nodes
        lab.close(quiet=True)
        names = [c["metadata"]["name"] for c in kubectl_json(cluster, "-n", "trainee-ann", "get", "configmaps")["items"]]
        assert f"notes-{way}" not in names, f"{way}: closing the lab leaves what it made"
        assert "kube-root-ca.crt" in names  # and nothing else of the namespace's goes


def test_the_official_client_works_with_the_labs_credentials_in_its_namespace(lab: Lab) -> None:
    from kubernetes import client

    api = lab.api_client()
    assert lab.api_client() is api
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    before = len(lab.actions)
    apps.create_namespaced_deployment(lab.namespace, yaml.safe_load(WEB.replace("IMAGE", "1.0")))
    assert len(lab.actions) == before + 1, "a change through the client is the trainee's action"
    lab.wait_ready("deployment/web")
    assert apps.read_namespaced_deployment("web", lab.namespace).status.ready_replicas == 1
    pods = core.list_namespaced_pod(lab.namespace, label_selector="app=web").items
    assert [p.metadata.name for p in pods] == [p["metadata"]["name"] for p in lab.pods("app=web")]
    assert len(lab.actions) == before + 1, "reading is not an action"
    with pytest.raises(client.ApiException) as refused:
        core.read_namespaced_config_map("missing", lab.namespace)
    assert refused.value.status == 404


def test_events_are_in_the_order_they_first_happened() -> None:
    from labkit.lab.events import _repeats, in_time_order

    def event(rv: int, reason: str, first: str | None = None, micro: str | None = None, **extra: object) -> dict:
        return {"metadata": {"resourceVersion": str(rv)}, "reason": reason, "firstTimestamp": first,
                "eventTime": micro, **extra}  # fmt: skip

    # As a sandbox stored them: the controller manager posts its Events after the scheduler has placed the pod.
    stored = [event(305, "ScalingReplicaSet", "2026-12-03T11:54:31Z"),
              event(319, "Scheduled", micro="2026-12-03T11:54:31.932255Z"),
              event(321, "SuccessfulCreate", "2026-12-03T11:54:31Z"),
              event(325, "Pulled", "2026-12-03T11:54:31Z"),
              event(334, "Unhealthy", "2026-12-03T11:54:32Z", lastTimestamp="2026-12-03T11:54:44Z", count=5),
              event(330, "Started", "2026-12-03T11:54:32Z")]  # fmt: skip
    assert [e["reason"] for e in in_time_order(stored)] == ["ScalingReplicaSet", "SuccessfulCreate", "Scheduled",
                                                             "Pulled", "Started", "Unhealthy"]  # fmt: skip
    assert _repeats(stored[4]) == " (x5 over 12s)" and _repeats(stored[0]) == ""
