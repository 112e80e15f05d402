"""The grader's parts that need no cluster: answers read as values, results handed over, checks scored one by one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from labkit import checks
from labkit.apps.loadgen import TaskResult
from labkit.course import answers, scoring, transfer
from labkit.lab.recovery import Recovery


def _exported(setup: str, names: list[str]) -> dict:
    """What the export code prints from a fresh interpreter after ``setup`` ran there, decoded."""
    code, mark = answers.export_code(names)
    done = subprocess.run([sys.executable, "-c", setup + "\n" + code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return answers.decode(answers.read(done.stdout, mark))


def test_answers_travel_as_plain_values_and_objects_do_not() -> None:
    values = _exported("""
class Anything(str):
    def __eq__(self, other): return True
    __hash__ = str.__hash__
class Opaque:
    def __eq__(self, other): return True
import builtins, json
builtins.hasattr = lambda *a: True      # a redefined builtin changes nothing the grader trusts
plain = {"node-1": 2, 3: [1.5, None, True]}
pair = ("etcd-0", 2)
text = Anything("no idea")
thing = Opaque()
unset = ...
""", ["plain", "pair", "text", "thing", "unset", "absent"])
    assert values["plain"] == {"node-1": 2, 3: [1.5, None, True]} and type(values["plain"]) is dict
    assert values["pair"] == ("etcd-0", 2)
    assert values["text"] == "no idea" and type(values["text"]) is str and values["text"] != "etcd"
    assert values["thing"] == answers.NotPlain("Opaque")
    assert values["unset"] is answers.MISSING and values["absent"] is answers.MISSING
    assert answers.problems(values) == ["answer `thing` was a Opaque object, not a plain value: it got no credit"]


@pytest.mark.parametrize("printed", ["", "garbage", "labkit-answers-x:[1, 2]", 'labkit-answers-x:{"a": {"$labkit": "dict", "items": [[[1], 2]]}}'])
def test_an_export_the_trainee_broke_is_no_answer_at_all(printed: str) -> None:
    decoded = answers.decode(answers.read(printed, "labkit-answers-x:"))
    assert all(isinstance(v, answers.NotPlain) for v in decoded.values())


def test_the_names_a_graded_cell_reads() -> None:
    source = 'checks.answer("leader", x)\nassert checks.given("term") > 1\nchecks.answer(name, 1)\ncheck("x")'
    assert answers.names_in(source) == ["leader", "term"]


def test_what_a_grader_cell_measured_reaches_the_trainee_kernel_as_data() -> None:
    source = ("with lab.measure('kill', 'deployment/w') as worker_kill:\n    pass\n"
              "run = background.submit(f)\nfirst, rest = 'etcd-0', ['etcd-1']\n_private = 1\nfor member in rest:\n    pass")
    assert transfer.assigned(source) == ["worker_kill", "run", "first", "rest", "member"]
    recovery = Recovery("kill", "deployment/w", 10.0, 10.1, None, 10.7, ["note"])
    result = TaskResult("http://api/", 4.0, 5.0, [1.0, 2.0], [50.0, 70.0], {"202": 2}, 2, 0, 0, 0)
    scope = {"worker_kill": recovery, "under": result, "run": object(), "first": "etcd-0",
             "rest": ["etcd-1", ("a", 1)], "member": {"k": {1, 2}}}  # a set does not travel; nor does a future
    packed = transfer.pack(scope, list(scope))
    other: dict = {}
    assert transfer.unpack(packed, other) == ["first", "rest", "under", "worker_kill"]
    assert other["worker_kill"] == recovery and other["worker_kill"].ttr == 0.7
    assert other["under"].completion_percentile(99) == 70.0 and other["rest"] == ["etcd-1", ("a", 1)]
    with pytest.raises(ValueError, match="does not travel"):
        transfer.unpack(json.dumps({"x": {"$labkit": "dataclass", "class": "os:system", "fields": {}}}), {})


def test_a_graded_cell_scores_each_check_and_reports_every_miss(capsys: pytest.CaptureFixture) -> None:
    source = '''
total = 3
checks.answer("component", "etcd", hint="Only one keeps state.")
assert total == 4, "total is 3, not 4.\\nHint: count again."
checks.answer("count", total)
broken = undefined_name
assert broken, "never reached"
checks.passed("said, not checked")
print("said too")
'''
    given = json.dumps({"component": "etcd", "count": {"$labkit": "object", "type": "Anything"}})
    score = scoring.grade(source, 4.0, "task-x", given, {"checks": checks})
    assert [c.passed for c in score.checks] == [True, False, False, False]
    assert score.score == 1.0 and repr(score) == "1"
    messages = [c.message for c in score.checks]
    assert "total is 3, not 4.\nHint: count again." == messages[1]
    assert "`count` is a Anything object, not a value." in messages[2]
    assert messages[3].startswith("not checked: `broken = undefined_name` failed")
    out = capsys.readouterr().out
    assert "✔ component = 'etcd'" in out and "✘ total is 3" in out and "said too" in out
    assert "1 of 4 points: 1 of 4 checks passed" in out
    bundle = score._repr_mimebundle_()
    assert bundle["text/plain"] == "1" and bundle[scoring.MIME]["score"] == 1.0 and "✘" in bundle["text/html"]
    assert checks._graded is None, "the answers of one graded cell outlived it"


def test_what_counts_as_a_check() -> None:
    import ast

    kinds = {
        "assert x": True, "checks.deployment(lab, 'web')": True, "check_restarted('worker')": True,
        "print('x')": False, "checks.passed('x')": False, "x = checks.given('x')": False,
        "try:\n    put(1)\nexcept E:\n    pass": False, "for k in ks:\n    assert k": True,
        "if a:\n    checks.answer('a', 1)": True, "def f():\n    assert x": False,
    }  # fmt: skip
    assert {text: scoring.is_check(ast.parse(text).body[0]) for text in kinds} == kinds


def test_every_glyph_labkit_shows_is_in_the_fonts_a_debian_image_has() -> None:
    # What a notebook page shows (status lines, checks, tallies, tables) must not turn into empty boxes where
    # only Debian's DejaVu fonts are installed (JupyterHub and Binder images, CI).
    import re
    import shutil
    from pathlib import Path

    if shutil.which("fc-list") is None:
        pytest.skip("fontconfig's fc-list is not installed")
    package = Path(__file__).resolve().parents[1] / "labkit"
    glyphs = {ch for path in package.rglob("*.py") for ch in re.findall(r"[^\x00-\x7f]", path.read_text())}
    missing = [ch for ch in sorted(glyphs) if "DejaVu" not in subprocess.run(
        ["fc-list", f":charset={ord(ch):x}", "family"], capture_output=True, text=True).stdout]  # fmt: skip
    assert glyphs and not missing, f"no DejaVu font has {missing} ({[hex(ord(c)) for c in missing]})"


def test_a_confined_kernel_sees_this_machine_read_only_and_not_what_is_hidden(monkeypatch) -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from labkit.course import confine

    if confine.unavailable():
        pytest.skip(confine.unavailable())
    place = Path(tempfile.mkdtemp(dir="/var/tmp"))  # outside /tmp, which a confined kernel sees anew
    try:
        secret, mine = place / "secret", place / "mine"
        for folder in (secret, mine):
            folder.mkdir()
        (secret / "key").write_text("s3cret")
        script = ("import os, pathlib\n"
                  f"print(sorted(os.listdir({str(secret)!r})))\n"
                  f"pathlib.Path({str(mine)!r}, 'note').write_text('ok')\n"
                  f"try:\n    pathlib.Path({str(place)!r}, 'outside').write_text('no')\nexcept OSError as exc:\n"
                  "    print(type(exc).__name__)\n"
                  "print(os.getpid())")  # fmt: skip
        done = subprocess.run(confine.command([sys.executable, "-c", script], writable=[mine], hidden=[secret]),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        listing, refused, pid = done.stdout.split("\n")[:3]
        assert listing == "[]" and refused == "OSError" and int(pid) < 10  # hidden; read-only; a PID namespace
        assert (mine / "note").read_text() == "ok" and not (place / "outside").exists()
    finally:
        shutil.rmtree(place)
    # Where bubblewrap is missing, grading says why instead.
    monkeypatch.setattr(confine.shutil, "which", lambda name: None)
    assert "bubblewrap (bwrap) is not installed" in confine.unavailable()
