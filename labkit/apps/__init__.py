"""The training applications: small services the labs deploy, scale, roll out, probe and break.

* ``labkit.apps.web``: an HTTP service with health and readiness endpoints, a
  mounted-configuration view, CPU and memory burners, fault switches and
  Prometheus metrics.
* ``labkit.apps.loadgen``: an HTTP load generator that reports latency
  percentiles, as a command and as a function notebooks call.

Both use the standard library only, so they run unchanged as local processes in
the sandbox (via the image catalog, ``labkit.sandbox.node.images``) and in the
``python:3.12-slim`` images built from ``labkit/apps/docker/`` for real clusters.

The images exist at a few releases, like a real product's registry: the release
is the image tag, and the rollout lab's bad release is one of them.
"""

RELEASES = ("1.0", "2.0", "3.0")  # the tags the course's images are published under
DEFAULT_RELEASE = "1.0"  # what `latest` and an untagged reference mean
BAD_RELEASE = "3.0"  # never becomes ready: the release the rollout lab rolls back
