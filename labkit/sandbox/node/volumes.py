"""A pod's volumes, materialised as folders in the pod's directory and bind-mounted into its containers.

emptyDir, configMap, secret, downwardAPI, projected (including the ServiceAccount
token every pod gets) and hostPath are honoured. ConfigMap, Secret, downward API
and projected volumes are written the way the kubelet's atomic writer writes
them (a timestamped folder behind a ``..data`` symlink, and one symlink per
entry), and refreshed while the pod runs, so an edited ConfigMap shows up in the
mounted files after a while but never in environment variables, as on a real
node. Any other volume type fails to mount with a clear event, and the pod stays
in ContainerCreating, as a kubelet that cannot mount a volume leaves it.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from labkit.sandbox.node import envvars

TOKEN_SECONDS = 3607  # the kubelet's default projected token lifetime
REFRESH_EVERY = 10.0  # the kubelet syncs configMap/secret volumes about once a minute; the sandbox is quicker

Lookup = envvars.Lookup
TokenRequest = Callable[[str, dict], dict]  # (service account, TokenRequest spec) -> TokenRequest status


class MountError(Exception):
    """A volume cannot be set up (FailedMount)."""


class PodVolumes:
    """The volumes of one pod: set up before its containers start, refreshed while it runs."""

    def __init__(self, pod: dict, folder: Path, lookup: Lookup, token: TokenRequest, allocatable: dict) -> None:
        self.pod = pod
        self.folder = folder
        self.lookup = lookup
        self.token = token
        self.allocatable = allocatable
        self.ready: set[str] = set()
        self.refreshed = 0.0
        self.tokens: dict[str, tuple[str, float]] = {}  # path -> (token, renew at)

    def specs(self) -> list[dict]:
        return self.pod["spec"].get("volumes", [])

    def source(self, name: str) -> Path:
        volume = next((v for v in self.specs() if v["name"] == name), None)
        if volume is None:
            raise MountError(f'volume "{name}" is not defined in the pod\'s spec')
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"])
        return self.folder / name

    def setup(self) -> None:
        """Materialise every volume not yet ready; MountError names the first that cannot be."""
        for volume in self.specs():
            if volume["name"] not in self.ready:
                self._materialise(volume)
                self.ready.add(volume["name"])
        self.refreshed = time.monotonic()

    def refresh(self) -> None:
        """Re-write the API-backed volumes (a changed ConfigMap reaches the files), at most every few seconds."""
        if time.monotonic() - self.refreshed < REFRESH_EVERY:
            return
        self.refreshed = time.monotonic()
        for volume in self.specs():
            if volume["name"] in self.ready and not {"emptyDir", "hostPath"} & set(volume):
                try:
                    self._materialise(volume)
                except MountError:
                    pass  # keep the last good content, as the kubelet does

    def mounts(self, container: dict) -> list[dict]:
        """The bind mounts of one container: {path, source, readOnly}; subPath binds one entry."""
        result = []
        for mount in container.get("volumeMounts", []):
            source = self.source(mount["name"])
            sub = mount.get("subPath")
            if sub:
                if os.path.isabs(sub) or ".." in Path(sub).parts:
                    raise MountError(f"subPath {sub!r} must be a relative path without '..'")
                target = source / sub
                if not target.exists():
                    target.mkdir(parents=True)
                source = target.resolve()
            read_only = bool(mount.get("readOnly")) or self._read_only(mount["name"])
            result.append({"path": mount["mountPath"], "source": str(source), "readOnly": read_only})
        return result

    def _read_only(self, name: str) -> bool:
        volume = next(v for v in self.specs() if v["name"] == name)
        return bool({"configMap", "secret", "downwardAPI", "projected"} & set(volume))

    # -- each type ---------------------------------------------------------------------------

    def _materialise(self, volume: dict) -> None:
        name = volume["name"]
        target = self.folder / name
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
        elif "hostPath" in volume:
            self._host_path(volume["hostPath"])
        elif "configMap" in volume:
            self._write(target, self._object_files("configmaps", volume["configMap"]), volume["configMap"])
        elif "secret" in volume:
            ref = {**volume["secret"], "name": volume["secret"].get("secretName", "")}
            self._write(target, self._object_files("secrets", ref), volume["secret"])
        elif "downwardAPI" in volume:
            self._write(target, self._downward_files(volume["downwardAPI"].get("items", [])), volume["downwardAPI"])
        elif "projected" in volume:
            self._write(target, self._projected_files(volume["projected"]), volume["projected"])
        else:
            kind = next((k for k in volume if k != "name"), "unknown")
            raise MountError(f'volume "{name}": the sandbox cannot mount {kind} volumes (emptyDir, configMap, '
                             "secret, downwardAPI, projected and hostPath work)")  # fmt: skip

    @staticmethod
    def _host_path(spec: dict) -> None:
        path, kind = Path(spec["path"]), spec.get("type", "")
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate" and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif kind == "Directory" and not path.is_dir():
            raise MountError(f"hostPath type check failed: {path} is not a directory")
        elif kind == "File" and not path.is_file():
            raise MountError(f"hostPath type check failed: {path} is not a file")
        elif not path.exists() and kind not in ("", "DirectoryOrCreate", "FileOrCreate"):
            raise MountError(f"hostPath type check failed: {path} does not exist")
        elif not path.exists():
            path.mkdir(parents=True)  # an unset type creates a missing directory, as the kubelet does

    def _object_files(self, kind: str, ref: dict) -> dict[str, tuple[bytes, int | None]]:
        try:
            obj = self.lookup(kind, ref["name"])
        except envvars.ConfigError as exc:  # the API server could not be asked, or refused
            raise MountError(str(exc)) from exc
        label = "configmap" if kind == "configmaps" else "secret"
        if obj is None:
            if ref.get("optional"):
                return {}
            raise MountError(f'{label} "{ref["name"]}" not found')
        data = {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        if kind == "secrets":
            data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        else:
            data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
        items = ref.get("items")
        if not items:
            return {key: (value, None) for key, value in data.items()}
        files = {}
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise MountError(f"configmap references non-existent config key: {item['key']}"
                                 if kind == "configmaps" else f"references non-existent secret key: {item['key']}")  # fmt: skip
            files[item["path"]] = (data[item["key"]], item.get("mode"))
        return files

    def _downward_files(self, items: list[dict]) -> dict[str, tuple[bytes, int | None]]:
        files = {}
        for item in items:
            try:
                if "fieldRef" in item:
                    value = envvars.field_value(self.pod, item["fieldRef"]["fieldPath"])
                else:
                    value = envvars.resource_value(self.pod, item["resourceFieldRef"], "", self.allocatable)
            except envvars.ConfigError as exc:
                raise MountError(str(exc)) from exc
            files[item["path"]] = (value.encode(), item.get("mode"))
        return files

    def _projected_files(self, spec: dict) -> dict[str, tuple[bytes, int | None]]:
        files: dict[str, tuple[bytes, int | None]] = {}
        for source in spec.get("sources", []):
            if "configMap" in source:
                files.update(self._object_files("configmaps", source["configMap"]))
            elif "secret" in source:
                files.update(self._object_files("secrets", source["secret"]))
            elif "downwardAPI" in source:
                files.update(self._downward_files(source["downwardAPI"].get("items", [])))
            elif "serviceAccountToken" in source:
                files[source["serviceAccountToken"]["path"]] = (self._token(source["serviceAccountToken"]), None)
            else:
                raise MountError(f"the sandbox cannot project {next(iter(source), 'this source')}")
        return files

    def _token(self, spec: dict) -> bytes:
        """A bound ServiceAccount token for the pod (TokenRequest), renewed at 80% of its life."""
        path = spec["path"]
        token, renew_at = self.tokens.get(path, ("", 0.0))
        if token and time.time() < renew_at:
            return token.encode()
        seconds = int(spec.get("expirationSeconds", TOKEN_SECONDS))
        meta = self.pod["metadata"]
        request = {
            "audiences": [spec["audience"]] if spec.get("audience") else [],
            "expirationSeconds": seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        account = self.pod["spec"].get("serviceAccountName") or "default"
        try:
            status = self.token(account, request)
        except Exception as exc:  # noqa: BLE001 - any API failure is a mount failure, retried later
            raise MountError(f'failed to fetch token: serviceaccounts "{account}": {exc}') from exc
        self.tokens[path] = (status["token"], time.time() + 0.8 * seconds)
        return status["token"].encode()

    # -- the atomic writer -------------------------------------------------------------------

    @staticmethod
    def _write(target: Path, files: dict[str, tuple[bytes, int | None]], spec: dict) -> None:
        """Publish ``files`` under ``target`` atomically, only when they changed."""
        default_mode = spec.get("defaultMode", 0o644)
        current = target / "..data"
        if current.exists() and _same(current, files, default_mode):
            return
        target.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("..%Y_%m_%d_%H_%M_%S.%f")
        fresh = target / stamp
        for rel, (content, mode) in files.items():
            path = fresh / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode if mode is not None else default_mode)
        fresh.mkdir(exist_ok=True)
        link = target / "..data_tmp"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(stamp)
        old = os.readlink(current) if current.is_symlink() else None
        os.replace(link, current)
        for top in {Path(rel).parts[0] for rel in files}:
            entry = target / top
            if not entry.is_symlink():
                entry.symlink_to(Path("..data") / top)
        for entry in target.iterdir():
            name = entry.name
            if not name.startswith("..") and name not in {Path(rel).parts[0] for rel in files}:
                entry.unlink()  # a key that was removed from the ConfigMap
        if old and old != stamp:
            shutil.rmtree(target / old, ignore_errors=True)


def _same(current: Path, files: dict[str, tuple[bytes, int | None]], default_mode: int) -> bool:
    existing = {str(p.relative_to(current)) for p in current.rglob("*") if p.is_file()}
    if existing != set(files):
        return False
    for rel, (content, mode) in files.items():
        path = current / rel
        if path.read_bytes() != content or (path.stat().st_mode & 0o777) != (mode if mode is not None else default_mode):
            return False
    return True
