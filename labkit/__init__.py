"""labkit: hands-on courseware for operating distributed systems.

What a lab notebook uses::

    import labkit
    from labkit import checks

    lab = labkit.start_lab("01-deploy-and-scale")   # a fresh namespace on the cluster at hand
    lab.apply(manifest)                              # YAML text, a dict, a file
    lab.wait_ready("deployment/web")                 # with a live status line
    lab.kubectl("get pods -o wide")                  # the real kubectl, in the lab's namespace
    lab.events()                                     # the namespace's Events as a timeline
    lab.http("deployment/web", "/version")           # a pod's HTTP port, from the notebook
    lab.http("deployment/api", "/tasks", method="POST", json={"kind": "sleep"})
    labkit.quantity("500m")                          # 0.5: resource quantities as numbers
    lab.view()                                       # nodes and pods, live
    checks.deployment(lab, "web", replicas=3)        # a graded check with feedback

The local sandbox cluster lives in ``labkit.sandbox`` and the command line in ``labkit.cli``.
The notebook API is imported on first use, so that the sandbox's own processes and the
training apps, which live in this package too, start without it.
"""

from typing import Any

from labkit.errors import LabkitError

__all__ = ["Lab", "LabkitError", "Response", "quantity", "start_lab"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Lab", "Response", "start_lab"):
        from labkit import lab

        return getattr(lab, name)
    if name == "quantity":  # "500m" -> 0.5, "64Mi" -> 67108864: resource quantities as numbers
        from labkit.kube.quantity import parse

        return parse
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
