"""The documentation is true where a test can say so: every repository path written in README.md and docs/*.md
(csrc/..., deeplab_ops/..., model/..., training/..., benchmarks/..., tests/..., docs/...) is a file or folder of the
tree, and every ```python example in them runs, as written, in a fresh interpreter from the repository root."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


_EXAMPLE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_EXAMPLES = [(doc, i, code) for doc in _DOCS for i, code in enumerate(_EXAMPLE.findall(doc.read_text()))]


@pytest.mark.parametrize("doc, index, code", _EXAMPLES, ids=lambda v: v.name if hasattr(v, "name") else None)
def test_python_examples_in_docs_run(doc, index, code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (f"{doc.relative_to(ROOT)} example {index} failed:\n{code}\n"
                                  f"--- stderr ---\n{done.stderr[-3000:]}")
