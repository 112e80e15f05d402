"""One sandbox's state folder: what is in it, and whether it can be trusted.

``<state>/sandboxes/<name>/`` holds::

    sandbox.json        name, format, pinned versions, ports (written by labkit)
    kubeconfig          admin kubeconfig (certificates embedded)
    pki/                certificates and keys (see pki.py)
    etc/                the components' own kubeconfigs
    etcd/               etcd's data: the cluster state that survives down/up
    logs/               one log per component, and the supervisor's
    run/                the supervisor's lock, component list and status
    pods/               each node's pods (volumes, container scratch, logs): a link to a
                        folder in memory where there is one (``paths.runtime_root``)

Anything that does not look like this is refused with a message that names the
problem and the ``--purge`` way out, rather than guessed at.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from labkit.errors import LabkitError
from labkit.paths import runtime_root, sandboxes_root, state_root
from labkit.sandbox.pki import PKI

FORMAT = 1
DEFAULT_NAME = "default"
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise LabkitError(
            f"{name!r} is not a valid sandbox name.",
            hint="Use 1 to 40 lowercase letters, digits and '-', starting and ending with a letter or digit.",
        )
    return name


class SandboxState:
    """The folder of the sandbox called ``name``."""

    def __init__(self, name: str = DEFAULT_NAME) -> None:
        self.name = validate_name(name)
        self.root = sandboxes_root() / name
        self.config_file = self.root / "sandbox.json"
        self.kubeconfig = self.root / "kubeconfig"
        self.pki = PKI(self.root / "pki")
        self.etc = self.root / "etc"
        self.etcd_data = self.root / "etcd"
        self.logs = self.root / "logs"
        self.run = self.root / "run"
        self.pods = self.root / "pods"

    @property
    def egress_socket(self) -> Path:
        """The node agent's socket through which the API server reaches pods, Services and nodes (a Unix socket's
        path has at most 107 bytes: a deep state folder's is replaced by one under the temporary folder)."""
        path = self.run / "egress.sock"
        if len(str(path).encode()) <= 100:
            return path
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"labkit-egress-{digest}.sock"

    # -- reading -------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.root.exists()

    def purge_hint(self) -> str:
        flag = "" if self.name == DEFAULT_NAME else f" --name {self.name}"
        return (
            f"To start over, run `labkit sandbox down{flag} --purge` (this deletes the sandbox's "
            f"cluster state) and then `labkit sandbox up{flag}`."
        )

    def load(self) -> dict | None:
        """The sandbox's config, None for a sandbox never created; raises if the folder is wrong."""
        if not self.root.exists():
            return None
        if not self.root.is_dir():
            raise LabkitError(f"{self.root} should be the sandbox's folder but is a file.", hint=self.purge_hint())
        if not self.config_file.exists():
            if not any(self.root.iterdir()):
                return None
            raise LabkitError(
                f"{self.root} exists but is not a labkit sandbox folder (it has no sandbox.json).",
                hint="If you put other files there, move them away. " + self.purge_hint(),
            )
        try:
            config = json.loads(self.config_file.read_text())
        except (OSError, ValueError) as exc:
            raise LabkitError(
                f"The sandbox's {self.config_file} is corrupt ({exc}).", hint=self.purge_hint()
            ) from None
        problem = self._check(config)
        if problem:
            raise LabkitError(f"The sandbox's {self.config_file} {problem}.", hint=self.purge_hint())
        return config

    def _check(self, config: object) -> str | None:
        if not isinstance(config, dict):
            return "is not a JSON object"
        if config.get("format") != FORMAT:
            return f"has format {config.get('format')!r}; this labkit reads format {FORMAT}"
        if config.get("name") != self.name:
            return f"belongs to a sandbox named {config.get('name')!r}, not {self.name!r}"
        ports = config.get("ports")
        if not isinstance(ports, dict) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports.values()):
            return "has no valid port list"
        return None

    def ensure_pods(self) -> None:
        """Make the pods' folder: a link to a folder of this sandbox's in the runtime root (memory)
        where there is one, else a folder here. A link whose folder is gone (after a reboot) is renewed."""
        if self.pods.is_dir():
            return
        if self.pods.is_symlink():
            self.pods.unlink()
        runtime = runtime_root()
        if runtime is None:
            self.pods.mkdir(parents=True)
            return
        key = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]
        target = runtime / f"{self.name}-{key}"
        target.mkdir(parents=True, exist_ok=True)
        self.pods.symlink_to(target, target_is_directory=True)

    def remove(self) -> None:
        """Delete the whole state, the pods' folder in the runtime root included."""
        if self.pods.is_symlink() and self.pods.resolve().is_dir():
            remove_tree(self.pods.resolve())
        remove_tree(self.root)

    def save(self, config: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        tmp.replace(self.config_file)

    def new_config(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": {},
            "ports": {},
        }

    def status(self) -> dict | None:
        try:
            return json.loads((self.run / "status.json").read_text())
        except (OSError, ValueError):
            return None

    # -- the supervisor's liveness --------------------------------------------------------------

    def supervisor_pid(self) -> int | None:
        """The live supervisor's PID, judged by its lock rather than by a PID file."""
        lock_file = self.run / "supervisor.lock"
        if not lock_file.exists():
            return None
        with open(lock_file, "r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None

    @contextmanager
    def operation(self) -> Iterator[None]:
        """Serialise up/down on one sandbox (two terminals, or two graders, at once)."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root.parent / f".{self.name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def all_sandboxes() -> list[SandboxState]:
    root = sandboxes_root()
    if not root.is_dir():
        return []
    return [SandboxState(p.name) for p in sorted(root.iterdir()) if p.is_dir() and NAME_RE.match(p.name)]


@contextmanager
def port_lock() -> Iterator[None]:
    """Port choice is a machine-wide decision: one sandbox at a time picks."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".ports.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ports_of_others(name: str) -> set[int]:
    taken: set[int] = set()
    for other in all_sandboxes():
        if other.name == name:
            continue
        try:
            config = json.loads(other.config_file.read_text())
            taken.update(int(p) for p in config.get("ports", {}).values())
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return taken


def remove_tree(path: Path) -> None:
    """Delete a folder, including read-only files etcd or a component may leave."""
    import shutil

    def onerror(func, target, _exc):  # type: ignore[no-untyped-def]
        os.chmod(target, 0o700)
        func(target)

    shutil.rmtree(path, onerror=onerror)
