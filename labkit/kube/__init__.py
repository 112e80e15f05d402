"""One small Kubernetes client for everything labkit runs: the notebooks, the node agent, the control plane's set-up.

* ``client``: ``KubeAPI``, requests over a pool of kept-alive connections, and watch streams;
* ``errors``: the API's refusals, one class per ``reason`` (``NotFound``, ``Conflict``, ``Forbidden``,
  ``NamespaceGone``...), and ``Unreachable``;
* ``watch``: ``ListWatch``, a collection listed and then watched, resumed from its last resourceVersion;
* ``config``: which cluster a notebook talks to (kubeconfig, in-cluster, the local sandbox), as ``Cluster``;
* ``events``: Events as components report them, and a node's background sink for them;
* ``cache``: objects kept a little while; ``quantity``: ``500m``, ``64Mi``, ``1mbit``, ``1m30s`` as numbers;
* ``chaosmesh``: Chaos Mesh's API group and kinds, which the notebooks write and the node agent carries out.
"""

from labkit.kube.client import APPLY_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, KubeAPI
from labkit.kube.errors import (AlreadyExists, APIError, Conflict, Expired, Forbidden, Invalid, NamespaceGone,
                                NotFound, Unauthorized, Unreachable)  # fmt: skip

__all__ = ["APPLY_PATCH", "MERGE_PATCH", "STRATEGIC_MERGE_PATCH", "KubeAPI", "APIError", "AlreadyExists", "Conflict",
           "Expired", "Forbidden", "Invalid", "NamespaceGone", "NotFound", "Unauthorized", "Unreachable"]  # fmt: skip
