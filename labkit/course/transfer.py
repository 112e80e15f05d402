"""What the grader's own cells measured, handed to the trainee's kernel as data.

A lab's *grader* cells (fault injections and the measurements its checks rely on)
run in the grader's kernel when a submission is graded; the trainee's later cells
still read their results (``worker_kill.ttd``, ``naive.completion_percentile(99)``).
``pack`` writes the values a cell assigned as JSON in the grader's kernel: plain
values, labkit's result dataclasses (a ``Recovery``, a load generator's
``Result``/``TaskResult``) and Chaos Mesh experiments (by kind and name);
``unpack`` makes them again in the trainee's kernel. Other values (a thread
pool's future, a function) stay in the grader's kernel.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
from typing import Any

TAG = "$labkit"
PACKABLE_MODULES = ("labkit.lab.recovery", "labkit.apps.loadgen")


class Unpackable(Exception):
    pass


def assigned(source: str) -> list[str]:
    """The names a cell's top-level statements assign (``x = ...``, ``with ... as x``, ``for x in ...``)."""
    names: list[str] = []

    def targets(node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                targets(element)

    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                targets(target)
        elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
            targets(statement.target)
        elif isinstance(statement, (ast.With, ast.AsyncWith)):
            for item in statement.items:
                if item.optional_vars is not None:
                    targets(item.optional_vars)
        elif isinstance(statement, ast.For):
            targets(statement.target)
    return [name for name in dict.fromkeys(names) if not name.startswith("_")]


def pack(scope: dict, names: list[str]) -> str:
    """The named values of ``scope`` that can travel, as JSON."""
    found = {}
    for name in names:
        if name not in scope:
            continue
        try:
            found[name] = _pack(scope[name])
        except Unpackable:
            continue
    return json.dumps(found)


def _pack(value: Any, depth: int = 0) -> Any:
    if depth > 30:
        raise Unpackable
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [_pack(v, depth + 1) for v in value]
    if type(value) is tuple:
        return {TAG: "tuple", "items": [_pack(v, depth + 1) for v in value]}
    if type(value) is dict:
        return {TAG: "dict", "items": [[_pack(k, depth + 1), _pack(v, depth + 1)] for k, v in value.items()]}
    kind = type(value)
    if dataclasses.is_dataclass(value) and kind.__module__ in PACKABLE_MODULES:
        fields = {f.name: _pack(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", "class": f"{kind.__module__}:{kind.__qualname__}", "fields": fields}
    if kind.__module__ == "labkit.lab.chaos" and kind.__name__ == "Experiment":
        return {TAG: "experiment", "kind": value.kind, "name": value.name}
    raise Unpackable


def unpack(text: str, scope: dict) -> list[str]:
    """Set the values ``pack`` wrote in ``scope`` (experiments belong to its ``lab``); the names set."""
    for name, data in json.loads(text).items():
        scope[name] = _unpack(data, scope)
    return sorted(json.loads(text))


def _unpack(data: Any, scope: dict) -> Any:
    if isinstance(data, list):
        return [_unpack(v, scope) for v in data]
    if not isinstance(data, dict):
        return data
    tag = data.get(TAG)
    if tag == "tuple":
        return tuple(_unpack(v, scope) for v in data["items"])
    if tag == "dict":
        return {_unpack(k, scope): _unpack(v, scope) for k, v in data["items"]}
    if tag == "dataclass":
        module, _, name = data["class"].partition(":")
        if module not in PACKABLE_MODULES:
            raise ValueError(f"{data['class']} does not travel")
        kind = getattr(importlib.import_module(module), name)
        return kind(**{key: _unpack(value, scope) for key, value in data["fields"].items()})
    if tag == "experiment":
        from labkit.lab.chaos import Experiment

        lab = scope.get("lab")
        experiment = Experiment(lab, data["kind"], data["name"])
        if lab is not None:
            lab.chaos.experiments.setdefault(experiment.name, experiment)
        return experiment
    return data
