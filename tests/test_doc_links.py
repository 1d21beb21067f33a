"""README.md and docs/*.md: every relative link names a file that exists, and every ``#anchor``
one of the target's headings as GitHub renders it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]*)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces
    as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path`` (outside code fences; repeats get ``-1``, ``-2``...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            anchor = github_anchor(m.group(1))
            found.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
            seen[anchor] = seen.get(anchor, 0) + 1
    return found


def test_github_anchor_follows_githubs_rules():
    assert github_anchor("DeepSeek-V4.1 at the release's row count") == (
        "deepseek-v41-at-the-releases-row-count"
    )
    assert github_anchor("SIEVE: batched variant and per-request SIEVE") == (
        "sieve-batched-variant-and-per-request-sieve"
    )
    assert github_anchor("Current: `io: uring`, one thread") == "current-io-uring-one-thread"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(doc):
    dead = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file) if file else doc
        if not path.exists():
            dead.append(f"{target}: no file {file}")
        elif anchor and (not path.is_file() or anchor not in anchors(path)):
            dead.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not dead, f"{doc.relative_to(REPO)}: dead links: {dead}"
