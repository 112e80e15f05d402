"""The training applications: small services the labs deploy, scale, roll out, probe and break.

* ``labkit.apps.web``: an HTTP service with health and readiness endpoints, a
  mounted-configuration view, CPU and memory burners, fault switches and
  Prometheus metrics.
* ``labkit.apps.loadgen``: an HTTP load generator that reports latency
  percentiles, as a command and as a function notebooks call; its task mode
  drives the platform and counts what was completed, failed and lost.
* ``labkit.apps.platform``: a small distributed task-processing system (api,
  queue, worker, store) that later labs deploy, break on purpose and measure;
  its Kubernetes manifests are ``manifests/platform.yaml`` (see ``manifest``).

All use the standard library only, so they run unchanged as local processes in
the sandbox (via the image catalog, ``labkit.sandbox.node.images``) and in the
``python:3.12-slim`` images built from ``labkit/apps/docker/`` for real clusters.

The images exist at a few releases, like a real product's registry: the release
is the image tag. Each app has its own published releases (``APP_RELEASES``):
web's bad release is the one the rollout lab rolls back, the platform's
defective releases are the ones failure and incident labs investigate.
"""

from __future__ import annotations

RELEASES = ("1.0", "2.0", "3.0")  # the tags web and loadgen are published under
DEFAULT_RELEASE = "1.0"  # what `latest` and an untagged reference mean, for every app
BAD_RELEASE = "3.0"  # web's: never becomes ready, the release the rollout lab rolls back
# The platform's: 1.0 is correct; each later one carries a documented defect (labkit.apps.platform).
PLATFORM_RELEASES = ("1.0", "1.1", "1.2", "1.3", "1.4")
APP_RELEASES: dict[str, tuple[str, ...]] = {"web": RELEASES, "loadgen": RELEASES, "platform": PLATFORM_RELEASES}


def manifest(name: str) -> str:
    """The text of ``labkit/apps/manifests/NAME.yaml`` (``"platform"``), from an installed labkit too."""
    from importlib.resources import files

    resource = files(__name__) / "manifests" / f"{name}.yaml"
    if not resource.is_file():
        raise FileNotFoundError(f"labkit has no manifest {name!r} (labkit/apps/manifests/{name}.yaml)")
    return resource.read_text(encoding="utf-8")
