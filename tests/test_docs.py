"""The documentation names files that exist: every repository path written in README.md and docs/*.md (csrc/...,
deeplab_ops/..., model/..., training/..., benchmarks/..., tests/..., docs/...) is a file or folder of the tree."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT

_PATH = re.compile(r"(?<![\w./-])((?:csrc|deeplab_ops|model|training|benchmarks|tests|docs)/[\w./*<>-]*[\w/*>])")
_DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


def _paths(text: str) -> set[str]:
    found = set()
    for match in _PATH.finditer(text):
        path = match.group(1).rstrip("./")
        if "*" in path or "<" in path:
            continue
        found.add(path)
    return found


@pytest.mark.parametrize("doc", _DOCS, ids=lambda p: p.name)
def test_paths_named_in_docs_exist(doc):
    missing = sorted(p for p in _paths(doc.read_text()) if not (ROOT / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"
