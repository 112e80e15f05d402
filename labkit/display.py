"""How labkit shows things in a notebook, and in a terminal when there is none.

* ``StatusLine``: one line that updates in place while something is awaited
  (a rollout, pods becoming ready), then stays as the outcome;
* ``table``: rows as an HTML table in a notebook, aligned text elsewhere;
* ``error_lines``: how an expected problem (a ``LabkitError``: a bad manifest, a
  deleted namespace; a failed check) shows in a notebook: its message and hint as
  the cell's error output, without the traceback, as the command line shows it.
  The exceptions render themselves through IPython's ``_render_traceback_``, so the
  page shows them (and nbgrader's feedback, and papermill), the cell counts as
  failed and "run all" stops there; any other exception keeps its traceback.

Its glyphs (✔ ✘ ◌ — ·) are ones the DejaVu fonts of a Debian image have.
"""

from __future__ import annotations

import html
import re
import sys
import time
from typing import Any, Sequence



def ipython() -> Any:
    """The running IPython shell, or None outside one."""
    module = sys.modules.get("IPython")
    return module.get_ipython() if module is not None else None


def in_notebook() -> bool:
    shell = ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def show_html(markup: str, text: str) -> None:
    """Show ``markup`` in a notebook, ``text`` elsewhere."""
    if in_notebook():
        from IPython.display import HTML, display

        display(HTML(markup))
    else:
        print(text)


class StatusLine:
    """A line that says how a wait is going, updated in place (at most every ``every`` seconds)."""

    def __init__(self, every: float = 0.25) -> None:
        self.every = every
        self.handle: Any = None
        self.last_text = ""
        self.last_shown = 0.0
        self.notebook = in_notebook()

    def _markup(self, text: str, state: str) -> str:
        colour = {"wait": "#555", "ok": "#1a7f37", "fail": "#cf222e"}[state]
        mark = {"wait": "◌", "ok": "✔", "fail": "✘"}[state]
        # pre-wrap keeps long lines in the cell's width, breaking only at spaces: the texts bind each number to
        # its unit with a no-break space (``nbsp``), so "12 s" never splits across two lines.
        return (f'<pre style="margin:0;color:{colour};white-space:pre-wrap;word-break:normal;overflow-wrap:normal">'
                f'{mark} {html.escape(nbsp(text))}</pre>')

    def update(self, text: str, state: str = "wait", force: bool = False) -> None:
        now = time.monotonic()
        if text == self.last_text or (not force and now - self.last_shown < self.every):
            return
        self.last_text, self.last_shown = text, now
        if self.notebook:
            from IPython.display import HTML, display

            if self.handle is None:
                self.handle = display(HTML(self._markup(text, state)), display_id=True)
            else:
                self.handle.update(HTML(self._markup(text, state)))
        elif sys.stderr.isatty():
            print(f"\r\033[K{text}", end="" if state == "wait" else "\n", file=sys.stderr, flush=True)
        elif state != "wait":
            print(text, file=sys.stderr, flush=True)

    def finish(self, text: str, ok: bool = True) -> None:
        self.update(text, "ok" if ok else "fail", force=True)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """Show ``rows`` under ``headers``."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    text = "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [list(headers), *cells])
    head = "".join(f'<th style="text-align:left">{html.escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f'<td style="text-align:left">{html.escape(v)}</td>' for v in row) + "</tr>"
                   for row in cells)  # fmt: skip
    show_html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>", text)


def nbsp(text: str) -> str:
    """``text`` with each number bound to the word after it ("12 s", "3 replicas") by a no-break space."""
    return _NUMBER_UNIT.sub("\\1\u00a0", text)


_NUMBER_UNIT = re.compile(r"(\d) (?=[A-Za-z%])")


def error_lines(problem: str, hint: str | None = None, *, title: str = "") -> list[str]:
    """What an expected problem shows as a cell's error output: a red first line, then the rest and the hint."""
    first, _, rest = problem.strip().partition("\n")
    lines = [f"\033[1;31m✘ {title}{first}\033[0m"]
    lines += [line for line in rest.splitlines()]
    if hint:
        lines += ["", f"\033[34m{hint.strip()}\033[0m"]
    return lines
