"""A trainee's answers, read out of their kernel as plain values: the only thing grading takes from it.

``export_code(names)`` is code the grader runs in the trainee's kernel: it prints
the named variables as JSON (numbers, strings, booleans, None, lists, tuples,
sets and dicts of those; an unanswered ``...`` or a missing name as *missing*; any
other object as *not a plain value*, with its type's name). ``decode`` turns that
JSON back into values in the grader. Whatever the trainee's code did to their
kernel (a patched ``json``, a redefined builtin, an object whose ``==`` is always
true), what reaches the grader is data: at worst a value they chose, which they
could as well have typed.
"""

from __future__ import annotations

import ast
import json
import secrets
from dataclasses import dataclass
from typing import Any

TAG = "$labkit"
ANSWER_CALLS = {"answer", "given"}  # checks.answer("name", ...), checks.given("name")

# Runs in the trainee's kernel: self-contained (it imports nothing of labkit's) and leaves no names behind.
_EXPORT = r'''
def _labkit_export(names, mark):
    import json
    scope = globals()

    def plain(value, depth=0):
        kind = type(value)
        if value is None or kind in (bool, int, float, str):
            return value
        if value is Ellipsis:
            return {"$labkit": "missing"}
        if depth > 30:
            return {"$labkit": "object", "type": "nested too deep"}
        if kind in (list, tuple, set, frozenset):
            items = [plain(v, depth + 1) for v in value]
            return items if kind is list else {"$labkit": kind.__name__, "items": items}
        if kind is dict:
            return {"$labkit": "dict", "items": [[plain(k, depth + 1), plain(v, depth + 1)] for k, v in value.items()]}
        if hasattr(value, "dtype") and hasattr(value, "item"):  # numpy's numbers: their plain value
            try:
                native = value.item()
            except Exception:
                native = None
            if type(native) in (bool, int, float, str):
                return native
        for base in (int, float, str):  # a subclass of a plain type: its plain value, if it gives one
            if isinstance(value, base):
                try:
                    converted = base(value)
                except Exception:
                    break
                if type(converted) is base:
                    return converted
        return {"$labkit": "object", "type": kind.__name__}

    found = {name: plain(scope[name]) if name in scope else {"$labkit": "missing"} for name in names}
    print(mark + json.dumps(found))


_labkit_export(NAMES, MARK)
del _labkit_export
'''


@dataclass(frozen=True)
class NotPlain:
    """An answer that was an object, not a value: it gets no credit."""

    type: str

    def __repr__(self) -> str:
        return f"<a {self.type} object>"


class _Missing:
    def __repr__(self) -> str:
        return "<no answer>"


MISSING = _Missing()


def names_in(source: str) -> list[str]:
    """The answer variables a graded cell reads: the first arguments of ``checks.answer`` and ``checks.given``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ANSWER_CALLS
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):  # fmt: skip
            found.append(node.args[0].value)
    return list(dict.fromkeys(found))


def export_code(names: list[str]) -> tuple[str, str]:
    """The code that prints ``names`` from the trainee's kernel, and the mark its line starts with."""
    mark = f"labkit-answers-{secrets.token_hex(8)}:"
    return _EXPORT.replace("NAMES", repr(list(names))).replace("MARK", repr(mark)), mark


def read(printed: str, mark: str) -> str | None:
    """The JSON that ``export_code`` printed (the last line with its mark), or None."""
    lines = [line[len(mark):] for line in printed.splitlines() if line.startswith(mark)]
    return lines[-1] if lines else None


def decode(text: str | None) -> dict[str, Any]:
    """The answers as values (``MISSING``, ``NotPlain``); an unreadable export is no answers at all."""
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {str(name): _value(value) for name, value in found.items()}


def _value(data: Any) -> Any:
    if isinstance(data, list):
        return [_value(v) for v in data]
    if not isinstance(data, dict):
        return data if data is None or type(data) in (bool, int, float, str) else NotPlain(type(data).__name__)
    tag = data.get(TAG)
    if tag == "missing":
        return MISSING
    items = data.get("items")
    try:
        if tag == "dict" and isinstance(items, list):
            return {_key(k): _value(v) for k, v in items}
        if tag in ("tuple", "set", "frozenset") and isinstance(items, list):
            values = [_value(v) for v in items]
            return tuple(values) if tag == "tuple" else set(values) if tag == "set" else frozenset(values)
    except (TypeError, ValueError):  # an unhashable key or member
        return NotPlain(tag)
    return NotPlain(str(data.get("type") or "unknown"))


def _key(data: Any) -> Any:
    key = _value(data)
    hash(key)
    return key


def problems(values: dict[str, Any]) -> list[str]:
    """What an instructor should know about these answers: those that were objects, not values."""
    return [f"answer `{name}` was a {value.type} object, not a plain value: it got no credit"
            for name, value in values.items() if isinstance(value, NotPlain)]  # fmt: skip
