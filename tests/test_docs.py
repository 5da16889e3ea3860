"""Run the Python examples in docs/*.md so the documentation cannot rot.

Every ```python block of a page runs, in order, in one fresh namespace; each
page is one test. A block whose info string is ``python no-run`` is skipped.
README.md is deliberately not run: its example uses names it does not define.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))

# An opening fence (``` or more backticks, optionally indented), its info
# string, the body, and a closing fence of the same backticks.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,})[ \t]*(?P<info>[^\n`]*)\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)(?P=fence)[ \t]*$",
    re.DOTALL | re.MULTILINE,
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Return (line number, code) for each runnable ```python block."""
    blocks = []
    for match in FENCE.finditer(text):
        words = match.group("info").split()
        if not words or words[0] != "python" or "no-run" in words[1:]:
            continue
        indent = match.group("indent")
        lines = match.group("body").splitlines()
        code = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line for line in lines
        )
        lineno = text.count("\n", 0, match.start("body")) + 1
        blocks.append((lineno, code))
    return blocks


# Pages with examples; the others (performance.md: generated figures) have none.
RUNNABLE = [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))]


def test_docs_exist() -> None:
    assert PAGES, f"no documentation pages found in {DOCS}"
    names = {p.name for p in RUNNABLE}
    assert {"getting-started.md", "api.md", "pool.md", "guide.md"} <= names, names


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", [pytest.param(p, id=p.name) for p in RUNNABLE])
def test_doc_examples_run(page: Path) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for lineno, code in blocks:
        # Pad with newlines so tracebacks point at the line in the .md file.
        source = "\n" * (lineno - 1) + code
        compiled = compile(source, str(page), "exec")
        exec(compiled, namespace)
