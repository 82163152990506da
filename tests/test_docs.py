"""The docs cannot rot: every Python snippet in the README and in docs/ runs (a snippet that needs outside data
says so in a ``<!-- not run: ... -->`` comment just before it), and every relative link points to a file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
SNIPPET = re.compile(r"(<!-- not run: [^>]*-->\n)?```python\n(.*?)```", re.S)


def _snippets(page: Path) -> list[tuple[str, bool]]:
    """``(code, runs)`` of every Python snippet of ``page``, in order."""
    return [(m.group(2), m.group(1) is None) for m in SNIPPET.finditer(page.read_text())]


RUNNABLE = [page for page in PAGES if any(runs for _, runs in _snippets(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=[p.relative_to(ROOT).as_posix() for p in RUNNABLE])
def test_every_snippet_of_the_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    namespace = {"__name__": "__docs__"}  # one page's snippets share names, as a reader's session would
    for i, (code, runs) in enumerate(_snippets(page)):
        if runs:
            exec(compile(code, f"{page.name} snippet {i + 1}", "exec"), namespace)


def test_the_snippets_are_found_and_few_are_left_out():
    snippets = [runs for page in PAGES for _, runs in _snippets(page)]
    assert sum(snippets) >= 3 and len(snippets) - sum(snippets) <= 3  # the not-run ones need downloads or your data
    assert ROOT / "README.md" in RUNNABLE


def test_every_relative_link_points_to_a_file():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
