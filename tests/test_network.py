"""The pod network: addresses, Services, DNS, reaching a Service from the notebook, and injected faults.

Every check sends real TCP. Inside the cluster a small "probe" pod fetches URLs on
the tests' behalf (``/fetch?url=...``), so what it reports is what a pod sees;
from outside, the notebook's own client goes through ``lab.service_url``. The
module runs as root (``make test``) and, when ``make test`` runs as root, once more
as an ordinary user, whose sandbox builds the same network inside a user namespace.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from conftest import eventually, module_cluster, run_labkit

import labkit
from labkit.lab import Lab
from labkit.sandbox import procs
from labkit.sandbox.controlplane import Sandbox
from labkit.sandbox.node.faults import TUN_PREFIX
from labkit.sandbox.node.network import veth_name

cluster = module_cluster("network", nodes=3)

PROBE = r"""
import json, os, ssl, time, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount/"
def fetch(url, timeout):
    request, context = urllib.request.Request(url), None
    if url.startswith("https://"):  # the API server, as an in-cluster client reaches it
        context = ssl.create_default_context(cafile=ACCOUNT + "ca.crt")
        request.add_header("Authorization", "Bearer " + open(ACCOUNT + "token").read())
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            result = {"status": answer.status, "body": answer.read().decode(errors="replace")}
    except Exception as exc:
        result = {"status": 0, "error": f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"}
    result["seconds"] = time.monotonic() - started
    return result
class Probe(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        if url.path == "/fetch":
            body = json.dumps(fetch(query["url"], float(query.get("timeout", 3)))).encode()
        elif url.path == "/env":
            body = json.dumps(dict(os.environ)).encode()
        elif url.path == "/file":
            body = open(query["path"], "rb").read()
        else:  # /bytes?n=N
            body = b"x" * int(query.get("n", 0))
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
ThreadingHTTPServer(("0.0.0.0", 9000), Probe).serve_forever()
"""

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: labkit/web:1.0
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /readyz, port: 8080}, periodSeconds: 1, failureThreshold: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-nodeport}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30480}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nobody}
  ports: [{port: 80}]
"""


def probe_pod(name: str = "probe") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"role": name}},
            "spec": {"containers": [{"name": "probe", "image": "python:3.12", "command": ["python3", "-c", PROBE],
                                     "ports": [{"containerPort": 9000}],
                                     "readinessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 1}}]}}  # fmt: skip


@pytest.fixture(scope="module")
def lab(cluster: Sandbox) -> Lab:
    os.environ["KUBECONFIG"] = str(cluster.state.kubeconfig)
    os.environ["LABKIT_CLUSTER"] = "kubeconfig"
    lab = labkit.start_lab("network", fresh=True)
    lab.apply(MANIFEST)
    lab.apply([probe_pod("probe"), probe_pod("other")])
    lab.wait_ready("deployment/web", "pod/probe", "pod/other", timeout=90)
    ready_endpoints(lab, "web-headless", 2)  # the EndpointSlice controller follows the pods' readiness shortly after
    yield lab
    lab.close(quiet=True)


def ready_endpoints(lab: Lab, service: str, count: int) -> None:
    def ready() -> bool:
        slices = lab.request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{lab.namespace}/endpointslices",
                             query={"labelSelector": f"kubernetes.io/service-name={service}"})["items"]  # fmt: skip
        return sum(1 for s in slices for ep in s.get("endpoints") or [] if ep["conditions"].get("ready")) == count

    eventually(ready, timeout=30, what=f"{count} ready endpoints of {service}")
    time.sleep(0.3)  # and the service proxy and DNS learn of them


def fetch(lab: Lab, url: str, via: str = "probe", timeout: float = 3) -> dict:
    """``url`` fetched from inside pod ``via``: its status, body or error, and seconds."""
    query = urllib.parse.urlencode({"url": url, "timeout": timeout})
    return lab.http(f"pod/{via}", f"/fetch?{query}", port=9000, timeout=timeout + 10).json()


def test_pods_have_their_own_addresses_from_their_nodes_ranges(lab: Lab) -> None:
    nodes = {n["metadata"]["name"]: n["spec"]["podCIDR"] for n in lab.nodes()}
    for pod in lab.pods():
        address = pod["status"]["podIP"]
        assert pod["status"]["podIPs"] == [{"ip": address}]
        network = nodes[pod["spec"]["nodeName"]]
        assert address.rsplit(".", 1)[0] == network.split("/")[0].rsplit(".", 1)[0], (address, network)
    slices = lab.request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{lab.namespace}/endpointslices",
                         query={"labelSelector": "kubernetes.io/service-name=web"})["items"]  # fmt: skip
    listed = {a for s in slices for ep in s["endpoints"] for a in ep["addresses"]}
    assert listed == {p["status"]["podIP"] for p in lab.pods("app=web")}


def test_pods_reach_pods_and_services_by_address_and_by_name(lab: Lab) -> None:
    web = lab.pods("app=web")[0]["status"]["podIP"]
    service = lab.get("service/web")["spec"]["clusterIP"]
    node_ip = lab.nodes()[0]["spec"]["podCIDR"].split("/")[0].rsplit(".", 1)[0] + ".1"
    ns = lab.namespace
    urls = [f"http://{web}:8080/version", f"http://{service}/version", "http://web/version", f"http://web.{ns}/version",
            f"http://web.{ns}.svc.cluster.local/version", f"http://{node_ip}:30480/version",
            "http://web-headless:8080/version"]  # fmt: skip
    for url in urls:
        answer = fetch(lab, url)
        assert answer["status"] == 200 and answer["body"].strip() == "1.0", (url, answer)
    # In-cluster clients reach the API server through the kubernetes Service, with the pod's own token.
    api = fetch(lab, "https://kubernetes.default.svc/version")
    assert api["status"] == 200 and '"gitVersion"' in api["body"], api
    # The kubelet's Service variables, for the Services that existed when the container started.
    env = lab.http("pod/probe", "/env", port=9000).json()
    assert env["WEB_SERVICE_HOST"] == service and env["WEB_SERVICE_PORT"] == "80"
    assert env["WEB_PORT_80_TCP"] == f"tcp://{service}:80" and env["WEB_SERVICE_PORT_HTTP"] == "80"
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1" and "WEB_HEADLESS_SERVICE_HOST" not in env


def test_cluster_dns_answers_as_coredns_does(lab: Lab) -> None:
    code = ("import socket; print(sorted(socket.gethostbyname_ex('web-headless')[2]), socket.gethostbyname('web'), "
            "socket.gethostbyname('kube-dns.kube-system'))")  # fmt: skip
    lab.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "resolver"},
               "spec": {"restartPolicy": "Never", "containers": [{"name": "r", "image": "python:3.12",
                                                                   "command": ["python3", "-c", code]}]}})  # fmt: skip
    lab.wait_ready("pod/resolver", timeout=60)
    output = eventually(lambda: lab.kubectl("logs resolver", show=False).strip(), what="the resolver's output")
    addresses = sorted(p["status"]["podIP"] for p in lab.pods("app=web"))
    assert output == f"{addresses} {lab.get('service/web')['spec']['clusterIP']} 10.96.0.10"
    resolv = lab.http("pod/probe", "/file?path=/etc/resolv.conf", port=9000).text
    assert resolv.splitlines() == ["nameserver 10.96.0.10", f"search {lab.namespace}.svc.cluster.local svc.cluster.local "
                                   "cluster.local", "options ndots:5"]  # fmt: skip
    hosts = lab.http("pod/probe", "/file?path=/etc/hosts", port=9000).text
    assert f"{lab.get('pod/probe')['status']['podIP']}\tprobe" in hosts


def test_endpoint_slices_follow_readiness(lab: Lab) -> None:
    pods = lab.pods("app=web")
    out, kept = pods[0], pods[1]
    answer = fetch(lab, f"http://{out['status']['podIP']}:8080/unready")
    assert answer["status"] == 200
    try:
        def not_ready_in_slice() -> bool:
            slices = lab.request("GET", f"/apis/discovery.k8s.io/v1/namespaces/{lab.namespace}/endpointslices",
                                 query={"labelSelector": "kubernetes.io/service-name=web"})["items"]  # fmt: skip
            return any(out["status"]["podIP"] in ep["addresses"] and ep["conditions"].get("ready") is False
                       for s in slices for ep in s["endpoints"])  # fmt: skip

        eventually(not_ready_in_slice, timeout=30, what="the unready pod to be marked so in the EndpointSlice")
        time.sleep(0.5)  # the service proxy writes its rules
        served_by = {fetch(lab, "http://web/")["body"].split(" on ")[1].split(":")[0].strip() for _ in range(12)}
        assert served_by == {kept["metadata"]["name"]}
    finally:
        fetch(lab, f"http://{out['status']['podIP']}:8080/ready")
    lab.wait_ready("deployment/web")
    ready_endpoints(lab, "web", 2)


def test_what_cannot_answer_refuses_at_once(lab: Lab) -> None:
    for url in ("http://nobody/", f"http://{lab.pods('app=web')[0]['status']['podIP']}:9999/", "http://web:81/"):
        answer = fetch(lab, url)
        assert answer["status"] == 0 and "refused" in answer["error"].lower() and answer["seconds"] < 1, (url, answer)


def test_the_notebook_reaches_a_service_and_a_nodeport(lab: Lab) -> None:
    url = lab.service_url("web")
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url + "/version", timeout=5) as answer:
        assert answer.read().decode().strip() == "1.0"
    assert lab.service_url("web") == url  # one forward per Service port
    with urllib.request.urlopen("http://127.0.0.1:30480/version", timeout=5) as answer:
        assert answer.read().decode().strip() == "1.0"
    done = run_labkit("sandbox", "url", "web", "-n", lab.namespace, "--name", lab.cluster.sandbox or "network")
    assert done.returncode == 0 and done.stdout.strip().startswith("http://127.0.0.1:"), done.stderr


def _round_trips(url: str, count: int = 8) -> float:
    times = []
    for _ in range(count):
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
        times.append(time.monotonic() - started)
    return statistics.median(times)


def test_injected_latency_adds_to_round_trips_until_removed(lab: Lab) -> None:
    url = lab.service_url("web") + "/version"
    before = _round_trips(url)
    fault = lab.delay("deployment/web", 100, jitter=10)
    try:
        during = _round_trips(url)
    finally:
        fault.remove()
    time.sleep(0.3)  # packets held when it was removed are gone
    after = _round_trips(url)
    assert during - before >= 0.1, (before, during)
    assert after < before + 0.05, (before, after)


def pod_network_links(cluster: Sandbox) -> list[str]:
    """The names of the network devices in the sandbox's pod network (entered as the agent's user, rootless or not)."""
    pid = cluster.network_record()["pod_network_pid"]
    user = ["-U", "--preserve-credentials"] if procs.namespace(pid, "user") != procs.namespace(os.getpid(), "user") else []
    done = subprocess.run(["nsenter", "-t", str(pid), *user, "-n", "ip", "-o", "link"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [line.split(": ")[1].split("@")[0] for line in done.stdout.splitlines()]


def test_a_removed_fault_leaves_no_device_behind(lab: Lab, cluster: Sandbox) -> None:
    # The device goes when the agent closes its file; a file still held by a thread after removal would be read
    # from (and written to) under a number the agent has since given to something else, such as a socket.
    fault = lab.delay("deployment/web", 20)
    assert TUN_PREFIX + fault.id in pod_network_links(cluster)
    fault.remove()
    eventually(lambda: not [n for n in pod_network_links(cluster) if n.startswith(TUN_PREFIX)], timeout=1,
               what="the removed fault's device to go")  # fmt: skip
    url = lab.service_url("web") + "/version"
    for _ in range(20):  # new sockets take the freed file numbers: each still gets its own answer
        assert urllib.request.urlopen(url, timeout=5).read().decode().strip() == "1.0"


def test_loss_and_bandwidth_change_what_gets_through(lab: Lab) -> None:
    url = lab.service_url("web")
    fault = lab.loss("deployment/web", 100)
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/version", timeout=2).read()
    fault.remove()
    assert urllib.request.urlopen(url + "/version", timeout=5).read().decode().strip() == "1.0"
    probe = lab.get("pod/probe")["status"]["podIP"]
    big = f"http://{probe}:9000/bytes?n=250000"
    assert fetch(lab, big, via="other")["seconds"] < 1
    fault = lab.bandwidth("pod/probe", "1mbit")
    try:
        slow = fetch(lab, big, via="other", timeout=20)
    finally:
        fault.remove()
    # 250 kB at 1 Mbit/s is 2 s of sending (milliseconds without the limit); the bound leaves a margin
    assert slow["status"] == 200 and len(slow["body"]) == 250_000 and slow["seconds"] >= 1.5, slow["seconds"]
    assert fetch(lab, big, via="other")["seconds"] < 1


def test_a_partition_cuts_traffic_until_healed(lab: Lab) -> None:
    web = lab.pods("app=web")
    target = f"http://{web[0]['status']['podIP']}:8080/version"
    fault = lab.partition("pod/probe", "deployment/web")
    try:
        cut = fetch(lab, target, timeout=1.5)
        assert cut["status"] == 0 and "timed out" in cut["error"], cut
        assert fetch(lab, target, via="other")["status"] == 200  # the rest of the cluster still reaches it
    finally:
        fault.remove()
    assert fetch(lab, target)["status"] == 200
    one_way = lab.partition("pod/other", "pod/probe", both=False)  # other -> probe dropped, probe -> other fine
    try:
        assert fetch(lab, f"http://{lab.get('pod/probe')['status']['podIP']}:9000/", via="other", timeout=1.5)["status"] == 0
    finally:
        lab.heal()
    assert not lab.faults


def test_status_says_how_pods_are_networked(cluster: Sandbox) -> None:
    done = run_labkit("sandbox", "status", "--name", cluster.name)
    mode = "root" if os.geteuid() == 0 else "rootless"
    assert f"pod network: {mode}:" in done.stdout, done.stdout


def test_no_pod_veth_is_taken_for_a_fault_device() -> None:
    # The faults' untracked re-injection matches their TUN devices by name prefix; a pod's veth that matched it
    # would lose the replies of its NAT'd connections (Services, forwards) once any fault had been made.
    for first in "0123456789abcdef":
        assert not veth_name(first + "2345678-90ab-cdef-0123-456789abcdef").startswith(TUN_PREFIX)
