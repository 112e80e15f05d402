"""The training apps as real processes, and the catalog entries that run them in the sandbox.

No sandbox is needed: the web app runs on a free port of this machine, and the
catalog is checked by resolving references.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from labkit.apps import loadgen
from labkit.sandbox import binaries
from labkit.sandbox.node import images
from labkit.sandbox.versions import pins

MIB = 1 << 20


class WebProcess:
    """``python3 -m labkit.apps.web`` on a port of its own choosing, with its log collected."""

    def __init__(self, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "labkit.apps.web"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PORT": "0", "HOSTNAME": "web-7d4b9-x2x4q", **env},
        )  # fmt: skip
        self.lines: list[str] = []
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._started.wait(10), f"web did not start: {self.lines}"
        match = re.search(r"web (\S+) listening on :(\d+)$", self.lines[0])
        assert match, self.lines
        self.port = int(match.group(2))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._started.set()
        self._started.set()

    def request(self, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read().decode(), dict(response.getheaders())
        finally:
            connection.close()

    def get(self, path: str) -> tuple[int, str]:
        status, body, _ = self.request(path)
        return status, body

    def wait(self, timeout: float = 10) -> int:
        """The exit code, once the process has ended and all its output is read."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def logged(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_web():
    started: list[WebProcess] = []

    def start(**env: str) -> WebProcess:
        started.append(WebProcess(**env))
        return started[-1]

    yield start
    for web in started:
        web.stop()


def resident_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def eventually(check, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format: every sample line is ``name{labels} value``; comments are HELP/TYPE."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* \S", line), line
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{(?:[a-zA-Z_]\w*="[^"]*",?)*\})?) (\S+)', line)
        assert match, f"not a sample line: {line!r}"
        samples[match.group(1)] = float(match.group(2))
    return samples


# --------------------------------------------------------------------------- web

def test_greeting_and_versions(start_web) -> None:
    web = start_web(APP_VERSION="2.0", MESSAGE="hello, class")
    status, body = web.get("/")
    assert status == 200 and body == "Hello from web 2.0 on web-7d4b9-x2x4q: hello, class\n"
    status, body, headers = web.request("/", headers={"Accept": "application/json"})
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"app": "web", "version": "2.0", "hostname": "web-7d4b9-x2x4q",
                                "message": "hello, class"}  # fmt: skip
    assert web.get("/version") == (200, "2.0\n")
    assert web.lines[0].endswith(f"web 2.0 listening on :{web.port}")
    eventually(lambda: web.logged(" GET /version 200 "))  # one log line a request
    default = start_web()
    assert default.get("/version") == (200, "1.0\n")


def test_release_3_is_never_ready(start_web) -> None:
    web = start_web(APP_VERSION="3.0")
    assert web.get("/healthz") == (200, "ok\n")
    status, body = web.get("/readyz")
    assert status == 503 and "release 3.0 is broken" in body


def test_readiness_delay_and_forced_failure(start_web) -> None:
    delayed = start_web(READY_DELAY="0.5")
    status, body = delayed.get("/readyz")
    assert status == 503 and "starting" in body
    eventually(lambda: delayed.get("/readyz") == (200, "ready\n"))
    forced = start_web(FAIL_READY="1")
    assert forced.get("/readyz")[0] == 503


def test_config_shows_a_configmap_volume_and_env(start_web, tmp_path: Path) -> None:
    # The layout the kubelet's atomic writer gives a ConfigMap volume: keys link into ..data.
    version = tmp_path / "..2026_01_01_00_00_00.000000001"
    version.mkdir()
    (version / "color").write_text("blue")
    (version / "app.properties").write_text("greeting=hi\n")
    (tmp_path / "..data").symlink_to(version.name)
    for key in ("color", "app.properties"):
        (tmp_path / key).symlink_to(f"..data/{key}")
    web = start_web(CONFIG_DIR=str(tmp_path), COLOR="green", KUBERNETES_SERVICE_HOST="10.96.0.1",
                    WEB_PORT="tcp://10.96.0.7:80")  # fmt: skip
    status, body = web.get("/config")
    shown = json.loads(body)
    assert status == 200 and shown["files"] == {"app.properties": "greeting=hi\n", "color": "blue"}
    assert shown["env"]["COLOR"] == "green"
    assert not {"PATH", "KUBERNETES_SERVICE_HOST", "WEB_PORT"} & set(shown["env"])
    assert "PATH" in json.loads(web.get("/config?all=1")[1])["env"]
    missing = start_web(CONFIG_DIR=str(tmp_path / "absent"))
    assert "does not exist" in json.loads(missing.get("/config")[1])["note"]


def test_alloc_holds_touched_memory(start_web) -> None:
    web = start_web()
    before = resident_mib(web.proc.pid)
    status, body = web.get("/alloc?mb=64")
    assert status == 200 and json.loads(body)["held_mb"] == 64
    assert resident_mib(web.proc.pid) - before >= 60  # the pages were written, not just reserved
    assert web.get("/alloc?mb=lots")[0] == 400


def test_work_burns_cpu(start_web) -> None:
    web = start_web()
    before = cpu_seconds(web.proc.pid)
    assert web.get("/work?ms=300")[0] == 200
    assert cpu_seconds(web.proc.pid) - before >= 0.2


def test_unhealthy_then_crash(start_web) -> None:
    web = start_web()
    assert web.request("/unhealthy", method="POST")[0] == 200
    status, body = web.get("/healthz")
    assert status == 500 and "unhealthy" in body
    assert web.request("/crash", method="POST")[0] == 200  # answered before it exits
    assert web.wait() == 1


def test_sigterm_drains_in_flight_requests(start_web) -> None:
    web = start_web(SHUTDOWN_DELAY="0.3")
    in_flight: list[int] = []
    idle_cpu = cpu_seconds(web.proc.pid)
    slow = threading.Thread(target=lambda: in_flight.append(web.get("/work?ms=1000")[0]))
    slow.start()
    eventually(lambda: cpu_seconds(web.proc.pid) > idle_cpu + 0.05)  # the request is being served
    web.proc.send_signal(signal.SIGTERM)
    eventually(lambda: web.logged("received SIGTERM, draining"))
    status, body = web.get("/readyz")  # still serving during $SHUTDOWN_DELAY, but not ready
    assert status == 503 and "draining" in body
    assert web.wait() == 0
    slow.join(5)
    assert in_flight == [200]
    assert web.lines[-1].endswith("drained, exiting")


def test_metrics_parse(start_web) -> None:
    web = start_web(APP_VERSION="2.0")
    for _ in range(3):
        web.get("/")
    web.get("/nope")
    status, body, headers = web.request("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = parse_metrics(body)
    assert samples['http_requests_total{path="/",code="200"}'] == 3
    assert samples['http_requests_total{path="other",code="404"}'] == 1
    buckets = [value for name, value in samples.items() if name.startswith('http_request_duration_seconds_bucket{path="/",')]
    assert buckets == sorted(buckets) and buckets[-1] == samples['http_request_duration_seconds_count{path="/"}'] == 3
    assert samples['web_version_info{version="2.0"}'] == 1
    assert samples["process_resident_memory_bytes"] > 10 * MIB
    assert samples["web_ready"] == 1


# --------------------------------------------------------------------------- loadgen

def test_loadgen_library(start_web) -> None:
    web = start_web()
    result = loadgen.run(f"http://127.0.0.1:{web.port}/", duration=0.5, concurrency=2)
    assert result.requests > 10 and result.errors == 0 and result.outcomes == {"200": result.requests}
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    paced = loadgen.run(f"http://127.0.0.1:{web.port}/nope", rate=20, duration=1.0, concurrency=2)
    assert 15 <= paced.requests <= 21 and paced.errors == paced.requests  # 404s count as errors
    assert set(paced.as_dict()) >= {"requests", "errors", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms"}


def test_loadgen_command(start_web) -> None:
    web = start_web()
    run = subprocess.run([sys.executable, "-m", "labkit.apps.loadgen", f"http://127.0.0.1:{web.port}/healthz",
                          "--duration", "0.6", "--interval", "0.2", "--json"],
                         capture_output=True, text=True, timeout=20)  # fmt: skip
    assert run.returncode == 0, run.stderr
    *ticks, summary = run.stdout.strip().splitlines()
    assert len(ticks) >= 2 and all("requests" in tick for tick in ticks)
    assert json.loads(summary)["requests"] > 0
    bad = subprocess.run([sys.executable, "-m", "labkit.apps.loadgen", "web:8080"], capture_output=True, text=True)
    assert bad.returncode == 2 and "needs an http:// or https:// URL" in bad.stderr


# --------------------------------------------------------------------------- the image catalog

@pytest.mark.parametrize("reference", ["labkit/web:2.0", "ghcr.io/labkit/web:2.0", "localhost:5000/labkit/web:2.0",
                                       "registry.example.com/course/labkit/web:2.0@sha256:0123"])  # fmt: skip
def test_web_image_under_any_registry(reference: str) -> None:
    image = images.resolve(reference)
    assert image is not None and image.reference == reference
    assert image.argv(None, None) == ["python3", "-m", "labkit.apps.web"]
    assert image.argv(None, ["--x"]) == ["python3", "-m", "labkit.apps.web", "--x"]  # args follow the ENTRYPOINT
    assert dict(image.env)["APP_VERSION"] == "2.0" and image.image_id == "labkit.local/labkit/web@2.0"


@pytest.mark.parametrize("reference", ["labkit/web", "labkit/web:latest", "docker.io/labkit/web:1.0"])
def test_untagged_web_is_release_1(reference: str) -> None:
    assert dict(images.resolve(reference).env)["APP_VERSION"] == "1.0"


@pytest.mark.parametrize("reference", ["labkit/web:4.0", "labkit/web:v2.0", "labkit/web:2", "mylabkit/web:1.0",
                                       "labkit/webapp:1.0", "labkit/loadgen:9.9", "etcd:3.6.8", "bitnami/etcd:3.6"])  # fmt: skip
def test_unknown_images_and_tags_do_not_exist(reference: str) -> None:
    assert images.resolve(reference) is None


def test_app_image_runs_outside_the_virtualenv() -> None:
    """The image's PYTHONPATH alone makes the module importable: no site-packages (-S)."""
    image = images.resolve("ghcr.io/labkit/loadgen:3.0")
    env = dict(image.env)
    assert image.entrypoint == ("python3", "-m", "labkit.apps.loadgen") and image.cmd == ()
    assert env["PYTHONUNBUFFERED"] == "1" and env["APP_VERSION"] == "3.0"
    assert (Path(env["PYTHONPATH"]) / "labkit" / "apps" / "loadgen.py").is_file()
    python = images.executable("python3")
    run = subprocess.run([python, "-S", *image.entrypoint[1:], "--help"], env={"PATH": "/usr/bin:/bin", **env},
                         cwd="/", capture_output=True, text=True, timeout=20)  # fmt: skip
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr


def test_base_images_keep_their_entries() -> None:
    shell = images.resolve("docker.io/library/busybox:1.36@sha256:abc")
    assert shell.argv(["sh", "-c", "true"], None) == ["sh", "-c", "true"] and shell.env == () and shell.path == ()
    assert images.resolve("python:3.12").argv(None, None) == ["python3"]
    assert images.repository("localhost:5000/Alpine:3") == "alpine"


@pytest.mark.parametrize("reference", ["registry.k8s.io/etcd:3.6.8-0", "quay.io/coreos/etcd:v3.5.0",
                                       "gcr.io/etcd-development/etcd:v3.6.8"])  # fmt: skip
def test_etcd_images_run_the_pinned_etcd(reference: str) -> None:
    etcd = pins().etcd
    image = images.resolve(reference)
    assert image.path == (str(binaries.group_dir(etcd)),)
    assert image.image_id == f"labkit.local/etcd@{etcd.version}"
    if binaries.cached(etcd) is None:
        pytest.skip("the sandbox binaries are not installed")
    program = images.executable("etcd", os.pathsep.join([*image.path, "/usr/bin:/bin"]))
    assert program == str(binaries.group_dir(etcd) / "etcd")
    out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=20).stdout
    assert etcd.bare_version in out
