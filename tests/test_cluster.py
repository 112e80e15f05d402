"""The shared sandbox behaves as a real Kubernetes control plane."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import eventually, kubectl, kubectl_json, run_labkit

from labkit.sandbox.controlplane import Sandbox


def test_readyz_through_kubectl(sandbox: Sandbox) -> None:
    assert kubectl(sandbox, "get", "--raw", "/readyz").stdout.strip() == "ok"
    version = kubectl_json(sandbox, "version")
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"


def test_deployment_gets_replicaset_and_pending_pods(sandbox: Sandbox, namespace: str) -> None:
    kubectl(sandbox, "-n", namespace, "create", "configmap", "web-config", "--from-literal=GREETING=hello")
    assert kubectl_json(sandbox, "-n", namespace, "get", "configmap", "web-config")["data"] == {"GREETING": "hello"}
    kubectl(sandbox, "-n", namespace, "create", "deployment", "web", "--image=nginx:1.27", "--replicas=3")

    replicasets = eventually(
        lambda: kubectl_json(sandbox, "-n", namespace, "get", "replicasets")["items"], what="a ReplicaSet"
    )
    assert replicasets[0]["metadata"]["ownerReferences"][0]["name"] == "web"
    pods = eventually(
        lambda: (items := kubectl_json(sandbox, "-n", namespace, "get", "pods")["items"]) and len(items) == 3 and items,
        what="3 pods",
    )
    # No nodes exist yet, so the scheduler leaves them Pending and says why.
    assert {p["status"]["phase"] for p in pods} == {"Pending"}
    reasons = eventually(
        lambda: [c.get("reason") for p in kubectl_json(sandbox, "-n", namespace, "get", "pods")["items"]
                 for c in p["status"].get("conditions", []) if c["type"] == "PodScheduled"],
        what="PodScheduled conditions",
    )  # fmt: skip
    assert set(reasons) == {"Unschedulable"}


def test_serviceaccount_role_is_scoped_to_its_namespace(sandbox: Sandbox, namespace: str, tmp_path: Path) -> None:
    other = namespace + "-other"
    kubectl(sandbox, "create", "namespace", other)
    try:
        kubectl(sandbox, "-n", namespace, "create", "serviceaccount", "robot")
        kubectl(sandbox, "-n", namespace, "create", "role", "config-editor",
                "--verb=get,list,create", "--resource=configmaps")  # fmt: skip
        kubectl(sandbox, "-n", namespace, "create", "rolebinding", "robot-edits-config",
                "--role=config-editor", f"--serviceaccount={namespace}:robot")  # fmt: skip
        # A token from the TokenRequest API, as a pod's projected token would be.
        token = kubectl(sandbox, "-n", namespace, "create", "token", "robot", "--duration=10m").stdout.strip()
        assert token.count(".") == 2  # a JWT

        empty = tmp_path / "empty-kubeconfig"
        empty.write_text("apiVersion: v1\nkind: Config\n")
        as_robot = [
            f"--server={sandbox.server(sandbox.state.load())}",
            f"--certificate-authority={sandbox.state.pki.cert('ca')}",
            f"--token={token}",
        ]
        env = {"KUBECONFIG": str(empty)}
        created = kubectl(sandbox, *as_robot, "-n", namespace, "create", "configmap", "made-by-robot", env=env)
        assert "created" in created.stdout
        kubectl(sandbox, *as_robot, "-n", namespace, "get", "configmaps", env=env)

        denied = kubectl(sandbox, *as_robot, "-n", other, "get", "configmaps", env=env, check=False)
        assert denied.returncode != 0
        assert "forbidden" in denied.stderr.lower()
        assert f"system:serviceaccount:{namespace}:robot" in denied.stderr
        cannot = kubectl(sandbox, *as_robot, "-n", namespace, "delete", "configmap", "made-by-robot",
                         env=env, check=False)  # fmt: skip
        assert cannot.returncode != 0 and "forbidden" in cannot.stderr.lower()
    finally:
        kubectl(sandbox, "delete", "namespace", other, "--wait=false", check=False)


def test_up_on_a_running_sandbox_is_a_no_op(sandbox: Sandbox) -> None:
    before = sandbox.state.supervisor_pid()
    result = run_labkit("sandbox", "up", "--name", sandbox.name)
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stderr
    assert sandbox.state.supervisor_pid() == before


def test_env_points_plain_kubectl_at_the_sandbox(sandbox: Sandbox) -> None:
    venv_bin = Path(sys.executable).parent  # where `labkit` is installed; it holds no kubectl
    assert (venv_bin / "labkit").exists() and not (venv_bin / "kubectl").exists()
    script = f'eval "$(labkit sandbox env --name {sandbox.name})" && command -v kubectl && kubectl get --raw /readyz'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{venv_bin}:/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    where, answer = result.stdout.split()
    assert where.endswith("/kubernetes-v1.36.3/kubectl")
    assert answer == "ok"


def test_kubeconfig_command_prints_a_working_kubeconfig(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run_labkit("sandbox", "kubeconfig", "--name", sandbox.name)
    assert result.returncode == 0, result.stderr
    copy = tmp_path / "config"
    copy.write_text(result.stdout)
    assert kubectl(sandbox, "get", "--raw", "/livez", env={"KUBECONFIG": str(copy)}).stdout.strip() == "ok"


def test_status_shows_components_ports_uptime_memory(sandbox: Sandbox) -> None:
    info = json.loads(run_labkit("sandbox", "status", "--name", sandbox.name, "--json").stdout)
    assert info["running"]
    components = {c["name"]: c for c in info["components"]}
    assert set(components) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
    for c in components.values():
        assert c["state"] == "running" and c["healthy"] is True
        assert c["pid"] and c["port"] and c["uptime"] > 0 and c["memory"] > 1 << 20
    assert len(set(info["ports"].values())) == len(info["ports"])
    text = run_labkit("sandbox", "status", "--name", sandbox.name).stdout
    assert "kube-apiserver" in text and "MiB" in text and "running" in text


def test_logs_command_prints_a_component_log(sandbox: Sandbox) -> None:
    result = run_labkit("sandbox", "logs", "apiserver", "--name", sandbox.name, "--tail", "50")
    assert result.returncode == 0
    assert "starting kube-apiserver" in run_labkit("sandbox", "logs", "kube-apiserver", "--name", sandbox.name).stdout
    unknown = run_labkit("sandbox", "logs", "kubelet", "--name", sandbox.name)
    assert unknown.returncode == 1 and "No component called 'kubelet'" in unknown.stderr


def test_killed_apiserver_is_restarted_and_status_shows_it(sandbox: Sandbox) -> None:
    def apiserver() -> dict:
        info = json.loads(run_labkit("sandbox", "status", "--name", sandbox.name, "--json").stdout)
        return {c["name"]: c for c in info["components"]}["kube-apiserver"]

    before = apiserver()
    os.kill(before["pid"], signal.SIGKILL)
    after = eventually(
        lambda: (a := apiserver())["pid"] not in (None, before["pid"]) and a["healthy"] and a,
        timeout=90, what="the API server to come back",
    )  # fmt: skip
    assert after["restarts"] == before["restarts"] + 1
    assert after["last_exit"].startswith("signal SIGKILL")
    assert kubectl(sandbox, "get", "--raw", "/readyz").stdout.strip() == "ok"
    assert "SIGKILL" in run_labkit("sandbox", "status", "--name", sandbox.name).stdout
