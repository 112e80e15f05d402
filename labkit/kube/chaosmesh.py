"""Chaos Mesh's API, as the labs write its experiments and the sandbox's node agent carries them out."""

GROUP, VERSION = "chaos-mesh.org", "v1alpha1"
GROUP_VERSION = f"{GROUP}/{VERSION}"
PLURALS = {"PodChaos": "podchaos", "NetworkChaos": "networkchaos", "StressChaos": "stresschaos"}
FINALIZER = "chaos-mesh/records"  # what Chaos Mesh's controller holds an experiment with until its faults are gone


def path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
    """The API path of ``kind``'s experiments (in ``namespace``; the one called ``name``)."""
    base = f"/apis/{GROUP_VERSION}" + (f"/namespaces/{namespace}" if namespace else "") + f"/{PLURALS[kind]}"
    return f"{base}/{name}" if name else base
