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

import yaml

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


def account(namespace: str, *, suffix: str) -> list[dict]:
    """What one trainee's namespace holds and may reach, as objects, for a namespace that exists already (a
    grading run's): the ServiceAccount ``trainee``, its Role and quota from ``trainee.yaml``, and the class's read
    access from ``class.yaml`` bound to it alone, under names ending in ``suffix`` (runs at once never share
    a binding)."""
    template = (TEMPLATES / "trainee.yaml").read_text().replace("NAMESPACE", namespace)
    objects = [o for o in yaml.safe_load_all(template) if o and o["kind"] != "Namespace"]
    subjects = json.dumps([{"kind": "ServiceAccount", "name": "trainee", "namespace": namespace}])
    for obj in yaml.safe_load_all((TEMPLATES / "class.yaml").read_text().replace("SUBJECTS", subjects)):
        if obj and obj["kind"].endswith("Binding"):
            obj["metadata"]["name"] += f"-{suffix}"
        objects.append(obj)
    return objects
