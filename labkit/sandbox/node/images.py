"""The image catalog: which local program an image reference stands for.

On a real cluster an image is pulled and its entrypoint run in a container. In
the sandbox each image the course uses maps to a program already on this
machine, run as a local process:

* base images (``busybox``, ``alpine``, ...) give the local shell, so that
  ``command: [sh, -c, ...]`` works as written, and ``python`` images the local
  Python;
* the course's own apps, ``labkit/web``, ``labkit/loadgen`` and
  ``labkit/platform`` under any registry (``ghcr.io/labkit/web:2.0``), run
  ``python3 -m labkit.apps.web`` (and so on) with the tag as the release
  (``APP_VERSION``). Each app exists only at its own published releases
  (``labkit.apps.APP_RELEASES``: web and loadgen 1.0, 2.0 and 3.0, the platform
  1.0 to 1.4), so a mistyped tag fails as it does on a cluster. The platform's
  image runs one of its four roles, given as the container's ``args``;
* ``pause`` (``registry.k8s.io/pause``, ``gcr.io/google-containers/pause``):
  a process that only waits, as the real one does (Chaos Mesh's pod-failure
  swaps a container's image for it);
* etcd's official images (``registry.k8s.io/etcd``, ``quay.io/coreos/etcd``,
  ``gcr.io/etcd-development/etcd``) give the sandbox's pinned etcd, whatever
  the tag: the image id says which version really runs.

An image not in the catalog fails to "pull", as an image that does not exist
does on a cluster.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import labkit
from labkit.apps import APP_RELEASES, DEFAULT_RELEASE
from labkit.sandbox import binaries
from labkit.sandbox.versions import pins

SHELL_IMAGES = ("busybox", "alpine", "debian", "ubuntu")
APP_MODULES = {"labkit/web": "labkit.apps.web", "labkit/loadgen": "labkit.apps.loadgen",
               "labkit/platform": "labkit.apps.platform"}  # fmt: skip
ETCD_IMAGES = ("registry.k8s.io/etcd", "k8s.gcr.io/etcd", "quay.io/coreos/etcd", "gcr.io/etcd-development/etcd")
SOURCE_ROOT = str(Path(labkit.__file__).resolve().parent.parent)  # the folder holding the labkit package


@dataclass(frozen=True)
class Image:
    reference: str
    entrypoint: tuple[str, ...]  # the image's ENTRYPOINT (replaced by a container's `command`)
    cmd: tuple[str, ...]  # the image's CMD (replaced by a container's `args`)
    image_id: str
    env: tuple[tuple[str, str], ...] = ()  # the image's ENV, which a container's own `env` overrides
    path: tuple[str, ...] = ()  # folders searched before this machine's PATH (the image's own bin/)

    def argv(self, command: list[str] | None, args: list[str] | None) -> list[str]:
        """What runs, by the rules Kubernetes documents for command/args versus ENTRYPOINT/CMD."""
        if command:
            return [*command, *(args or [])]
        return [*self.entrypoint, *(args if args else self.cmd)]


@dataclass(frozen=True)
class Reference:
    """An image reference taken apart: ``[registry/]path[:tag][@digest]``."""

    registry: str  # "" for Docker Hub's short form
    path: str  # "labkit/web", "coreos/etcd", "busybox"
    tag: str  # "" when none is given
    digest: str

    @property
    def name(self) -> str:
        """Registry and path: ``quay.io/coreos/etcd``."""
        return f"{self.registry}/{self.path}" if self.registry else self.path


def parse(reference: str) -> Reference:
    """Split a reference the way container runtimes do (a first part with ``.`` or ``:`` is a registry)."""
    rest, _, digest = reference.strip().lower().partition("@")
    parts = rest.split("/")
    registry = ""
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry = parts.pop(0)
    last, _, tag = parts[-1].partition(":")
    return Reference(registry, "/".join([*parts[:-1], last]), tag, digest)


def repository(reference: str) -> str:
    """``docker.io/library/busybox:1.36@sha256:...`` -> ``busybox``."""
    return parse(reference).path.rsplit("/", 1)[-1]


def resolve(reference: str) -> Image | None:
    """The catalog entry for ``reference``, or None if no such image exists here."""
    ref = parse(reference)
    repo = repository(reference)
    if repo in SHELL_IMAGES:
        return Image(reference, (), ("sh",), f"labkit.local/{repo}@shell")
    if repo == "pause":  # the pod sandbox's image (registry.k8s.io/pause): a process that only waits
        # Like /pause, it ignores any args a container gives it (they become the shell's unused parameters).
        return Image(reference, ("sh", "-c", "exec sleep infinity", "pause"), (), f"labkit.local/pause@{ref.tag or 'latest'}")
    if repo == "python":
        return Image(reference, (), ("python3",), f"labkit.local/{repo}@python{sys.version_info[0]}")
    app = next((path for path in APP_MODULES if ref.path == path or ref.path.endswith("/" + path)), None)
    if app is not None:
        return _app_image(reference, app, ref.tag)
    if ref.name in ETCD_IMAGES:
        return _etcd_image(reference)
    return None


def _app_image(reference: str, app: str, tag: str) -> Image | None:
    """One of the course's apps at the release its tag names; a tag that app was not published under does not exist."""
    release = DEFAULT_RELEASE if tag in ("", "latest") else tag
    if release not in APP_RELEASES[app.rsplit("/", 1)[-1]]:
        return None
    env = (("APP_VERSION", release), ("PYTHONPATH", SOURCE_ROOT), ("PYTHONUNBUFFERED", "1"))
    return Image(reference, ("python3", "-m", APP_MODULES[app]), (), f"labkit.local/{app}@{release}", env=env)


def _etcd_image(reference: str) -> Image:
    """The sandbox's own pinned etcd, from the binaries cache (the control plane runs the same one)."""
    etcd = pins().etcd
    folder = binaries.group_dir(etcd)
    return Image(reference, (), ("etcd",), f"labkit.local/etcd@{etcd.version}", path=(str(folder),))


def executable(name: str, path: str | None = None) -> str | None:
    """A command as a container would find it on ``path`` (its PATH); `python` means this machine's Python."""
    if name in ("python", "python3"):
        return sys.executable
    return shutil.which(name, path=path)
