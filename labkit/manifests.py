"""Manifests as a trainee writes them, and the API's names for what they describe.

``load`` turns what a lab cell passes (YAML text with one or more documents, a
dict, a list of them, or a file) into API objects, and says exactly where a
malformed one goes wrong. ``Kinds`` maps a kind or a kubectl-style name
(``deploy``, ``deployments.apps``, ``pod``) to its REST path, from the cluster's
own discovery documents, as kubectl's REST mapper does; so custom resources work
as soon as their CRD is installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from labkit.errors import LabkitError

def load(manifest: Any) -> list[dict]:
    """The objects in ``manifest``: YAML text (``---`` between documents), a path to a YAML or
    JSON file, a dict, or a list of those; a ``kind: List`` is unpacked."""
    if isinstance(manifest, Path) or (isinstance(manifest, str) and _looks_like_a_file(manifest)):
        path = Path(manifest).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise LabkitError(f"Cannot read the manifest file {path}: {exc.strerror}.") from None
        return _check(_parse(text, str(path)))
    if isinstance(manifest, str):
        return _check(_parse(manifest, "your manifest"))
    if isinstance(manifest, dict):
        return _check([manifest])
    if isinstance(manifest, (list, tuple)):
        return [obj for item in manifest for obj in load(item)]
    raise LabkitError(f"A manifest is YAML text, a file path, a dict or a list of them, not {type(manifest).__name__}.")


def _looks_like_a_file(text: str) -> bool:
    return "\n" not in text and ": " not in text and text.strip().endswith((".yaml", ".yml", ".json"))


def _parse(text: str, where: str) -> list[dict]:
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise LabkitError(f"{where} is not valid YAML{at}: {problem}.",
                          hint="Check the indentation there: YAML nests by spaces (never tabs), and a list item "
                               "starts with '- '.") from None  # fmt: skip
    if not documents:
        raise LabkitError(f"{where} is empty: there is nothing to apply.")
    objects = []
    for doc in documents:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            objects.extend(doc.get("items") or [])
        else:
            objects.append(doc)
    return objects


def _check(objects: list) -> list[dict]:
    for number, obj in enumerate(objects, 1):
        which = f"Object {number} of the manifest" if len(objects) > 1 else "The manifest"
        if not isinstance(obj, dict):
            raise LabkitError(f"{which} is a {type(obj).__name__}, not a mapping with apiVersion, kind and metadata.")
        missing = [key for key in ("apiVersion", "kind") if not obj.get(key)]
        if not isinstance(obj.get("metadata"), dict) or not obj["metadata"].get("name"):
            missing.append("metadata.name")
        if missing:
            kind = obj.get("kind") or "object"
            raise LabkitError(f"{which} ({kind}) has no {', '.join(missing)}.",
                              hint="Every Kubernetes object needs apiVersion, kind and metadata.name, for example "
                                   "apiVersion: apps/v1, kind: Deployment.")  # fmt: skip
    return objects


# ------------------------------------------------------------------------------------ kinds


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    names: tuple[str, ...]  # what kubectl accepts for it: plural, singular, short names

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base

    @property
    def label(self) -> str:
        """How kubectl names it in its output: ``deployment.apps``, ``pod``."""
        return f"{self.kind.lower()}.{self.group}" if self.group else self.kind.lower()


class Kinds:
    """The REST mapping of one cluster, read from its discovery documents on first need."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self._versions: dict[str, list[Kind]] = {}  # group/version -> its kinds
        self._groups: dict[str, str] | None = None  # group -> preferred version

    def _kinds_of(self, group_version: str) -> list[Kind]:
        if group_version not in self._versions:
            path = f"/apis/{group_version}" if "/" in group_version else f"/api/{group_version}"
            document = self.cluster.get(path) or {}
            group, _, version = group_version.rpartition("/")
            self._versions[group_version] = [
                Kind(group, version, r["kind"], r["name"], r["namespaced"],
                     tuple(n for n in (r["name"], r.get("singularName") or r["kind"].lower(), *r.get("shortNames", [])) if n))
                for r in document.get("resources", []) if "/" not in r["name"]
            ]  # fmt: skip
        return self._versions[group_version]

    def _preferred(self) -> dict[str, str]:
        if self._groups is None:
            listing = self.cluster.get("/apis") or {}
            self._groups = {g["name"]: g["preferredVersion"]["groupVersion"] for g in listing.get("groups", [])}
        return self._groups

    def of(self, api_version: str, kind: str) -> Kind:
        """The kind of an object (its apiVersion and kind)."""
        found = next((k for k in self._kinds_of(api_version) if k.kind == kind), None)
        if found is None:
            known = sorted({k.kind for k in self._kinds_of(api_version)})
            hint = (f"{api_version} has: {', '.join(known)}." if known
                    else f"This cluster does not serve {api_version} (`kubectl api-versions` lists what it does).")  # fmt: skip
            raise LabkitError(f"This cluster has no kind {kind!r} in {api_version}.", hint=hint)
        return found

    def named(self, name: str) -> Kind:
        """A kind by any name kubectl takes: ``deploy``, ``deployment``, ``deployments.apps``, ``Pod``."""
        wanted, _, group = name.lower().partition(".")
        candidates = [("v1", self._kinds_of("v1"))] if not group else []
        for g, version in self._preferred().items():
            if not group or g == group:
                candidates.append((version, None))
        for version, kinds in candidates:
            for k in kinds if kinds is not None else self._kinds_of(version):
                if wanted in k.names or wanted == k.kind.lower():
                    return k
        raise LabkitError(f"This cluster has no kind of object called {name!r}.",
                          hint="`kubectl api-resources` lists the names it knows (deployment, pod, configmap, ...).")  # fmt: skip


def split_target(target: str) -> tuple[str, str]:
    """``deployment/web`` -> ("deployment", "web"); a bare name is a pod."""
    kind, slash, name = target.partition("/")
    if not slash:
        return "pod", target
    if not kind or not name:
        raise LabkitError(f"{target!r} does not name an object.", hint="Write KIND/NAME, as kubectl does: deployment/web.")
    return kind, name
