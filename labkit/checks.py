"""Checks for graded cells: each looks at the cluster (or an answer) and either says what is right or
raises ``CheckFailed`` saying what is wrong and how to fix it.

The same calls serve a trainee's "check my work" cell and nbgrader's hidden test
cells: a passing check prints one line starting with ✔, a failing one raises an
AssertionError (nbgrader's failed test), whose message a trainee can act on:
what was expected, what the cluster shows, and a hint.

    checks.deployment(lab, "web", replicas=3, image="labkit/web:1.0")
    checks.answer("placement_component", "kube-scheduler", hint="Which component watches for unbound pods?")
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from labkit import display, readiness
from labkit.errors import LabkitError
from labkit.kube import quantity


class CheckFailed(AssertionError):
    """A check that did not pass: what is wrong, and a hint to fix it."""

    def __init__(self, problem: str, hint: str | None = None) -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}\nHint: {hint}" if hint else problem)

    def _render_traceback_(self) -> list[str]:
        """In a notebook: what is wrong and the hint, without the traceback of the check's own code."""
        return display.error_lines(self.problem, f"Hint: {self.hint}" if self.hint else None)


def passed(message: str) -> None:
    print(f"✔ {message}", flush=True)


def _fail(problem: str, hint: str | None = None) -> None:
    raise CheckFailed(problem, hint)


# -- answers ------------------------------------------------------------------------------------

_graded: dict[str, Any] | None = None  # when graded: the trainee's answers, as values read from their kernel


def grading_answers(values: dict[str, Any] | None) -> None:
    """The grader's: answers are read from ``values`` (None: from the notebook's variables again)."""
    global _graded
    _graded = values


def given(name: str) -> Any:
    """The trainee's answer ``name``: the notebook's variable of that name (when graded, its value as the
    grader read it from the trainee's kernel). Fails, saying what to do, when there is no answer yet or it is
    not a plain value."""
    return _given(name, sys._getframe(1).f_globals)


def _given(name: str, scope: dict) -> Any:
    from labkit.course.answers import MISSING, NotPlain

    value = (_graded if _graded is not None else scope).get(name, MISSING)
    if value is MISSING or value is Ellipsis:
        _fail(f"`{name}` has no answer yet.", f"Set `{name} = ...` in the answer cell above this check, and run it.")
    if isinstance(value, NotPlain):
        _fail(f"`{name}` is a {value.type} object, not a value.",
              f"Give `{name}` a plain value: a number, a string, a list or a dict of those.")  # fmt: skip
    return value


def answer(name: str, expected: Any, *, also: tuple = (), hint: str | None = None,
           normalise: Callable[[Any], Any] | None = None, feedback: str | None = None) -> None:  # fmt: skip
    """The trainee's variable ``name`` (in the notebook's globals) equals ``expected`` (or one of ``also``).

    Strings compare without case and surrounding spaces unless ``normalise`` says otherwise;
    ``feedback`` is said when it is right (the why behind the answer)."""
    # the notebook's namespace (inspect.stack would read every frame's source)
    value = _given(name, sys._getframe(1).f_globals)
    norm = normalise or _default_normalise
    if norm(value) not in [norm(v) for v in (expected, *also)]:
        _fail(f"`{name}` is {value!r}, which is not right.", hint)
    passed(f"{name} = {value!r}" + (f": {feedback}" if feedback else ""))


def _default_normalise(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# -- objects ------------------------------------------------------------------------------------


def _object(lab: Any, target: str, hint: str) -> dict:
    try:
        obj = lab.get(target)
    except LabkitError as exc:
        _fail(f"{target} could not be read: {exc}", hint)
    if obj is None:
        _fail(f"There is no {target} in the lab's namespace {lab.namespace}.", hint)
    return obj


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    template = spec.get("template", {}).get("spec") if "template" in spec else spec
    return (template or {}).get("containers", [])


def _container(obj: dict, name: str | None, what: str) -> dict:
    containers = _containers(obj)
    if not containers:
        _fail(f"{what} has no containers.")
    if name is None:
        return containers[0]
    found = next((c for c in containers if c["name"] == name), None)
    if found is None:
        _fail(f"{what} has no container named {name!r} (it has {', '.join(c['name'] for c in containers)}).",
              f"Name the container {name!r} in the pod template.")  # fmt: skip
    return found


def deployment(lab: Any, name: str, *, replicas: int | None = None, image: str | None = None,
               ready: bool = True, container: str | None = None, wait: float = 30) -> None:  # fmt: skip
    """Deployment ``name`` exists with ``replicas`` desired, its (first, or named) container runs
    ``image``, and (``ready``) all its replicas are up to date and ready, waiting up to ``wait`` s."""
    target = f"deployment/{name}"
    obj = _object(lab, target, f"Apply a Deployment named {name!r} (kind: Deployment, metadata.name: {name}).")
    want = obj["spec"].get("replicas", 1)
    if replicas is not None and want != replicas:
        _fail(f"Deployment {name} asks for {want} replicas; the task asks for {replicas}.",
              f"`lab.kubectl('scale deployment {name} --replicas={replicas}')`, or set spec.replicas and apply again.")  # fmt: skip
    if image is not None:
        actual = _container(obj, container, f"Deployment {name}").get("image", "")
        if actual != image:
            _fail(f"Deployment {name} runs image {actual!r}; the task asks for {image!r}.",
                  f"`lab.kubectl('set image deployment/{name} CONTAINER={image}')` changes only the image.")  # fmt: skip
    if ready:
        try:
            lab.wait_ready(target, timeout=wait)
        except LabkitError as exc:
            _fail(f"Deployment {name} is not fully rolled out and ready: {exc.message}", exc.hint)
    passed(f"deployment {name}: {want} replicas" + (f", image {image}" if image else "") + (", all ready" if ready else ""))


def scaled(lab: Any, name: str, *, from_replicas: int, to: int, wait: float = 30) -> None:
    """Deployment ``name`` was scaled from ``from_replicas`` to ``to`` (its controller's Events say so, as ``kubectl
    describe`` shows them) and now runs ``to`` replicas, all ready."""
    step = "down" if to < from_replicas else "up"
    said = [e for e in lab.event_list() if e.get("reason") == "ScalingReplicaSet"
            and f"Scaled {step} replica set {name}-" in (e.get("message") or "")
            and f"from {from_replicas} to {to}" in (e.get("message") or "")]  # fmt: skip
    if not said:
        _fail(f"Deployment {name} was never scaled {'in' if step == 'down' else 'out'} from {from_replicas} to {to} "
              "replicas: its Events show no such step.",
              f"Scale it to {from_replicas} first, then to {to}: "
              f"`lab.kubectl('scale deployment {name} --replicas={to}')`.")  # fmt: skip
    deployment(lab, name, replicas=to, wait=wait)


def configmap(lab: Any, name: str, *, keys: tuple[str, ...] | list[str] = (), values: dict[str, str] | None = None) -> None:
    """ConfigMap ``name`` exists and holds ``keys`` (and those of ``values``, with those values)."""
    obj = _object(lab, f"configmap/{name}", f"Apply a ConfigMap named {name!r}.")
    data = obj.get("data") or {}
    for key in [*keys, *(values or {})]:
        if key not in data:
            _fail(f"ConfigMap {name} has no key {key!r} (it has {', '.join(sorted(data)) or 'no keys'}).",
                  f"Add `{key}: ...` under the ConfigMap's data.")  # fmt: skip
    for key, value in (values or {}).items():
        if data[key] != value:
            _fail(f"ConfigMap {name}'s {key} is {data[key]!r}, not {value!r}.")
    passed(f"configmap {name} holds {', '.join([*keys, *(values or {})]) or 'data'}")


def uses_configmap(lab: Any, name: str, configmap_name: str, *, container: str | None = None) -> None:
    """Deployment ``name``'s container takes configuration from ConfigMap ``configmap_name``: env
    (``valueFrom.configMapKeyRef``), ``envFrom`` or a configMap volume it mounts."""
    obj = _object(lab, f"deployment/{name}", f"Apply a Deployment named {name!r}.")
    c = _container(obj, container, f"Deployment {name}")
    refs = {e.get("valueFrom", {}).get("configMapKeyRef", {}).get("name") for e in c.get("env", [])}
    refs |= {e.get("configMapRef", {}).get("name") for e in c.get("envFrom", [])}
    volumes = {v["name"] for v in obj["spec"]["template"]["spec"].get("volumes", [])
               if v.get("configMap", {}).get("name") == configmap_name}  # fmt: skip
    mounted = volumes & {m["name"] for m in c.get("volumeMounts", [])}
    if configmap_name not in refs and not mounted:
        _fail(f"Deployment {name}'s container does not use ConfigMap {configmap_name}.",
              "Give the container an env entry with valueFrom.configMapKeyRef (name: "
              f"{configmap_name}), an envFrom with configMapRef, or mount it as a volume.")  # fmt: skip
    passed(f"deployment {name} takes its configuration from configmap {configmap_name}")


def readiness_probe(lab: Any, name: str, *, path: str | None = None, port: int | None = None,
                    container: str | None = None) -> None:  # fmt: skip
    """Deployment ``name``'s container has an HTTP readiness probe (on ``path`` and ``port`` if given)."""
    obj = _object(lab, f"deployment/{name}", f"Apply a Deployment named {name!r}.")
    probe = _container(obj, container, f"Deployment {name}").get("readinessProbe")
    if not probe:
        _fail(f"Deployment {name}'s container has no readiness probe.",
              "Add readinessProbe: {httpGet: {path: /readyz, port: 8080}} to the container.")  # fmt: skip
    get = probe.get("httpGet")
    if path is not None or port is not None:
        if not get:
            _fail(f"Deployment {name}'s readiness probe is not an HTTP GET.", "Use readinessProbe.httpGet.")
        if path is not None and get.get("path") != path:
            _fail(f"The readiness probe asks for {get.get('path')!r}; the app answers readiness on {path!r}.")
        if port is not None and get.get("port") not in (port, str(port)):
            named = [p["name"] for p in _container(obj, container, name).get("ports", [])
                     if p.get("containerPort") == port and p.get("name")]  # fmt: skip
            if get.get("port") not in named:
                _fail(f"The readiness probe uses port {get.get('port')!r}; the app listens on {port}.")
    passed(f"deployment {name} has a readiness probe" + (f" on {path}" if path else ""))


def requests(lab: Any, name: str, *, cpu: str | None = None, memory: str | None = None,
             container: str | None = None) -> None:  # fmt: skip
    """Deployment ``name``'s container requests ``cpu`` and ``memory`` (any amount where None)."""
    obj = _object(lab, f"deployment/{name}", f"Apply a Deployment named {name!r}.")
    asked = _container(obj, container, f"Deployment {name}").get("resources", {}).get("requests", {})
    for resource, want in (("cpu", cpu), ("memory", memory)):
        if resource not in asked:
            _fail(f"Deployment {name}'s container requests no {resource}.",
                  f"Add resources.requests.{resource} to the container (for example {want or ('100m' if resource == 'cpu' else '64Mi')}).")  # fmt: skip
        if want is not None and quantity.parse(str(asked[resource])) != quantity.parse(want):
            _fail(f"Deployment {name}'s container requests {asked[resource]} of {resource}; the task asks for {want}.")
    passed(f"deployment {name} requests " + ", ".join(f"{k} {v}" for k, v in asked.items()))


def rollout_strategy(lab: Any, name: str, *, max_surge: int | str, max_unavailable: int | str) -> None:
    """Deployment ``name`` rolls out with these maxSurge and maxUnavailable."""
    obj = _object(lab, f"deployment/{name}", f"Apply a Deployment named {name!r}.")
    strategy = obj["spec"].get("strategy", {})
    rolling = strategy.get("rollingUpdate", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        _fail(f"Deployment {name} uses the {strategy.get('type')} strategy, not RollingUpdate.")
    for key, want in (("maxSurge", max_surge), ("maxUnavailable", max_unavailable)):
        if str(rolling.get(key)) != str(want):
            _fail(f"Deployment {name}'s {key} is {rolling.get(key)!r}; the task asks for {want!r}.",
                  f"Set spec.strategy.rollingUpdate.{key}: {want} and apply again.")  # fmt: skip
    passed(f"deployment {name} rolls out with maxSurge {max_surge} and maxUnavailable {max_unavailable}")


def condition(lab: Any, target: str, kind: str, *, status: str | None = None, reason: str | None = None) -> None:
    """``target`` has the condition ``kind`` (with this status and reason, where given)."""
    obj = _object(lab, target, f"Apply {target} first.")
    found = readiness.condition(obj, kind)
    if not found:
        _fail(f"{target} has no {kind} condition yet.")
    if status is not None and found.get("status") != status:
        _fail(f"{target}'s {kind} condition is {found.get('status')}, not {status} ({found.get('message', '')}).")
    if reason is not None and found.get("reason") != reason:
        _fail(f"{target}'s {kind} condition has reason {found.get('reason')}, not {reason}.")
    passed(f"{target}: {kind}={found.get('status')} ({found.get('reason', '')})")


def same_object(lab: Any, target: str, uid: str | None) -> None:
    """``target`` is still the object whose uid was ``uid``: it was changed in place, not recreated."""
    obj = _object(lab, target, f"Apply {target} first.")
    if uid is None:
        _fail(f"No uid of {target} was recorded.", "Run the cell that records it (after the first task) again.")
    if obj["metadata"]["uid"] != uid:
        _fail(f"{target} is a new object: it was deleted and created again, so its history and its running "
              "pods were thrown away.", "Change only what must change, in place: `kubectl set image`, "
              "`kubectl patch`, or apply the changed manifest.")  # fmt: skip
    passed(f"{target} was updated in place (same object)")


# -- failure and self-healing ---------------------------------------------------------------------


def spread(lab: Any, name: str, *, key: str = "topology.kubernetes.io/zone", at_least: int = 2) -> None:
    """Deployment ``name``'s ready pods run in at least ``at_least`` distinct values of node label ``key``
    (zones by default), so losing one zone's node leaves some serving."""
    hint = (f"Give deployment/{name} more replicas and a topologySpreadConstraint on {key} (maxSkew: 1, "
            "whenUnsatisfiable: ScheduleAnyway) or a preferred podAntiAffinity, then re-apply it.")  # fmt: skip
    obj = _object(lab, f"deployment/{name}", hint)
    zones = {node["metadata"]["name"]: node["metadata"].get("labels", {}).get(key) for node in lab.nodes()}
    pods = [p for p in lab.pods_of(f"deployment/{name}") if readiness.condition(p, "Ready").get("status") == "True"]
    places = sorted({zones.get(p["spec"].get("nodeName"), "?") for p in pods})
    if len(places) < at_least:
        _fail(f"deployment/{name}'s {len(pods)} ready pods run in {len(places)} {key} value(s) ({', '.join(places) or 'none'}): "
              f"one node's loss can take them all.", hint)  # fmt: skip
    template = obj["spec"]["template"]["spec"]
    rules = [c for c in template.get("topologySpreadConstraints") or [] if c.get("topologyKey") == key]
    affinity = (template.get("affinity") or {}).get("podAntiAffinity") or {}
    terms = [*affinity.get("requiredDuringSchedulingIgnoredDuringExecution", []),
             *(t.get("podAffinityTerm", {}) for t in affinity.get("preferredDuringSchedulingIgnoredDuringExecution", []))]  # fmt: skip
    if not rules and not any(t.get("topologyKey") == key for t in terms):
        _fail(f"deployment/{name}'s pods happen to be spread over {len(places)} zones, but nothing in its spec asks "
              "for it: the next rollout may pack them together.", hint)  # fmt: skip
    passed(f"deployment/{name} runs in {len(places)} zones ({', '.join(places)}), as its spec asks")


def disruption_budget(lab: Any, name: str, *, min_available: int | None = None) -> None:
    """A PodDisruptionBudget covers deployment ``name``'s pods and keeps at least ``min_available`` of them
    (or allows at most replicas - min_available to be evicted at once)."""
    hint = (f"Apply a PodDisruptionBudget (policy/v1) whose selector matches deployment/{name}'s pod labels, "
            f"with minAvailable: {min_available or 1}.")  # fmt: skip
    obj = _object(lab, f"deployment/{name}", hint)
    labels = obj["spec"]["template"]["metadata"].get("labels", {})
    budgets = lab.request("GET", f"/apis/policy/v1/namespaces/{lab.namespace}/poddisruptionbudgets").get("items", [])
    covering = [b for b in budgets if (b["spec"].get("selector") or {}).get("matchLabels")
                and all(labels.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())]  # fmt: skip
    if not covering:
        _fail(f"No PodDisruptionBudget selects deployment/{name}'s pods ({labels}).", hint)
    budget = covering[0]
    replicas = obj["spec"].get("replicas", 1)
    keeps = budget["spec"].get("minAvailable")
    if keeps is None and budget["spec"].get("maxUnavailable") is not None:
        keeps = replicas - int(budget["spec"]["maxUnavailable"])
    if min_available is not None and (not isinstance(keeps, int) or keeps < min_available):
        _fail(f"PodDisruptionBudget {budget['metadata']['name']} keeps {keeps} of deployment/{name}'s pods; "
              f"at least {min_available} should stay.", hint)  # fmt: skip
    passed(f"PodDisruptionBudget {budget['metadata']['name']} keeps {keeps} of deployment/{name}'s {replicas} pods")


def leaves_lost_nodes(lab: Any, name: str, *, within: int = 30) -> None:
    """Deployment ``name``'s pods tolerate a not-ready or unreachable node for at most ``within`` seconds, so
    they are evicted and replaced soon after a node is lost (the default is 300 s)."""
    hint = (f"Add tolerations to deployment/{name}'s pod template for node.kubernetes.io/not-ready and "
            f"node.kubernetes.io/unreachable (operator: Exists, effect: NoExecute) with tolerationSeconds of "
            f"{within} or less.")  # fmt: skip
    obj = _object(lab, f"deployment/{name}", hint)
    tolerations = obj["spec"]["template"]["spec"].get("tolerations") or []
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        found = [t for t in tolerations if t.get("key") == key and t.get("effect") == "NoExecute"]
        seconds = found[0].get("tolerationSeconds") if found else 300
        if seconds is None or seconds > within:
            _fail(f"deployment/{name}'s pods stay {('forever' if seconds is None else f'{seconds} s')} on a node "
                  f"that is {key.rsplit('/', 1)[1]}.", hint)  # fmt: skip
    passed(f"deployment/{name}'s pods leave a lost node within {within} s")
