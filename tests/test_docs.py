"""Every relative link in README.md and docs/**/*.md points at a file that exists, so moving or
renaming a page cannot leave dead links behind (anchors, `#...`, are not checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# [text](target) and [text](target "title"); images too. Code spans and fenced blocks are removed
# first, since they may hold bracket-paren text that is not a link.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[str]:
    text = CODE.sub("", FENCE.sub("", text))
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, mailto:, ... and links inside the same page
        found.append(target.split("#", 1)[0])
    return found


def test_the_link_pattern_finds_what_a_reader_clicks():
    text = "[a](x.md) [b](../y.md#part \"t\") ![c](img/p.png) [d](https://e.org) [e](#here) `[f](code.md)`\n```\n[g](fenced.md)\n```\n"
    assert relative_links(text) == ["x.md", "../y.md", "img/p.png"]


def test_the_pages_exist():
    assert (ROOT / "docs" / "README.md") in PAGES and len(PAGES) > 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    dead = [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]
    assert not dead, f"{page.relative_to(ROOT)} links to missing files: {dead}"
