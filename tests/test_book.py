"""The course book builds offline with no warnings, and its pages say what they must.

The book is built once for this module, with the venv's own `jupyter-book`, into a
temporary folder (the checkout's `book/_build` is left alone). The checks read the
generated HTML, and only each page's article: the navigation sidebar links every page
to every other, so a link found there would prove nothing.
"""

from __future__ import annotations

import posixpath
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

BOOK = Path(__file__).resolve().parent.parent / "book"
JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"

CHAPTERS_AND_LABS = {
    "chapters/01-cluster-architecture": "labs/01-deploy-and-scale",
    "chapters/02-rollouts-and-rollbacks": "labs/02-rollouts-and-rollbacks",
    "chapters/03-failure-and-self-healing": "labs/03-failure-and-self-healing",
    "chapters/04-consensus-and-quorum": "labs/04-consensus-and-quorum",
    "chapters/05-resilience-patterns": "labs/05-resilience-patterns",
}
TOC_ORDER = [
    "intro",
    "curriculum",
    "chapters/01-cluster-architecture",
    "labs/01-deploy-and-scale",
    "chapters/02-rollouts-and-rollbacks",
    "labs/02-rollouts-and-rollbacks",
    "chapters/03-failure-and-self-healing",
    "labs/03-failure-and-self-healing",
    "chapters/04-consensus-and-quorum",
    "labs/04-consensus-and-quorum",
    "chapters/05-resilience-patterns",
    "labs/05-resilience-patterns",
    "instructor-guide",
]
# Theory chapters whose labs are still to come.
CHAPTERS_AHEAD: list[str] = []
# Module number -> a word its title must contain, and its status.
MODULES = {
    "1": ("Cluster architecture", "available"),
    "2": ("rollbacks", "available"),
    "3": ("Failure", "available"),
    "4": ("Consensus", "available"),
    "5": ("Resilience", "available"),
    "6": ("Networking", "planned"),
    "7": ("Observability", "planned"),
    "8": ("RBAC", "planned"),
    "9": ("autoscaling", "planned"),
    "10": ("Incident response", "planned"),
}


class Page(HTMLParser):
    """What a generated page holds: its article's text, links and tables, and every remote resource."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.links: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.remote: list[str] = []  # scripts, stylesheets, images or frames loaded from the network
        self._article_depth = 0  # >0 inside <article class="bd-article">
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        source = a.get("src") if tag in ("script", "img", "iframe") else None
        if tag == "link" and {"stylesheet", "preload", "modulepreload"} & set(a.get("rel", "").split()):
            source = a.get("href")
        if source and re.match(r"(https?:)?//", source):
            self.remote.append(f"<{tag}> {source}")
        if tag == "article" and "bd-article" in a.get("class", "").split():
            self._article_depth = 1
        elif tag == "article" and self._article_depth:
            self._article_depth += 1
        if not self._article_depth:
            return
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "article" and self._article_depth:
            self._article_depth -= 1
        elif tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._article_depth:
            self.text.append(data)
            if self._cell is not None:
                self._cell.append(data)

    @property
    def words(self) -> str:
        return " ".join(" ".join(self.text).split())


def toc_files(toc: dict) -> list[str]:
    """Every page of a jb-book `_toc.yml`, in reading order."""
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    return files


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the book as `make book` does, into a temporary folder; the folder of its HTML."""
    assert JUPYTER_BOOK.exists(), (
        f"{JUPYTER_BOOK} is missing: install the book's tools with `pip install -e '.[book]'` (`make setup` does)"
    )
    out = tmp_path_factory.mktemp("book")
    result = subprocess.run(
        [str(JUPYTER_BOOK), "build", str(BOOK), "--path-output", str(out), "--warningiserror", "--keep-going"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    problems = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|CRITICAL", line)]
    assert result.returncode == 0, f"the book does not build (exit {result.returncode}):\n" + "\n".join(
        problems or log.splitlines()[-40:]
    )
    assert not problems, "the book builds with warnings:\n" + "\n".join(problems)
    assert "build succeeded" in log, f"jupyter-book did not report success:\n{log[-3000:]}"
    return out / "_build" / "html"


def page(html: Path, name: str) -> Page:
    path = html / f"{name}.html"
    assert path.exists(), f"{name}.html was not generated; pages built: {sorted(p.name for p in html.rglob('*.html'))}"
    parsed = Page()
    parsed.feed(path.read_text(encoding="utf-8"))
    assert parsed.words, f"{name}.html has no article text"
    return parsed


def targets(name: str, links: list[str]) -> set[str]:
    """The pages (book-relative, without .html) that a page's relative links point at."""
    found = set()
    for href in links:
        if re.match(r"[a-z]+:", href) or href.startswith(("#", "//")):
            continue
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), href.split("#")[0]))
        found.add(target.removesuffix(".html"))
    return found


def test_toc_lists_the_pages_in_reading_order() -> None:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    assert toc_files(toc) == TOC_ORDER, f"_toc.yml lists {toc_files(toc)}, expected {TOC_ORDER}"
    captions = [part.get("caption") for part in toc["parts"]]
    assert "Modules" in captions and "For instructors" in captions, f"parts are {captions}"
    pages = sorted(
        p.relative_to(BOOK).with_suffix("").as_posix() for p in BOOK.rglob("*.md") if "_build" not in p.parts
    )  # fmt: skip
    assert pages == sorted(TOC_ORDER), (
        f"markdown files outside the TOC (a warning at build time): {set(pages) - set(TOC_ORDER)}"
    )


def test_every_toc_page_is_built_and_links_resolve(html: Path) -> None:
    for name in TOC_ORDER:
        for target in targets(name, page(html, name).links):
            assert (html / f"{target}.html").exists() or (html / target).exists(), (
                f"{name}.html links to {target}, which the build did not produce"
            )


def test_the_book_loads_nothing_from_the_network(html: Path) -> None:
    for path in sorted(html.rglob("*.html")):
        parsed = Page()
        parsed.feed(path.read_text(encoding="utf-8"))
        assert not parsed.remote, f"{path.relative_to(html)} loads remote resources: {parsed.remote}"


def test_landing_page_says_how_to_run_the_course(html: Path) -> None:
    text = page(html, "intro").words
    for needle in ("JupyterHub", "Binder", "laptop", "make lab", "Python 3.10", "Go 1.26",
                   "labkit sandbox up", "labkit sandbox status", "labkit sandbox down",
                   "service account", "namespace", "nbgrader"):  # fmt: skip
        assert needle in text, f"the landing page does not mention {needle!r}"
    assert "How to run the course" in text, "the landing page has no 'How to run the course' section"


def test_chapters_and_labs_link_to_each_other(html: Path) -> None:
    for chapter, lab in CHAPTERS_AND_LABS.items():
        assert lab in targets(chapter, page(html, chapter).links), f"{chapter}.html does not link to {lab}.html"
        assert chapter in targets(lab, page(html, lab).links), f"{lab}.html does not link back to {chapter}.html"


def test_chapters_are_substantive(html: Path) -> None:
    for chapter in [*CHAPTERS_AND_LABS, *CHAPTERS_AHEAD]:
        text = page(html, chapter).words
        assert len(text.split()) >= 2500, f"{chapter} has only {len(text.split())} words"
        for section in ("In the lab", "Check your understanding"):
            assert section in text, f"{chapter} has no '{section}' section"


def test_lab_pages_state_duration_objectives_and_how_to_open(html: Path) -> None:
    durations = {"labs/01-deploy-and-scale": "45 minutes", "labs/02-rollouts-and-rollbacks": "60 minutes",
                 "labs/03-failure-and-self-healing": "60 minutes", "labs/04-consensus-and-quorum": "60 minutes",
                 "labs/05-resilience-patterns": "60 minutes"}
    for lab, duration in durations.items():
        text = page(html, lab).words
        for needle in (duration, "Prerequisites", "Learning objectives", "Assignments", "make lab", "notebooks/"):
            assert needle in text, f"{lab} does not mention {needle!r}"


def test_curriculum_lists_all_ten_modules(html: Path) -> None:
    tables = page(html, "curriculum").tables
    modules = next((t for t in tables if t and t[0] and t[0][0] == "#"), None)
    assert modules, f"the curriculum has no module table (tables start with {[t[0] for t in tables if t]})"
    rows = {row[0]: row for row in modules[1:] if row}
    assert sorted(rows, key=int) == list(MODULES), f"the curriculum lists modules {sorted(rows)}"
    for number, (title, status) in MODULES.items():
        row = rows[number]
        assert title.lower() in row[1].lower(), f"module {number} is titled {row[1]!r}, not mentioning {title!r}"
        assert row[-1] == status, f"module {number} is {row[-1]!r}, expected {status!r}"


def test_instructor_guide_covers_the_grading_workflow(html: Path) -> None:
    text = page(html, "instructor-guide").words
    for command in ("labkit course release", "labkit course collect", "labkit course autograde",
                    "labkit course feedback", "labkit course scores", "c.Exchange.root",
                    "c.CourseDirectory.course_id", "labkit sandbox down --purge", "labkit sandbox logs"):  # fmt: skip
        assert command in text, f"the instructor guide does not mention {command!r}"
