"""A lab run's namespace: made for the run (or given to it), owned by its kernel, swept once that kernel is dead.

A namespace a lab makes carries the lab's and the run's labels and, as an
annotation, its kernel (host, pid, start time): a lab starting on this machine
deletes the namespaces of kernels that were killed before they could, and brings
back the sandbox nodes they had stopped. Credentials that may not make namespaces
(a trainee's service account) work in the account's own; a grading run's namespace
is given in ``$LABKIT_NAMESPACE``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from labkit.errors import LabkitError
from labkit.kube.errors import Forbidden, NotFound
from labkit.lab.nodes import LOST_NODES

if TYPE_CHECKING:
    from labkit.kube.config import Cluster

LAB_LABEL = "labkit.io/lab"
RUN_LABEL = "labkit.io/run"
OWNER = "labkit.io/owner"  # host:pid:start of the kernel that made a namespace, so a dead one's can be swept


def make(cluster: Cluster, slug: str, run_id: str) -> tuple[str, bool]:
    """The namespace the run works in, and whether it is shared (one the lab did not make)."""
    given = os.environ.get("LABKIT_NAMESPACE", "").strip()
    if given:  # a namespace made for this run (a grading run's): work in it, as in a trainee's own
        if not alive(cluster, given):
            raise LabkitError(f"$LABKIT_NAMESPACE names {given}, which does not exist.",
                              hint="Unset it to let the lab make a namespace of its own.")  # fmt: skip
        return given, True
    sweep(cluster)
    name = f"{slug}-{run_id}"
    body = {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {LAB_LABEL: slug, RUN_LABEL: run_id}, "annotations": {OWNER: owner()}}}  # fmt: skip
    try:
        cluster.request("POST", "/api/v1/namespaces", body)
    except Forbidden as exc:
        if not cluster.namespace:
            raise LabkitError(f"Cannot create the lab's namespace: {exc.message}", hint=exc.hint) from None
        return cluster.namespace, True  # a trainee's service account: its own namespace, cleaned by label
    except LabkitError as exc:
        raise LabkitError(f"Cannot create the lab's namespace: {exc.message}", hint=exc.hint) from None
    # Pods are refused until the namespace's controller has made its default ServiceAccount.
    deadline = time.monotonic() + 30
    while cluster.get(f"/api/v1/namespaces/{name}/serviceaccounts/default") is None:
        if time.monotonic() > deadline:
            raise LabkitError(f"The namespace {name} got no default ServiceAccount within 30 s.",
                              hint="The cluster's controller manager may be down: `kubectl get --raw /readyz`.")  # fmt: skip
        time.sleep(0.02)
    return name, False


def alive(cluster: Cluster, namespace: str) -> bool:
    """Whether ``namespace`` exists and is not being deleted. An account that may not read namespaces (a trainee's)
    asks for its pods instead: the API refuses a list in a namespace that is gone (an account that may not list
    pods there either is taken at its word)."""
    try:
        found = cluster.get(f"/api/v1/namespaces/{namespace}")
        return found is not None and "deletionTimestamp" not in found["metadata"]
    except Forbidden:
        try:
            cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods", query={"limit": "1"})
        except NotFound:
            return False
        except Forbidden:
            pass
        return True


def sweep(cluster: Cluster) -> None:
    """Delete lab namespaces that kernels on this machine made and could not remove (they were killed)."""
    try:
        listing = cluster.request("GET", "/api/v1/namespaces", query={"labelSelector": LAB_LABEL})
    except LabkitError:
        return  # not allowed to list namespaces: nothing of ours to sweep
    host = socket.gethostname()
    for ns in listing.get("items", []):
        meta = ns["metadata"]
        made_by = (meta.get("annotations") or {}).get(OWNER, "")
        if made_by.startswith(host + ":") and not owner_alive(made_by) and "deletionTimestamp" not in meta:
            try:
                cluster.request("DELETE", f"/api/v1/namespaces/{meta['name']}")
                lost = (meta.get("annotations") or {}).get(LOST_NODES, "")
                if lost and cluster.sandbox:  # nodes that kernel stopped come back
                    from labkit.sandbox.controlplane import Sandbox

                    for node in lost.split(","):
                        Sandbox(cluster.sandbox).set_node_running(node, True, say=lambda _: None)
            except LabkitError:
                pass


def owner() -> str:
    """This kernel, as a namespace's owner: host, pid, and the process's start time (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_alive(owner: str) -> bool:
    _, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not start or _start_time(int(pid)) == start

