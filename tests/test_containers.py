"""What a container sees and how it is watched: configuration, volumes, probes, limits, hooks.

Each behaviour is checked as a trainee would observe it on a real cluster: the
pod's status, its Events, and what the container's own process printed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import eventually, kubectl, kubectl_json, module_cluster

from labkit.sandbox.controlplane import Sandbox
from labkit.kube.client import KubeAPI
from labkit.kube.errors import APIError
from labkit.sandbox.node.envvars import ConfigError
from labkit.sandbox.node.pods import AUTHORIZER_RETRIES, as_node
from labkit.sandbox.node.volumes import MountError, PodVolumes


cluster = module_cluster("containers", nodes=1)


def apply(cluster: Sandbox, ns: str, manifest: str) -> None:
    kubectl(cluster, "-n", ns, "apply", "-f", "-", input=manifest)


def pod(cluster: Sandbox, ns: str, name: str) -> dict:
    return kubectl_json(cluster, "-n", ns, "get", "pod", name)


def status_of(p: dict, container: str | None = None) -> dict:
    statuses = p["status"].get("containerStatuses", []) + p["status"].get("initContainerStatuses", [])
    return next((s for s in statuses if container is None or s["name"] == container), {})


def condition(p: dict, kind: str) -> str | None:
    return next((c["status"] for c in p["status"].get("conditions", []) if c["type"] == kind), None)


def output(cluster: Sandbox, ns: str, name: str, container: str | None = None) -> str:
    """Everything the container printed so far, all attempts (read from the node's log folder)."""
    folders = list((cluster.state.root / "pods").glob(f"*/{ns}_{name}_*/logs/{container or '*'}"))
    lines = [line.split(" ", 3)[3] for folder in folders for f in sorted(folder.glob("*.log"))
             for line in f.read_text(errors="replace").splitlines() if line.count(" ") >= 3]  # CRI: time stream tag text
    return "\n".join(lines)


def events(cluster: Sandbox, ns: str, reason: str) -> list[dict]:
    return [e for e in kubectl_json(cluster, "-n", ns, "get", "events")["items"] if e["reason"] == reason]


def test_configuration_reaches_the_process(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {GREETING: hello, LEVEL: debug, app.conf: "port=8080\\n"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: configured, labels: {tier: web}}
spec:
  containers:
  - name: app
    image: busybox
    command: [sh, -c]
    args:
    - |
      echo "greeting=$GREETING level=$APP_LEVEL password=$PASSWORD pod=$POD_NAME ns=$POD_NAMESPACE node=$NODE"
      echo "mem=$MEM_MI cpu=$CPU_M expanded=$EXPANDED"
      echo "conf=$(cat /etc/app/app.conf) secret=$(cat /etc/creds/password) labels=$(cat /etc/podinfo/labels)"
      echo "hostname=$(hostname) cwd=$(pwd)"
      echo "token=$(test -s /var/run/secrets/kubernetes.io/serviceaccount/token && echo yes) sa-ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
      echo "ca=$(grep -c 'BEGIN CERTIFICATE' /var/run/secrets/kubernetes.io/serviceaccount/ca.crt)"
      sleep 3600
    workingDir: /srv/app
    envFrom:
    - configMapRef: {name: settings}
    - prefix: APP_
      configMapRef: {name: settings}
    env:
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
    - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    - {name: MEM_MI, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}
    - {name: CPU_M, valueFrom: {resourceFieldRef: {resource: requests.cpu, divisor: 1m}}}
    - {name: EXPANDED, value: "$(POD_NAME)-$(GREETING)"}
    resources: {requests: {cpu: 250m}, limits: {memory: 300Mi}}
    volumeMounts:
    - {name: conf, mountPath: /etc/app}
    - {name: creds, mountPath: /etc/creds, readOnly: true}
    - {name: podinfo, mountPath: /etc/podinfo}
  volumes:
  - {name: conf, configMap: {name: settings, items: [{key: app.conf, path: app.conf}]}}
  - {name: creds, secret: {secretName: creds}}
  - name: podinfo
    downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}
""")
    eventually(lambda: "ca=" in output(cluster, ns, "configured"), what="the container's output")
    text = output(cluster, ns, "configured")
    assert "greeting=hello level=debug password=s3cret pod=configured" in text
    assert f"ns={ns} node=node-1" in text
    assert "mem=300 cpu=250 expanded=configured-hello" in text
    assert 'conf=port=8080 secret=s3cret labels=tier="web"' in text
    assert "hostname=configured cwd=/srv/app" in text
    assert f"token=yes sa-ns={ns}" in text and "ca=1" in text


def test_volumes_follow_configmap_edits_and_emptydir_is_shared(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: ConfigMap
metadata: {name: live}
data: {mode: blue}
---
apiVersion: v1
kind: Pod
metadata: {name: watcher}
spec:
  containers:
  - name: writer
    image: busybox
    command: [sh, -c, "echo from-writer > /shared/note; sleep 3600"]
    volumeMounts: [{name: shared, mountPath: /shared}]
  - name: reader
    image: busybox
    env: [{name: MODE, valueFrom: {configMapKeyRef: {name: live, key: mode}}}]
    command: [sh, -c, "while true; do echo \\"file=$(cat /config/mode) env=$MODE note=$(cat /shared/note 2>/dev/null)\\"; sleep 0.5; done"]
    volumeMounts: [{name: config, mountPath: /config}, {name: shared, mountPath: /shared}]
  volumes:
  - {name: config, configMap: {name: live}}
  - {name: shared, emptyDir: {}}
""")
    eventually(lambda: "file=blue env=blue note=from-writer" in output(cluster, ns, "watcher", "reader"),
               what="the first reading")  # fmt: skip
    kubectl(cluster, "-n", ns, "patch", "configmap", "live", "-p", '{"data": {"mode": "green"}}')
    # The file changes (the kubelet re-syncs volumes); the environment never does.
    eventually(lambda: "file=green env=blue" in output(cluster, ns, "watcher", "reader"), timeout=40,
               what="the edited ConfigMap in the mounted file")  # fmt: skip


def test_containers_of_a_pod_share_localhost_and_hostname(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: pair}
spec:
  containers:
  - {name: web, image: "labkit/web:1.0"}
  - name: client
    image: python:3.12
    command: [python3, -c]
    args:
    - |
      import socket, time, urllib.request
      for _ in range(100):
          try:
              print("got", urllib.request.urlopen("http://localhost:8080/version").read().decode().strip(), flush=True)
              break
          except OSError:
              time.sleep(0.1)
      print("host", socket.gethostname(), flush=True)
      time.sleep(3600)
""")
    eventually(lambda: "host pair" in output(cluster, ns, "pair", "client"), what="the client's output")
    assert "got 1.0" in output(cluster, ns, "pair", "client")


def test_a_missing_configmap_holds_the_container_until_it_exists(cluster: Sandbox, ns: str) -> None:
    kubectl(cluster, "-n", ns, "run", "needs", "--image=busybox", "--overrides", json.dumps({"spec": {"containers": [{
        "name": "needs", "image": "busybox", "command": ["sh", "-c", "echo got=$KEY; sleep 3600"],
        "env": [{"name": "KEY", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "k"}}}]}]}}))
    waiting = eventually(lambda: status_of(pod(cluster, ns, "needs")).get("state", {}).get("waiting", {})
                         .get("reason") == "CreateContainerConfigError" and status_of(pod(cluster, ns, "needs")),
                         what="CreateContainerConfigError")  # fmt: skip
    assert 'configmap "later" not found' in waiting["state"]["waiting"]["message"]
    eventually(lambda: any('configmap "later" not found' in e["message"] for e in events(cluster, ns, "Failed")),
               what="a Failed event saying so")  # Events are posted in the background  # fmt: skip
    kubectl(cluster, "-n", ns, "create", "configmap", "later", "--from-literal=k=v")
    eventually(lambda: "got=v" in output(cluster, ns, "needs"), what="the container to start once it exists")


def test_readiness_probe_takes_a_pod_out_of_ready(cluster: Sandbox, ns: str) -> None:
    # Ready while /srv/ready exists; the container removes it after a few seconds.
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: flaky}
spec:
  containers:
  - name: web
    image: python:3.12
    command: [sh, -c, "mkdir -p /srv && cd /srv && touch ready && (sleep 6; rm ready) & cd /srv && exec python3 -m http.server 8080"]
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: 1, failureThreshold: 2}
""")
    eventually(lambda: condition(pod(cluster, ns, "flaky"), "Ready") == "True", what="Ready")
    p = eventually(lambda: condition(p := pod(cluster, ns, "flaky"), "Ready") == "False" and p, timeout=30,
                   what="not Ready once the probe fails")  # fmt: skip
    assert p["status"]["phase"] == "Running" and status_of(p)["restartCount"] == 0
    assert status_of(p)["ready"] is False and status_of(p)["started"] is True
    unhealthy = events(cluster, ns, "Unhealthy")
    assert any("Readiness probe failed: HTTP probe failed with statuscode: 404" in e["message"] for e in unhealthy)


def test_liveness_probe_restarts_a_container(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: stuck}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    command: [sleep, "3600"]
    livenessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1, failureThreshold: 2}
""")
    p = eventually(lambda: status_of(p := pod(cluster, ns, "stuck")).get("restartCount", 0) >= 1 and p,
                   timeout=30, what="a restart after the liveness probe fails")  # fmt: skip
    eventually(lambda: "Container app failed liveness probe, will be restarted"
               in [e["message"] for e in events(cluster, ns, "Killing")], what="a Killing event saying why")  # fmt: skip
    address = p["status"].get("podIP", "127.0.0.1")  # the kubelet probes the pod's own address
    assert any(f"Liveness probe failed: dial tcp {address}:9999: connect: connection refused" in e["message"]
               for e in events(cluster, ns, "Unhealthy"))  # fmt: skip
    assert status_of(p)["lastState"]["terminated"]["exitCode"] in (137, 143)


def test_startup_probe_holds_liveness_until_the_app_has_started(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: slow}
spec:
  containers:
  - name: app
    image: busybox
    command: [sh, -c, "sleep 3; touch /tmp/started; sleep 3600"]
    startupProbe: {exec: {command: [test, -f, /tmp/started]}, periodSeconds: 1, failureThreshold: 10}
    livenessProbe: {exec: {command: [test, -f, /tmp/started]}, periodSeconds: 1, failureThreshold: 1}
""")
    first = eventually(lambda: status_of(pod(cluster, ns, "slow")).get("state", {}).get("running") and
                       status_of(pod(cluster, ns, "slow")), what="running")  # fmt: skip
    assert first["started"] is False and first["ready"] is False
    p = eventually(lambda: status_of(p := pod(cluster, ns, "slow")).get("started") and p, timeout=30,
                   what="started once the startup probe passes")  # fmt: skip
    assert status_of(p)["ready"] is True and status_of(p)["restartCount"] == 0
    assert not any("Liveness" in e["message"] for e in events(cluster, ns, "Unhealthy"))


def test_memory_limit_is_an_oom_kill(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: hungry}
spec:
  restartPolicy: Never
  containers:
  - name: app
    image: python:3.12
    command: [python3, -c, "import time; chunks = [bytearray(16 * 2**20) for _ in range(40)]; time.sleep(60)"]
    resources: {limits: {memory: 100Mi}}
""")
    p = eventually(lambda: (p := pod(cluster, ns, "hungry"))["status"].get("phase") == "Failed" and p, timeout=30,
                   what="the pod to fail")  # fmt: skip
    terminated = status_of(p)["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137


def test_graceful_termination_runs_prestop_then_sigterm(cluster: Sandbox, ns: str, tmp_path: Path) -> None:
    record = tmp_path / "order"
    tmp_path.chmod(0o777)
    apply(cluster, ns, f"""
apiVersion: v1
kind: Pod
metadata: {{name: polite}}
spec:
  terminationGracePeriodSeconds: 20
  containers:
  - name: app
    image: busybox
    command: [sh, -c, "trap 'echo sigterm >> /record/order; exit 0' TERM; echo started >> /record/order; while true; do sleep 0.1; done"]
    lifecycle:
      preStop: {{exec: {{command: [sh, -c, "echo prestop >> /record/order"]}}}}
    volumeMounts: [{{name: record, mountPath: /record}}]
  - name: stubborn
    image: busybox
    command: [sh, -c, "trap '' TERM; while true; do sleep 0.1; done"]
  volumes:
  - {{name: record, hostPath: {{path: "{tmp_path}", type: Directory}}}}
""")
    eventually(lambda: record.exists() and "started" in record.read_text(), what="the container to start")
    kubectl(cluster, "-n", ns, "delete", "pod", "polite", "--grace-period=3", "--timeout=60s")
    assert record.read_text().split() == ["started", "prestop", "sigterm"]
    killing = {e["involvedObject"].get("fieldPath") for e in events(cluster, ns, "Killing")}
    assert killing == {"spec.containers{app}", "spec.containers{stubborn}"}


def test_init_containers_run_in_order_before_the_app(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: staged}
spec:
  initContainers:
  - {name: first, image: busybox, command: [sh, -c, "echo one > /work/steps"], volumeMounts: [{name: work, mountPath: /work}]}
  - {name: second, image: busybox, command: [sh, -c, "sleep 1; echo two >> /work/steps"], volumeMounts: [{name: work, mountPath: /work}]}
  containers:
  - {name: app, image: busybox, command: [sh, -c, "cat /work/steps; sleep 3600"], volumeMounts: [{name: work, mountPath: /work}]}
  volumes: [{name: work, emptyDir: {}}]
""")
    seen = set()
    eventually(lambda: seen.add(kubectl(cluster, "-n", ns, "get", "pod", "staged", "--no-headers").stdout.split()[2])
               or "Running" in seen, what="Running")  # fmt: skip
    assert "Init:1/2" in seen or "Init:0/2" in seen or "PodInitializing" in seen
    eventually(lambda: output(cluster, ns, "staged", "app").split() == ["one", "two"], what="the app's output")
    p = pod(cluster, ns, "staged")
    assert [s["state"]["terminated"]["reason"] for s in p["status"]["initContainerStatuses"]] == ["Completed"] * 2
    assert condition(p, "Initialized") == "True"


def test_a_failing_init_container_fails_a_never_restarting_pod(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: blocked}
spec:
  restartPolicy: Never
  initContainers: [{name: check, image: busybox, command: [sh, -c, "echo no database; exit 2"]}]
  containers: [{name: app, image: busybox, command: [sleep, "3600"]}]
""")
    eventually(lambda: pod(cluster, ns, "blocked")["status"].get("phase") == "Failed", what="phase Failed")
    listed = kubectl(cluster, "-n", ns, "get", "pod", "blocked", "--no-headers").stdout.split()
    assert listed[2] == "Init:Error"
    eventually(lambda: output(cluster, ns, "blocked", "check").strip() == "no database", what="the init's output")


def test_an_unsupported_volume_fails_to_mount_and_waits(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: remote}
spec:
  containers: [{name: app, image: busybox, command: [sleep, "3600"], volumeMounts: [{name: data, mountPath: /data}]}]
  volumes: [{name: data, nfs: {server: nfs.example.com, path: /exports}}]
""")
    failed = eventually(lambda: events(cluster, ns, "FailedMount"), what="a FailedMount event")
    assert "cannot mount nfs volumes" in failed[0]["message"] and failed[0]["type"] == "Warning"
    time.sleep(1)
    p = pod(cluster, ns, "remote")
    assert p["status"]["phase"] == "Pending"
    assert status_of(p)["state"]["waiting"]["reason"] == "ContainerCreating"


def test_a_request_the_node_authorizer_refuses_is_asked_again_then_fails_saying_why(
        cluster: Sandbox, ns: str, tmp_path: Path) -> None:  # fmt: skip
    # The API server's node authorizer refuses a node the ConfigMaps, Secrets and tokens of a pod it does not
    # run: as it does for a moment after a pod is bound, before its graph has the binding. The agent asks
    # again a few times; a refusal that stays fails the mount (retried later) with the API server's reason.
    apply(cluster, ns, """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: blue}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere}
spec:
  containers: [{name: app, image: busybox, command: [sleep, "3600"], volumeMounts: [{name: s, mountPath: /s}]}]
  volumes: [{name: s, configMap: {name: settings}}]
""")
    p = eventually(lambda: pod(cluster, ns, "elsewhere").get("spec", {}).get("nodeName") and pod(cluster, ns, "elsewhere"),
                   what="the pod to be bound")  # fmt: skip
    pki = cluster.state.pki
    stem = pki.ensure_node("node-elsewhere")
    api = KubeAPI(cluster.server(cluster.state.load()), pki.cert("ca"), pki.cert(stem), pki.key(stem))
    asked = []

    def get(path: str) -> dict | None:
        asked.append(path)
        return api.get(path)

    def read(kind: str, name: str) -> dict | None:
        try:
            return as_node(lambda: get(f"/api/v1/namespaces/{ns}/{kind}/{name}"))
        except APIError as exc:
            raise ConfigError(f"couldn't get {kind[:-1]} {ns}/{name}: {exc}") from exc

    volumes = PodVolumes(p, tmp_path, read, lambda *_: {}, {})
    with pytest.raises(MountError, match=f'couldn\'t get configmap {ns}/settings: configmaps "settings" is forbidden') as failed:
        volumes.setup()
    assert "no relationship found between node 'node-elsewhere'" in str(failed.value)
    assert asked == [f"/api/v1/namespaces/{ns}/configmaps/settings"] * (AUTHORIZER_RETRIES + 1)
    eventually(lambda: condition(pod(cluster, ns, "elsewhere"), "Ready") == "True", what="the pod Ready on its own node")


def test_node_reports_each_containers_cpu_and_memory(cluster: Sandbox, ns: str) -> None:
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: busy}
spec:
  containers:
  - name: app
    image: python:3.12
    command: [python3, -c, "block = bytearray(64 * 2**20); end = __import__('time').time() + 3600\\nwhile True: sum(range(10000))"]
""")
    eventually(lambda: pod(cluster, ns, "busy")["status"].get("phase") == "Running", what="Running")

    # Straight to the node's kubelet API with the admin's certificate: the API server's node proxy
    # refuses loopback addresses, which is what the sandbox's nodes have until they get their own.
    port = kubectl_json(cluster, "get", "node", "node-1")["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]

    def sample(name: str) -> float | None:
        text = kubectl(cluster, f"--server=https://127.0.0.1:{port}", "get", "--raw", "/metrics/resource").stdout
        for line in text.splitlines():
            if line.startswith(name + "{") and f'namespace="{ns}"' in line and 'pod="busy"' in line:
                return float(line.split()[1])
        return None

    memory = eventually(lambda: (m := sample("container_memory_working_set_bytes")) and m > 64 * 2**20 and m,
                        what="the container's memory in the node's resource metrics")  # fmt: skip
    assert memory < 512 * 2**20
    first = eventually(lambda: sample("container_cpu_usage_seconds_total"), what="CPU use")
    eventually(lambda: (sample("container_cpu_usage_seconds_total") or 0) > first + 0.5, what="CPU use to grow")
    assert (sample("pod_memory_working_set_bytes") or 0) >= memory * 0.9


def test_cpu_requests_weigh_containers_as_cpu_shares_do(cluster: Sandbox, ns: str) -> None:
    # What each container's process sees of its own CPU weight (its nice level): the kubelet's
    # cpu.shares are 2 without a request and 1024 a CPU, below the node's own daemons.
    apply(cluster, ns, """
apiVersion: v1
kind: Pod
metadata: {name: weighed}
spec:
  containers:
  - {name: none, image: busybox, command: [sh, -c, "echo nice=$(cut -d' ' -f19 /proc/self/stat); sleep 3600"]}
  - name: half
    image: busybox
    command: [sh, -c, "echo nice=$(cut -d' ' -f19 /proc/self/stat); sleep 3600"]
    resources: {requests: {cpu: 500m}}
  - name: whole
    image: busybox
    command: [sh, -c, "echo nice=$(cut -d' ' -f19 /proc/self/stat); sleep 3600"]
    resources: {requests: {cpu: "1"}, limits: {cpu: "2"}}
""")
    for container, nice in (("none", 19), ("half", 3), ("whole", 0)):
        eventually(lambda: f"nice={nice}" in output(cluster, ns, "weighed", container),
                   what=f"container {container} to run at nice {nice}")  # fmt: skip
