"""A graded run's place: a namespace on the grading cluster, a trainee's account in it, and a private folder.

Both kernels of a graded run (``labkit.course.execute``) work in one fresh namespace,
labelled as a lab's. The trainee's kernel acts there as a trainee does on JupyterHub:
as the ServiceAccount ``trainee`` of that namespace, with the Role, quota and read
access to nodes that ``labkit course trainees`` gives a class (``labkit.hub``), through
a kubeconfig with its token. So it can change nothing outside its namespace, nor forge
what only controllers write (a Deployment's status); the grader's kernel keeps the
grading cluster's own credentials. The private folder holds what the trainee's kernel
may write besides its submission's folder: that kubeconfig, the kernel's connection
file and sockets, its home.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

import yaml

from labkit import hub
from labkit.course import confine
from labkit.errors import LabkitError
from labkit.kube.client import APPLY_PATCH
from labkit.kube.config import Cluster, connect
from labkit.kube.errors import NotFound
from labkit.lab import LAB_LABEL, RUN_LABEL, slug
from labkit.manifests import Kinds

TOKEN_SECONDS = 4 * 3600  # the trainee account's token lasts longer than any lab's grading


class Workspace:
    """A graded run's namespace, trainee account and private folder (see the module's docstring)."""

    def __init__(self, lab: str, warn: Callable[[str], None] = print) -> None:
        self.warn = warn
        self.cluster: Cluster = connect(say=lambda _: None)
        self.run = secrets.token_hex(3)
        self.namespace = f"{slug(lab)[:40]}-g{self.run}"
        self.folder = confine.private_folder("trainee-")
        for name in ("home", "tmp"):
            (self.folder / name).mkdir()
        self.cleanup: list[str] = [f"/api/v1/namespaces/{self.namespace}"]
        body = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": self.namespace, "labels": {LAB_LABEL: slug(lab), RUN_LABEL: self.run,
                                                                "labkit.io/graded": "true"}}}  # fmt: skip
        self.cluster.request("POST", "/api/v1/namespaces", body)
        try:
            self._account()
        except LabkitError:
            self.close()
            raise

    def _account(self) -> None:
        kinds = Kinds(self.cluster)
        for obj in hub.account(self.namespace, suffix=self.namespace):
            kind = kinds.of(obj["apiVersion"], obj["kind"])
            path = kind.path(obj["metadata"].get("namespace"), obj["metadata"]["name"])
            self.cluster.request("PATCH", path, obj, content_type=APPLY_PATCH, query={"fieldManager": "labkit-grader", "force": "true"})
            if obj["kind"].endswith("Binding") and obj["metadata"].get("namespace") != self.namespace:
                self.cleanup.append(path)  # the rest goes with the namespace
        answer = self.cluster.request("POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/trainee/token",
                                      {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                       "spec": {"expirationSeconds": TOKEN_SECONDS}})  # fmt: skip
        self.kubeconfig.write_text(yaml.safe_dump(self._kubeconfig(answer["status"]["token"])))
        self.kubeconfig.chmod(0o600)

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    def _kubeconfig(self, token: str) -> dict:
        """A kubeconfig for the trainee's account: the grading cluster's server and CA (inline), the token."""
        document = yaml.safe_load(self.cluster.kubeconfig.read_text()) if self.cluster.kubeconfig else {}
        context = next(c["context"] for c in document["contexts"] if c["name"] == document["current-context"])
        cluster = dict(next(c["cluster"] for c in document["clusters"] if c["name"] == context["cluster"]))
        if "certificate-authority" in cluster:  # a file the trainee's kernel may not see: inline
            authority = (self.cluster.kubeconfig.parent / cluster.pop("certificate-authority")).read_bytes()
            cluster["certificate-authority-data"] = base64.b64encode(authority).decode()
        return {"apiVersion": "v1", "kind": "Config", "current-context": "trainee",
                "clusters": [{"name": "grading", "cluster": cluster}],
                "users": [{"name": "trainee", "user": {"token": token}}],
                "contexts": [{"name": "trainee", "context": {"cluster": "grading", "user": "trainee",
                                                             "namespace": self.namespace}}]}  # fmt: skip

    def trainee_env(self) -> dict[str, str]:
        """The trainee's kernel's environment: its account's kubeconfig, the namespace, a home of its own."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "LABKIT_CLUSTER": "kubeconfig",
                "LABKIT_NAMESPACE": self.namespace, "LABKIT_GRADING": "1", "HOME": str(self.folder / "home"),
                "IPYTHONDIR": str(self.folder / "home" / ".ipython"), "TMPDIR": str(self.folder / "tmp")}  # fmt: skip

    def grader_env(self) -> dict[str, str]:
        """The grader's kernel's: the grading cluster's own credentials, the same namespace."""
        return {**os.environ, "LABKIT_NAMESPACE": self.namespace, "LABKIT_GRADING": "1", "LABKIT_GRADER": "1"}

    def close(self) -> None:
        """Delete what the run made on the cluster (its namespace, and the bindings outside it) and the folder."""
        for path in self.cleanup:
            try:
                self.cluster.request("DELETE", path)
            except NotFound:
                pass
            except LabkitError as exc:
                self.warn(f"{path} could not be deleted: {exc}")
        shutil.rmtree(self.folder, ignore_errors=True)
