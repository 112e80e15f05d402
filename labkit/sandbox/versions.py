"""The pinned versions of versions.toml, as typed objects.

Everything that needs a version (the binary installer, the control plane's
flags, the Go build modules, the docs) reads it from here, so that pinning is
one edit in one file.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

VERSIONS_FILE = Path(__file__).with_name("versions.toml")
GOBUILD_DIR = Path(__file__).with_name("gobuild")


@dataclass(frozen=True)
class BinaryGroup:
    """Binaries released together at one version (Kubernetes' four, or etcd)."""

    name: str
    version: str
    binaries: tuple[str, ...]
    module: str
    packages: tuple[str, ...]
    url: str
    checksums: dict[str, str]

    @property
    def key(self) -> str:
        """The cache folder name: one folder per group and version."""
        return f"{self.name}-{self.version}"

    @property
    def gobuild_dir(self) -> Path:
        """The Go module (go.mod and go.sum) that pins this group's build."""
        return GOBUILD_DIR / self.name

    @property
    def bare_version(self) -> str:
        return self.version.removeprefix("v")

    def download_url(self, plat: str) -> str:
        os_name, arch = plat.split("-", 1)
        return self.url.format(version=self.version, os=os_name, arch=arch)


@dataclass(frozen=True)
class Pins:
    kubernetes: BinaryGroup
    etcd: BinaryGroup
    go_minimum: str

    @property
    def groups(self) -> tuple[BinaryGroup, ...]:
        return (self.kubernetes, self.etcd)


def _group(name: str, table: dict) -> BinaryGroup:
    return BinaryGroup(
        name=name,
        version=table["version"],
        binaries=tuple(table["binaries"]),
        module=table["module"],
        packages=tuple(table["packages"]),
        url=table["url"],
        checksums=dict(table.get("checksums", {})),
    )


@lru_cache(maxsize=1)
def pins() -> Pins:
    data = tomllib.loads(VERSIONS_FILE.read_text())
    return Pins(
        kubernetes=_group("kubernetes", data["kubernetes"]),
        etcd=_group("etcd", data["etcd"]),
        go_minimum=data["go"]["minimum"],
    )


def current_platform() -> str:
    """This machine as the release archives name it, e.g. ``linux-amd64``."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return f"{platform.system().lower()}-{arch}"
