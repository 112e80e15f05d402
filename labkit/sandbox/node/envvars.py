"""A container's environment and the pod fields it may refer to, as the kubelet computes them.

Covers ``env`` (plain values with ``$(VAR)`` expansion, ``valueFrom`` ConfigMap,
Secret, field and resource references) and ``envFrom``. A missing, non-optional
ConfigMap, Secret or key raises ``ConfigError``, which the pod worker reports as
the kubelet does: the container waits with reason ``CreateContainerConfigError``
and the message the kubelet would give.
"""

from __future__ import annotations

import base64
import re
from typing import Callable

from labkit.kube import quantity

Lookup = Callable[[str, str], "dict | None"]  # (kind "configmaps"|"secrets", name) -> object or None
_VALID_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


class ConfigError(Exception):
    """The container cannot be configured yet (CreateContainerConfigError)."""


def field_value(pod: dict, path: str) -> str:
    """A ``fieldRef`` of the downward API: metadata, spec and status fields the kubelet knows."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return meta.get(match.group(1), {}).get(match.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{key}="{items[key]}"' for key in sorted(items))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(ip["ip"] for ip in status.get("hostIPs", [])),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs", [])),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldPath: {path}")
    return simple[path]


def resource_value(pod: dict, ref: dict, container: str, allocatable: dict) -> str:
    """A ``resourceFieldRef``: a limit (the node's allocatable when unset) or a request, over the divisor."""
    name = ref.get("containerName") or container
    spec = next((c for c in _all_containers(pod) if c["name"] == name), None)
    if spec is None:
        raise ConfigError(f"container {name!r} not found in the pod's spec for resourceFieldRef")
    kind, _, resource = ref["resource"].partition(".")
    if kind not in ("limits", "requests") or resource not in ("cpu", "memory", "ephemeral-storage"):
        raise ConfigError(f"unsupported container resource: {ref['resource']}")
    resources = spec.get("resources", {})
    value = resources.get(kind, {}).get(resource)
    if value is None and kind == "limits":
        value = allocatable.get(resource, "0")
    if value is None:
        value = resources.get("limits", {}).get(resource, "0") if kind == "requests" else "0"
    return quantity.divide(quantity.parse(value), ref.get("divisor"))


def _all_containers(pod: dict) -> list[dict]:
    spec = pod.get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def object_data(obj: dict, kind: str) -> dict[str, str]:
    """A ConfigMap's or Secret's entries as text (Secrets are base64 in the API)."""
    if kind == "secrets":
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
    return {**(obj.get("data") or {}), **{k: base64.b64decode(v).decode(errors="replace")
                                          for k, v in (obj.get("binaryData") or {}).items()}}  # fmt: skip


def expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` references to variables defined earlier; ``$$`` escapes; unknown ones stay as written."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


def _referenced(lookup: Lookup, kind: str, ref: dict) -> dict | None:
    obj = lookup(kind, ref["name"])
    if obj is None and not ref.get("optional"):
        singular = "configmap" if kind == "configmaps" else "secret"
        raise ConfigError(f'{singular} "{ref["name"]}" not found')
    return obj


def container_env(pod: dict, container: dict, lookup: Lookup, allocatable: dict,
                  base: dict[str, str]) -> dict[str, str]:  # fmt: skip
    """The environment a container's process starts with: ``base`` (PATH, HOSTNAME, image ENV), then
    ``envFrom`` in order, then ``env`` in order (later entries win, as in the kubelet)."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom", []):
        for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
            if key not in source:
                continue
            obj = _referenced(lookup, kind, source[key])
            for name, value in object_data(obj or {}, kind).items():
                name = source.get("prefix", "") + name
                if _VALID_NAME.match(name):
                    env[name] = value
    for item in container.get("env", []):
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_value(pod, source["resourceFieldRef"], container["name"], allocatable)
        else:
            kind, key = ("configmaps", "configMapKeyRef") if "configMapKeyRef" in source else ("secrets", "secretKeyRef")
            if key not in source:
                raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
            ref = source[key]
            obj = _referenced(lookup, kind, ref)
            if obj is None:
                continue
            data = object_data(obj, kind)
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                label = "ConfigMap" if kind == "configmaps" else "Secret"
                raise ConfigError(f"couldn't find key {ref['key']} in {label} {namespace}/{ref['name']}")
            env[name] = data[ref["key"]]
    return env
