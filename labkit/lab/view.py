"""A live view of a lab's cluster: its nodes and the lab's pods, redrawn as watches report changes.

Two threads keep lists of the nodes and of the lab's pods current the way
controllers do (``labkit.kube.watch``: list, then watch, resumed from the last
resourceVersion); every change redraws an ipywidgets HTML table,
at most a few times a second. Credentials that may not list nodes (a trainee's
service account) show the pods alone.
"""

from __future__ import annotations

import datetime as dt
import html
import threading
import time
from typing import Any

from labkit import readiness
from labkit.kube.errors import Forbidden
from labkit.kube.watch import ListWatch

REDRAW_EVERY = 0.25


class LiveView:
    def __init__(self, lab: Any) -> None:
        import ipywidgets

        self.lab = lab
        self.widget = ipywidgets.HTML(value="<i>connecting…</i>")
        self.nodes: dict[str, dict] | None = {}
        self.pods: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.dirty = threading.Event()
        self.threads = [
            threading.Thread(target=self._follow, args=("/api/v1/nodes", "nodes"), daemon=True, name="view-nodes"),
            threading.Thread(target=self._follow, args=(f"/api/v1/namespaces/{lab.namespace}/pods", "pods"),
                             daemon=True, name="view-pods"),  # fmt: skip
            threading.Thread(target=self._redraw, daemon=True, name="view-redraw"),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.dirty.set()

    # -- keeping the lists ------------------------------------------------------------------

    def _follow(self, path: str, what: str) -> None:
        changes = ListWatch(self.lab.cluster.api, path, watch_seconds=50, stop=self.stopping.is_set,
                            wait=self.stopping.wait, fatal=(Forbidden,))  # fmt: skip
        try:
            for change, found in changes:
                with self.lock:
                    if change == "LISTED":
                        setattr(self, what, {o["metadata"]["name"]: o for o in found})
                    elif change == "DELETED":
                        getattr(self, what).pop(found["metadata"]["name"], None)
                    else:
                        getattr(self, what)[found["metadata"]["name"]] = found
                self.dirty.set()
        except Forbidden:
            if what == "nodes":
                with self.lock:
                    self.nodes = None  # not ours to see: the pods alone
                self.dirty.set()

    def _redraw(self) -> None:
        while not self.stopping.is_set():
            self.dirty.wait()
            self.dirty.clear()
            if self.stopping.is_set():
                self.widget.value += "<p><i>(the lab is closed; this view no longer updates)</i></p>"
                return
            with self.lock:
                nodes = None if self.nodes is None else list(self.nodes.values())
                pods = list(self.pods.values())
            self.widget.value = render(nodes, pods, self.lab.namespace)
            time.sleep(REDRAW_EVERY)


# -- drawing ------------------------------------------------------------------------------------


def _age(stamp: str | None) -> str:
    if not stamp:
        return ""
    seconds = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def _table(headers: list[str], rows: list[list[str]], colours: list[str]) -> str:
    head = "".join(f'<th style="text-align:left;padding:2px 10px">{h}</th>' for h in headers)
    body = "".join(
        f'<tr style="color:{colour}">' + "".join(f'<td style="text-align:left;padding:2px 10px">{html.escape(v)}</td>'
                                                  for v in row) + "</tr>"
        for row, colour in zip(rows, colours)
    )  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(nodes: list[dict] | None, pods: list[dict], namespace: str) -> str:
    """The view's HTML: a table of nodes, then one of the lab's pods."""
    parts = [f"<p><b>{time.strftime('%H:%M:%S')}</b> — live, from watches</p>"]
    if nodes is None:
        parts.append("<p><i>Nodes: your account may not list them.</i></p>")
    else:
        per_node: dict[str, int] = {}
        for pod in pods:
            node = pod["spec"].get("nodeName")
            if node:
                per_node[node] = per_node.get(node, 0) + 1
        rows, colours = [], []
        for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
            name = node["metadata"]["name"]
            ready = readiness.condition(node, "Ready").get("status") == "True"
            cordoned = node["spec"].get("unschedulable", False)
            status = ("Ready" if ready else "NotReady") + (",SchedulingDisabled" if cordoned else "")
            zone = node["metadata"].get("labels", {}).get("topology.kubernetes.io/zone", "")
            rows.append([name, status, zone, str(per_node.get(name, 0))])
            colours.append("#1a7f37" if ready and not cordoned else "#cf222e")
        parts.append("<p><b>Nodes</b></p>" + _table(["NAME", "STATUS", "ZONE", "LAB PODS"], rows, colours))
    rows, colours = [], []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        statuses = pod.get("status", {}).get("containerStatuses", [])
        ready = sum(1 for c in statuses if c.get("ready"))
        word = readiness.status_word(pod)
        restarts = sum(c.get("restartCount", 0) for c in statuses)
        rows.append([pod["metadata"]["name"], f"{ready}/{len(pod['spec']['containers'])}", word, str(restarts),
                     pod["spec"].get("nodeName", "<none>"), _age(pod["metadata"].get("creationTimestamp"))])  # fmt: skip
        good = ready == len(pod["spec"]["containers"]) or word == "Completed"
        colours.append("#1a7f37" if good else ("#9a6700" if word in ("Running", "ContainerCreating", "Pending") else "#cf222e"))
    table = _table(["NAME", "READY", "STATUS", "RESTARTS", "NODE", "AGE"], rows, colours) if rows else "<p><i>no pods yet</i></p>"
    parts.append(f"<p><b>Pods in {html.escape(namespace)}</b></p>" + table)
    return "".join(parts)
