"""The image catalog: which local program an image reference stands for.

On a real cluster an image is pulled and its entrypoint run in a container. In
the sandbox each image the course uses maps to a program already on this
machine, run as a local process: base images (`busybox`, `alpine`, ...) give the
local shell, so that `command: [sh, -c, ...]` works as written, and `python`
images the local Python. An image not in the catalog fails to "pull", as an
image that does not exist does on a cluster.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

SHELL_IMAGES = ("busybox", "alpine", "debian", "ubuntu")


@dataclass(frozen=True)
class Image:
    reference: str
    entrypoint: tuple[str, ...]  # the image's ENTRYPOINT (replaced by a container's `command`)
    cmd: tuple[str, ...]  # the image's CMD (replaced by a container's `args`)
    image_id: str

    def argv(self, command: list[str] | None, args: list[str] | None) -> list[str]:
        """What runs, by the rules Kubernetes documents for command/args versus ENTRYPOINT/CMD."""
        if command:
            return [*command, *(args or [])]
        return [*self.entrypoint, *(args if args else self.cmd)]


def repository(reference: str) -> str:
    """``docker.io/library/busybox:1.36@sha256:...`` -> ``busybox``."""
    name = reference.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0].lower()


def resolve(reference: str) -> Image | None:
    """The catalog entry for ``reference``, or None if no such image exists here."""
    repo = repository(reference)
    if repo in SHELL_IMAGES:
        return Image(reference, (), ("sh",), f"labkit.local/{repo}@shell")
    if repo == "python":
        return Image(reference, (), ("python3",), f"labkit.local/{repo}@python{sys.version_info[0]}")
    return None


def executable(name: str) -> str | None:
    """A command as a container would find it on its PATH; `python` means this machine's Python."""
    if name in ("python", "python3"):
        return sys.executable
    return shutil.which(name)
