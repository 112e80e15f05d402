"""A class's cluster for JupyterHub on Kubernetes: a namespace per trainee.

``manifests(["alice", "bob"])`` is the YAML that prepares the cluster before a
class (``labkit course trainees alice bob | kubectl apply -f -``): for each
trainee, from ``trainee.yaml``, a namespace ``lab-<name>``, the ServiceAccount
``trainee`` that KubeSpawner runs their JupyterLab pod as, a Role allowing what
the labs make there, a quota and default requests; and once, from ``class.yaml``,
read access to Nodes and node Leases for all of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from labkit.errors import LabkitError

TEMPLATES = Path(__file__).parent
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS label, as a namespace's name must be


def namespace_of(trainee: str, prefix: str = "lab-") -> str:
    name = prefix + trainee
    if not LABEL.match(name) or len(name) > 63:
        raise LabkitError(f"{name!r} cannot name a namespace: lowercase letters, digits and '-', at most 63 characters.",
                          hint="Use the names KubeSpawner gives your users' namespaces (user_namespace_template).")  # fmt: skip
    return name


def manifests(trainees: list[str], prefix: str = "lab-") -> str:
    """The YAML (several documents) that gives each trainee a namespace, and the class its shared read access."""
    if not trainees:
        raise LabkitError("Name at least one trainee.", hint="`labkit course trainees alice bob | kubectl apply -f -`")
    namespaces = [namespace_of(t, prefix) for t in dict.fromkeys(trainees)]
    template = (TEMPLATES / "trainee.yaml").read_text()
    documents = [template.replace("NAMESPACE", namespace) for namespace in namespaces]
    subjects = json.dumps([{"kind": "ServiceAccount", "name": "trainee", "namespace": n} for n in namespaces])
    documents.append((TEMPLATES / "class.yaml").read_text().replace("SUBJECTS", subjects))  # JSON is YAML
    return "---\n".join(documents)
