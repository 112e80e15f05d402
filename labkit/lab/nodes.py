"""A sandbox node's machine lost, and brought back (``lab.lose_node``, ``lab.restore_node``).

The nodes a lab stopped are noted on its namespace, so that if its kernel is killed the
next lab to start on this machine brings them back when it sweeps that namespace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from labkit.errors import LabkitError
from labkit.kube.client import MERGE_PATCH

if TYPE_CHECKING:
    from labkit.lab.context import LabContext

LOST_NODES = "labkit.io/lost-nodes"  # sandbox nodes a lab stopped, for the sweep after a killed kernel


class Nodes:
    """The sandbox nodes a lab stopped."""

    def __init__(self, lab: LabContext) -> None:
        self.lab = lab
        self.lost: set[str] = set()

    def lose(self, node: str | None = None) -> str:
        """Stop a node of the local sandbox as if its machine were lost (its processes die, no heartbeats);
        by default the node running most of the lab's pods. Its name; ``restore_node`` brings it back."""
        sandbox = self.sandbox()
        if node is None:
            counts: dict[str, int] = {}
            for pod in self.lab.pods():
                if pod["spec"].get("nodeName"):
                    counts[pod["spec"]["nodeName"]] = counts.get(pod["spec"]["nodeName"], 0) + 1
            if not counts:
                raise LabkitError("No pod of the lab runs on a node yet, so there is no node to choose.",
                                  hint="Name one: `lab.lose_node('node-2')`.")  # fmt: skip
            node = max(sorted(counts), key=counts.get)
        sandbox.set_node_running(node, False, say=self.lab.say)
        self.lost.add(node)
        self._note()
        return node

    def restore(self, node: str, quiet: bool = False) -> None:
        """Bring back a node ``lose_node`` stopped."""
        self.sandbox().set_node_running(node, True, say=(lambda _: None) if quiet else self.lab.say)
        self.lost.discard(node)
        self._note()

    def _note(self) -> None:
        """Keep the stopped nodes on the lab's namespace, so that if this kernel is killed the next lab brings
        them back when it sweeps the namespace."""
        if self.lab.shared:
            return
        body = {"metadata": {"annotations": {LOST_NODES: ",".join(sorted(self.lost)) or None}}}
        try:
            self.lab.cluster.request("PATCH", f"/api/v1/namespaces/{self.lab.namespace}", body, content_type=MERGE_PATCH)
        except LabkitError:
            pass  # the namespace is going: the nodes come back with close()

    def sandbox(self):  # noqa: ANN202 - a labkit.sandbox.controlplane.Sandbox
        if not self.lab.cluster.sandbox:
            raise LabkitError("Losing a node works on the local sandbox only.",
                              hint="On a real cluster, drain the node (`kubectl drain`) or stop its machine.")  # fmt: skip
        from labkit.sandbox.controlplane import Sandbox

        return Sandbox(self.lab.cluster.sandbox)
