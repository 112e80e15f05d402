"""Find, build or download the pinned control-plane binaries.

Each group of binaries (Kubernetes' four, and etcd) lands in its own cache folder,
``<cache>/bin/<group>-<version>/``, with a small manifest saying where it came
from. The sources are tried in the order a classroom needs them:

1. **local**: an explicit folder (``--from`` or ``$LABKIT_BIN_DIR``) or ``$PATH``,
   for example conda-forge's ``kubernetes-server`` and ``etcd``. Only
   binaries that report exactly the pinned version are taken; they are linked,
   not copied.
2. **build**: the pinned Go modules under ``gobuild/`` built with the local Go
   toolchain. Their go.sum files pin every dependency's hash, so the build is as
   reproducible as the upstream release.
3. **download**: the official release archive, accepted only if its checksum
   matches the one pinned in versions.toml.

Once a group is in the cache, installing again is instant.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from labkit.errors import LabkitError
from labkit.paths import cache_root
from labkit.progress import Progress, format_duration
from labkit.sandbox.versions import BinaryGroup, Pins, current_platform, pins

MANIFEST = ".labkit-source.json"
Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Toolset:
    """Where each pinned binary is, once installed."""

    paths: dict[str, Path]
    sources: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, binary: str) -> Path:
        return self.paths[binary]

    @property
    def kubectl_dir(self) -> Path:
        return self.paths["kubectl"].parent


def bin_root() -> Path:
    return cache_root() / "bin"


def group_dir(group: BinaryGroup) -> Path:
    return bin_root() / group.key


# --------------------------------------------------------------------------- version probing

_VERSION_ARGS = {"kubectl": ["version", "--client"]}
_VERSION_RE = re.compile(r"v?(\d+\.\d+\.\d+)")


def probe_version(path: Path, binary: str) -> str | None:
    """The version a binary reports (``1.36.3``), or None if it does not run."""
    args = _VERSION_ARGS.get(binary, ["--version"])
    try:
        out = subprocess.run(
            [str(path), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION_RE.search(out.stdout + out.stderr)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- the cache

def _read_manifest(group: BinaryGroup) -> dict | None:
    folder = group_dir(group)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != group.version:
        return None
    for binary in group.binaries:
        path = folder / binary
        if not (path.exists() and os.access(path, os.X_OK)):  # exists() follows links
            return None
    return manifest


def cached(group: BinaryGroup) -> dict | None:
    """The manifest of an installed group, or None if it needs installing."""
    return _read_manifest(group)


def _publish(group: BinaryGroup, staging: Path, source: str, detail: str) -> None:
    """Move a fully prepared folder into place, so a half install is never seen."""
    (staging / MANIFEST).write_text(
        json.dumps(
            {
                "group": group.name,
                "version": group.version,
                "source": source,
                "detail": detail,
                "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )
    final = group_dir(group)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


# --------------------------------------------------------------------------- source 1: local

def _local_candidates(binary: str, explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit / binary]
    found = shutil.which(binary)
    return [Path(found)] if found else []


def find_local(group: BinaryGroup, explicit: Path | None, say: Say) -> dict[str, Path] | None:
    """The group's binaries from an explicit folder or PATH, if all are the pinned version."""
    found: dict[str, Path] = {}
    own = group_dir(group).resolve()
    for binary in group.binaries:
        candidates = [p for p in _local_candidates(binary, explicit) if p.resolve().parent != own]
        match = None
        for path in candidates:
            if not path.is_file():
                continue
            version = probe_version(path, binary)
            if version == group.bare_version:
                match = path.absolute()
                break
            where = str(explicit) if explicit else "PATH"
            message = (
                f"{path} reports version {version or 'unknown'}, but the sandbox pins "
                f"{group.name} {group.version}"
            )
            if explicit is not None:
                raise LabkitError(
                    message + ".",
                    hint=f"Put {group.version} binaries in {where}, or leave out --from to let "
                    "labkit build them.",
                )
            say(f"  ignoring {message}")
        if match is None:
            if explicit is not None:
                raise LabkitError(
                    f"{explicit / binary} was not found.",
                    hint=f"The folder given with --from must hold {', '.join(group.binaries)} "
                    f"at {group.name} {group.version}.",
                )
            return None
        found[binary] = match
    return found


def _link_local(group: BinaryGroup, found: dict[str, Path]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{group.key}-", dir=bin_root()))
    for binary, path in found.items():
        (staging / binary).symlink_to(path)
    folders = sorted({str(p.parent) for p in found.values()})
    _publish(group, staging, "local", "linked from " + ", ".join(folders))


# --------------------------------------------------------------------------- source 2: build

def _go_version(go: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"go(\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    if not match:
        return None
    return tuple(int(x or 0) for x in match.groups())


def _version_ldflags(group: BinaryGroup) -> str:
    """Stamp the release version into the binaries, as upstream's release build does.

    The API server derives its emulation and compatibility versions from this, and
    ``kubectl version`` and the Node objects show it, so it must be the real one.
    """
    if group.name != "kubernetes":
        return "-s -w"
    major, minor, _ = group.bare_version.split(".")
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={group.version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


def go_build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",  # never fetch another toolchain behind the user's back
        GOFLAGS="-mod=readonly",  # go.sum is the pin: fail rather than change it
        CGO_ENABLED="0",  # static binaries, as upstream releases them
    )
    return env


def build_group(group: BinaryGroup, say: Say) -> str:
    """Build the group from its pinned Go module; returns a description of the build."""
    go = shutil.which("go")
    if go is None:
        raise _SourceUnavailable("no Go toolchain (`go`) on PATH")
    have = _go_version(go)
    need = tuple(int(x) for x in pins().go_minimum.split("."))
    if have is None or have < need:
        shown = ".".join(map(str, have)) if have else "unknown"
        raise _SourceUnavailable(f"Go {shown} is older than the Go {pins().go_minimum} these modules need")

    env = go_build_env()
    with tempfile.TemporaryDirectory(prefix=f"labkit-build-{group.key}-") as work:
        workdir = Path(work)
        for name in ("go.mod", "go.sum"):
            shutil.copy(group.gobuild_dir / name, workdir / name)
        staging = Path(tempfile.mkdtemp(prefix=f".{group.key}-", dir=bin_root()))
        try:
            _fetch_modules(go, workdir, env, group)
            total = _count_packages(go, workdir, env, group)
            progress = Progress(f"  building {group.name} {group.version}", total)
            cmd = [
                go, "build", "-v", "-trimpath",
                "-ldflags", _version_ldflags(group),
                "-o", str(staging) + os.sep,
                *group.packages,
            ]  # fmt: skip
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            output: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                output.append(line)
                name = line.strip()
                if name and " " not in name and not name.startswith("#"):  # one package built
                    progress.update(advance=1)
            if proc.wait() != 0:
                raise _SourceUnavailable("`go build` failed:\n" + _tail("".join(output)))
            _rename_outputs(group, staging)
            progress.update(done=progress.total or progress.done)
            progress.finish("done")
            _publish(group, staging, "built", f"built from Go module {group.module} {group.version}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return "built from the pinned Go modules"


def _fetch_modules(go: str, workdir: Path, env: dict[str, str], group: BinaryGroup) -> None:
    """`go mod download`, with a progress line while it runs (minutes on a new machine)."""
    progress = Progress(f"  fetching the Go modules of {group.module} {group.version}")
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen([go, "mod", "download"], cwd=workdir, env=env,
                                stdout=subprocess.DEVNULL, stderr=errors, text=True)  # fmt: skip
        while proc.poll() is None:
            progress.update(detail="downloading")
            time.sleep(0.5)
        if proc.returncode != 0:
            errors.seek(0)
            raise _SourceUnavailable("could not fetch the Go modules:\n" + _tail(errors.read()))
    progress.finish("done")


def _rename_outputs(group: BinaryGroup, staging: Path) -> None:
    """`go build -o dir/` names a binary after its package path (``.../server/v3`` -> ``server``)."""
    for package, binary in zip(group.packages, group.binaries):
        elements = package.split("/")
        default = elements[-2] if re.fullmatch(r"v\d+", elements[-1]) else elements[-1]
        built = staging / default
        if built.name != binary and built.exists():
            built.rename(staging / binary)
        if not (staging / binary).exists():
            raise _SourceUnavailable(f"the build did not produce {binary}")


def _count_packages(go: str, workdir: Path, env: dict[str, str], group: BinaryGroup) -> int | None:
    out = subprocess.run(
        [go, "list", "-deps", *group.packages], cwd=workdir, env=env, capture_output=True, text=True
    )
    return len(out.stdout.split()) if out.returncode == 0 else None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- source 3: download

def _mirror_url(url: str) -> str:
    """``$LABKIT_RELEASE_MIRROR`` serves the release archives from one folder (a classroom cache)."""
    mirror = os.environ.get("LABKIT_RELEASE_MIRROR")
    return f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[-1]}" if mirror else url


def download_group(group: BinaryGroup, say: Say) -> str:
    plat = current_platform()
    pinned = group.checksums.get(plat, "")
    url = _mirror_url(group.download_url(plat))
    if ":" not in pinned:
        raise _SourceUnavailable(
            f"no checksum is pinned for {group.name} {group.version} on {plat} in versions.toml, "
            "and labkit does not install unverified downloads"
        )
    algorithm, expected = pinned.split(":", 1)
    staging = Path(tempfile.mkdtemp(prefix=f".{group.key}-", dir=bin_root()))
    try:
        with tempfile.TemporaryFile() as archive:
            digest = hashlib.new(algorithm)
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    size = int(response.headers.get("Content-Length") or 0)
                    progress = Progress(f"  downloading {url}", (size // 2**20) or None)
                    read = 0
                    while chunk := response.read(1 << 20):
                        archive.write(chunk)
                        digest.update(chunk)
                        read += len(chunk)
                        progress.update(done=read // 2**20)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise _SourceUnavailable(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None
            progress.finish(f"{read / 2**20:.0f} MiB")
            if digest.hexdigest() != expected.lower():
                raise _SourceUnavailable(
                    f"{url} does not match its pinned {algorithm} checksum "
                    f"(got {digest.hexdigest()[:16]}..., pinned {expected[:16]}...); nothing was installed"
                )
            archive.seek(0)
            _extract(group, archive, staging)
        _publish(group, staging, "downloaded", f"downloaded from {url}, {algorithm} verified")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return f"downloaded and verified ({algorithm})"


def _extract(group: BinaryGroup, archive, staging: Path) -> None:
    """Copy just the group's binaries out of a release tarball, by file name."""
    wanted = set(group.binaries)
    try:
        with tarfile.open(fileobj=archive, mode="r:*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in wanted:
                    source = tar.extractfile(member)
                    assert source is not None
                    target = staging / name
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
                    target.chmod(0o755)
                    wanted.discard(name)
    except tarfile.TarError as exc:
        raise _SourceUnavailable(f"the release archive is not a readable tarball: {exc}") from None
    if wanted:
        raise _SourceUnavailable(f"the release archive lacks {', '.join(sorted(wanted))}")


# --------------------------------------------------------------------------- install

class _SourceUnavailable(Exception):
    """One source could not provide a group; the next one is tried."""


def install(
    explicit: Path | None = None,
    *,
    force: bool = False,
    build: bool = True,
    download: bool = True,
    say: Say = _quiet,
) -> Toolset:
    """Make every pinned binary available in the cache; return where they are."""
    explicit = explicit or (Path(os.environ["LABKIT_BIN_DIR"]) if os.environ.get("LABKIT_BIN_DIR") else None)
    all_pins = pins()
    bin_root().mkdir(parents=True, exist_ok=True)
    with _install_lock():
        for group in all_pins.groups:
            _install_group(group, explicit, force=force, build=build, download=download, say=say)
    return toolset(all_pins)


def _install_group(
    group: BinaryGroup, explicit: Path | None, *, force: bool, build: bool, download: bool, say: Say
) -> None:
    # An explicit folder is a statement of intent: it replaces whatever the cache holds.
    manifest = None if force or explicit is not None else cached(group)
    if manifest is not None:
        say(f"{group.name} {group.version}: cached in {group_dir(group)} ({manifest['detail']})")
        return
    started = time.monotonic()
    tried: list[str] = []
    local = find_local(group, explicit, say)
    if local is not None:
        _link_local(group, local)
        say(f"{group.name} {group.version}: using local binaries ({cached(group)['detail']})")
        return
    tried.append(f"a local copy: none of version {group.version} in " + (str(explicit) if explicit else "PATH"))
    for name, enabled, provider in (("build", build, build_group), ("download", download, download_group)):
        if not enabled:
            tried.append(f"{name}: switched off")
            continue
        try:
            how = provider(group, say)
        except _SourceUnavailable as exc:
            tried.append(f"{name}: {exc}")
            say(f"  {name} unavailable: {str(exc).splitlines()[0]}")
            continue
        say(f"{group.name} {group.version}: {how} in {format_duration(time.monotonic() - started)} "
            f"-> {group_dir(group)}")
        return
    raise LabkitError(_nothing_worked(group, tried))


def _nothing_worked(group: BinaryGroup, tried: list[str]) -> str:
    p = pins()
    listed = "\n".join(f"  - {line}" for line in tried)
    return (
        f"labkit could not provide the {group.name} {group.version} binaries the sandbox needs.\n"
        f"It tried:\n{listed}\n\n"
        "Provide them in one of three ways: (1) put kube-apiserver, kube-controller-manager, "
        f"kube-scheduler and kubectl {p.kubernetes.version} and etcd {p.etcd.version} in a folder "
        "(or on PATH) and run `labkit sandbox install --from FOLDER` (with conda: "
        f"`conda install -c conda-forge kubernetes-server={p.kubernetes.bare_version} "
        f"kubernetes-client={p.kubernetes.bare_version} etcd={p.etcd.bare_version}`); "
        f"(2) install Go {p.go_minimum} or newer with access to a Go module proxy and run "
        "`labkit sandbox install`, which builds them from the pinned modules; or (3) give this "
        "machine access to the official release downloads (or set $LABKIT_RELEASE_MIRROR to a "
        "folder that serves the release archives) with their checksums pinned in versions.toml."
    )


class _install_lock:
    """One install at a time per cache, so parallel graders do not build twice."""

    def __enter__(self) -> None:
        self._file = open(bin_root() / ".install.lock", "w")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def toolset(all_pins: Pins | None = None) -> Toolset:
    """The installed binaries; raises a helpful error if they are not installed yet."""
    all_pins = all_pins or pins()
    paths: dict[str, Path] = {}
    sources: dict[str, str] = {}
    for group in all_pins.groups:
        manifest = cached(group)
        if manifest is None:
            raise LabkitError(
                f"The sandbox binaries ({group.name} {group.version}) are not installed.",
                hint="Run `labkit sandbox install` (or `make setup`).",
            )
        for binary in group.binaries:
            paths[binary] = group_dir(group) / binary
            sources[binary] = manifest["detail"]
    return Toolset(paths, sources)


def ensure(say: Say = _quiet) -> Toolset:
    """The installed binaries, installing them first if needed."""
    try:
        return toolset()
    except LabkitError:
        return install(say=say)
