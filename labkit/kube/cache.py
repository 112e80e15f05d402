"""Objects read through the API, kept a little while: what a node's pods refer to, as the kubelet keeps them."""

from __future__ import annotations

import threading
import time

from labkit.kube.client import KubeAPI


class ObjectCache:
    """Objects read through ``api``, kept for ``ttl`` seconds: the ConfigMaps and Secrets a node's
    pods refer to, as the kubelet's object managers keep them. Twenty pods of one namespace starting
    at once read its ``kube-root-ca.crt`` once, not twenty times; a change is seen within ``ttl``."""

    def __init__(self, api: KubeAPI, ttl: float) -> None:
        self.api = api
        self.ttl = ttl
        self._entries: dict[str, tuple[float, dict | None]] = {}
        self._fetching: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> dict | None:
        """The object at ``path`` (None if it does not exist), read at most ``ttl`` seconds ago."""
        with self._lock:
            fetching = self._fetching.setdefault(path, threading.Lock())
        with fetching:  # readers of one object wait for one request, not one each
            now = time.monotonic()
            entry = self._entries.get(path)
            if entry is not None and now - entry[0] < self.ttl:
                return entry[1]
            value = self.api.get(path)
            with self._lock:
                for stale in [p for p, (at, _) in self._entries.items() if now - at >= self.ttl and p != path]:
                    del self._entries[stale]
                    self._fetching.pop(stale, None)
                self._entries[path] = (time.monotonic(), value)
            return value
