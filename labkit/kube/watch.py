"""One way to keep up with a collection: list it, then watch it, resuming where the last watch ended.

``ListWatch`` does what client-go's reflector does, for every loop labkit runs
(the node agent's pods, the service proxy's Services and EndpointSlices, the
chaos controller's experiments, a notebook's live view):

* list the collection, and give its items (``("LISTED", items)``: what was kept
  before is to be replaced);
* watch from the list's ``resourceVersion``, with bookmarks, and give each change
  (``("ADDED" | "MODIFIED" | "DELETED", object)``);
* when a watch ends (its timeout; a dropped connection), watch again from the last
  ``resourceVersion`` seen: events and bookmarks move it on, so nothing is missed
  and nothing is listed twice;
* list again only when the server says that version has expired (410) or a request
  is refused; wait a moment after a failure, and longer while the collection does
  not exist (a kind not installed yet).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator

from labkit.kube.client import KubeAPI
from labkit.kube.errors import APIError, Expired, NotFound, Unreachable


class ListWatch:
    """The list and the changes of the collection at ``path`` (see the module's docstring), until ``stop()``."""

    def __init__(self, api: KubeAPI, path: str, *, query: dict[str, str] | None = None, watch_seconds: int = 60,
                 stop: Callable[[], bool] = lambda: False, wait: Callable[[float], object] | None = None,
                 log: Callable[[str], None] | None = None, fatal: tuple[type[BaseException], ...] = ()) -> None:  # fmt: skip
        """``stop``: asked between events (and a watch ends within ``watch_seconds``); ``wait(seconds)`` pauses
        after a failure (default: a sleep that ``stop`` cannot cut short); ``fatal``: errors that end it, raised."""
        self.api = api
        self.path = path
        self.query = dict(query or {})
        self.watch_seconds = watch_seconds
        self.stop = stop
        self.wait = wait or threading.Event().wait
        self.log = log or (lambda _: None)
        self.fatal = fatal

    def __iter__(self) -> Iterator[tuple[str, object]]:
        while not self.stop():
            try:
                listing = self.api.request("GET", self.path, query=self.query or None)
                version = listing["metadata"]["resourceVersion"]
                yield "LISTED", listing.get("items", [])
                yield from self._changes(version)
            except self.fatal:
                raise
            except Expired:
                continue  # too old to resume: list again, at once
            except NotFound:
                self.wait(5.0)  # the collection's kind is not there (yet)
            except (APIError, OSError, ValueError, KeyError) as exc:
                self.log(f"{self.path}: {exc}; listing again")
                self.wait(1.0)

    def _changes(self, version: str) -> Iterator[tuple[str, object]]:
        """Watch after watch from ``version``, until it expires (then the caller lists again) or ``stop()``."""
        while not self.stop():
            query = {**self.query, "watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                     "timeoutSeconds": str(self.watch_seconds)}  # fmt: skip
            try:
                for event in self.api.stream(self.path, timeout=self.watch_seconds + 30, query=query):
                    if self.stop():
                        return
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":  # a Status: 410 Expired, as a rule
                        raise Expired(int(obj.get("code") or 410), str(obj.get("message") or "watch expired"),
                                      reason=str(obj.get("reason") or "Expired"))  # fmt: skip
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        yield kind, obj
            except Unreachable as exc:  # a dropped watch: resume from where it was, after a moment
                self.log(f"{self.path}: {exc}; watching again")
                self.wait(1.0)
