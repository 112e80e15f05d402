"""Providing the pinned binaries: cache, local folders, download, and the message when nothing works."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import run_labkit

from labkit.errors import LabkitError
from labkit.sandbox import binaries
from labkit.sandbox.versions import current_platform, pins


def test_second_install_is_instant_and_says_where_from(tools: binaries.Toolset) -> None:
    result = run_labkit("sandbox", "install")
    assert result.returncode == 0, result.stderr
    assert "kubernetes v1.36.3: cached" in result.stderr and "etcd v3.6.8: cached" in result.stderr
    for binary in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"):
        assert binaries.probe_version(tools[binary], binary) == "1.36.3"
    assert binaries.probe_version(tools["etcd"], "etcd") == "3.6.8"


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(cache))
    return cache


def _folder_of(tools: binaries.Toolset, folder: Path, rename: dict[str, str] | None = None) -> Path:
    folder.mkdir()
    for binary, path in tools.paths.items():
        target = (rename or {}).get(binary, binary)
        if not (folder / target).exists():
            (folder / target).symlink_to(path.resolve())
    return folder


def test_install_from_an_explicit_folder_links_it(tools, empty_cache: Path, tmp_path: Path) -> None:  # noqa: ANN001
    folder = _folder_of(tools, tmp_path / "conda-bin")
    result = run_labkit("sandbox", "install", "--from", str(folder), "--no-build", "--no-download",
                        env={"LABKIT_CACHE_DIR": str(empty_cache)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "using local binaries" in result.stderr and str(folder) in result.stderr
    linked = empty_cache / "bin" / "kubernetes-v1.36.3" / "kube-apiserver"
    assert linked.is_symlink() and linked.resolve() == tools["kube-apiserver"].resolve()


def test_install_finds_binaries_on_path(tools, empty_cache: Path, tmp_path: Path) -> None:  # noqa: ANN001
    folder = _folder_of(tools, tmp_path / "on-path")
    result = run_labkit("sandbox", "install", "--no-build", "--no-download",
                        env={"PATH": f"{folder}:{os.environ['PATH']}"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "using local binaries" in result.stderr


def test_a_wrong_version_in_an_explicit_folder_is_refused(tools, empty_cache: Path, tmp_path: Path) -> None:  # noqa: ANN001
    # The real etcd binary standing where kube-apiserver should be reports etcd's version.
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "kube-apiserver").symlink_to(tools["etcd"].resolve())
    result = run_labkit("sandbox", "install", "--from", str(folder))
    assert result.returncode == 1
    assert "reports version 3.6.8, but the sandbox pins kubernetes v1.36.3" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_binaries_and_no_way_to_get_them(empty_cache: Path, tmp_path: Path) -> None:
    python_only = tmp_path / "python-only"
    python_only.mkdir()
    (python_only / "python").symlink_to(Path(os.sys.executable))
    result = run_labkit("sandbox", "install", env={"PATH": f"{python_only}:/nonexistent"})
    assert result.returncode == 1
    message = result.stderr
    assert "no Go toolchain" in message
    assert "--from FOLDER" in message and "conda install" in message  # way 1
    assert "install Go 1.26.0 or newer" in message  # way 2
    assert "release downloads" in message  # way 3
    assert "Traceback" not in message
    assert not any((empty_cache / "bin").glob("etcd-*"))  # nothing half-installed


class _Archive(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, tools: binaries.Toolset, monkeypatch: pytest.MonkeyPatch):
    """A local release mirror holding an etcd archive laid out as the official one."""
    group = pins().etcd
    served = tmp_path / "mirror"
    served.mkdir()
    archive = served / group.download_url(current_platform()).rsplit("/", 1)[-1]
    with tarfile.open(archive, "w:gz") as tar:
        top = f"etcd-{group.version}-{current_platform()}"
        tar.add(tools["etcd"].resolve(), arcname=f"{top}/etcd")
        readme = f"{top}/README.md".encode()
        info = tarfile.TarInfo(readme.decode())
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    handler = lambda *a, **k: _Archive(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("LABKIT_RELEASE_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    yield archive
    server.shutdown()


def test_download_checks_the_pinned_checksum(mirror: Path, empty_cache: Path) -> None:
    (empty_cache / "bin").mkdir(parents=True)
    good = "sha256:" + hashlib.sha256(mirror.read_bytes()).hexdigest()
    group = dataclasses.replace(pins().etcd, checksums={current_platform(): good})
    binaries.download_group(group, say=print)
    manifest = binaries.cached(group)
    assert manifest and manifest["source"] == "downloaded" and "sha256 verified" in manifest["detail"]
    assert binaries.probe_version(binaries.group_dir(group) / "etcd", "etcd") == "3.6.8"


def test_download_with_a_wrong_checksum_installs_nothing(mirror: Path, empty_cache: Path) -> None:
    (empty_cache / "bin").mkdir(parents=True)
    bad = "sha256:" + "0" * 64
    group = dataclasses.replace(pins().etcd, checksums={current_platform(): bad})
    with pytest.raises(binaries._SourceUnavailable, match="does not match its pinned sha256"):
        binaries.download_group(group, say=print)
    assert binaries.cached(group) is None
    assert [p.name for p in (empty_cache / "bin").iterdir()] == []


def test_unpinned_checksums_are_never_trusted(empty_cache: Path) -> None:
    (empty_cache / "bin").mkdir(parents=True)
    group = dataclasses.replace(pins().etcd, checksums={})
    with pytest.raises(binaries._SourceUnavailable, match="does not install unverified downloads"):
        binaries.download_group(group, say=print)


def test_toolset_without_install_says_what_to_run(empty_cache: Path) -> None:
    with pytest.raises(LabkitError, match="labkit sandbox install"):
        binaries.toolset()


def test_build_modules_match_the_pins() -> None:
    """gobuild/ must be regenerated when versions.toml changes (python -m labkit.sandbox.pin)."""
    for group in pins().groups:
        gomod = (group.gobuild_dir / "go.mod").read_text()
        assert f"{group.name} {group.version}" in gomod.splitlines()[0]
        for package in group.packages:
            assert package in gomod
        assert (group.gobuild_dir / "go.sum").stat().st_size > 0


def test_a_cache_or_state_path_that_is_not_a_folder_is_one_clear_message(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for variable, args in (("LABKIT_CACHE_DIR", ("sandbox", "install")), ("LABKIT_STATE_DIR", ("sandbox", "up"))):
        result = run_labkit(*args, env={variable: str(blocker)})
        assert result.returncode == 1, result.stderr
        assert f"cannot use {blocker}/" in result.stderr and variable in result.stderr
        assert "Traceback" not in result.stderr
