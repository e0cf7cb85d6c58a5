"""The documentation is true where a test can say so: every repository path written in README.md and docs/*.md
(csrc/..., deeplab_ops/..., model/..., training/..., benchmarks/..., tests/..., docs/...) is a file or folder of the
tree, and every ```python example in them runs, as written, in a fresh interpreter from the repository root; with
benchmarks/results/README.md: every cited `tests/...::name` is defined, every relative link and #anchor resolves,
every committed result file named is in benchmarks/results/, and every flag docs/training.md and docs/benchmarks.md
name is one the command's --help lists."""

from __future__ import annotations

import functools
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


# ---- what the docs cite: test names, links and anchors, result files, command-line flags ----------------------------

_RESULTS_README = ROOT / "benchmarks" / "results" / "README.md"
_ALL_DOCS = [*_DOCS, _RESULTS_README]
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _doc_id(p) -> str:
    return str(p.relative_to(ROOT))


def test_result_readme_paths_exist():
    """benchmarks/results/README.md's repository paths too (a built library, *.so, is not in the tree)."""
    missing = sorted(p for p in _paths(_RESULTS_README.read_text())
                     if not p.endswith(".so") and not (ROOT / p).exists())
    assert not missing, f"benchmarks/results/README.md names paths that do not exist: {missing}"


_TEST_NAME = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


@pytest.mark.parametrize("doc", _ALL_DOCS, ids=_doc_id)
def test_cited_test_names_exist(doc):
    """Every `tests/FILE.py::name` a page cites is a test (or class) defined in that file."""
    missing = []
    for path, name in _TEST_NAME.findall(doc.read_text()):
        file = ROOT / path
        if not file.is_file() or not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", file.read_text(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"{_doc_id(doc)} cites tests that do not exist: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc) -> set[str]:
    text = _FENCE.sub("", doc.read_text())
    return {_slug(h) for h in re.findall(r"^#+\s+(.*?)\s*#*$", text, re.M)}


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", _ALL_DOCS, ids=_doc_id)
def test_internal_links_and_anchors_resolve(doc):
    """Every relative link of a page names a file of the tree, and every #anchor a heading of the page it names."""
    bad = []
    for link in _LINK.findall(_FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: outside the tree
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists():
            bad.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link} (no heading #{anchor} in {target.name})")
    assert not bad, f"{_doc_id(doc)} has broken links: {bad}"


_RESULT_FILE = re.compile(r"(?<![\w-])((?:aspp|conv_bn_relu|train|overhead)-cpu-(?:xeon|epyc)-\d{4}-\d\d-\d\d[\w-]*"
                          r"|\d{4}-\d\d-\d\d-h200-[\w-]+)\.(\{[\w,\s]+\}|csv|json|md|txt|log)(?!\w)")


@pytest.mark.parametrize("doc", _ALL_DOCS, ids=_doc_id)
def test_cited_result_files_exist(doc):
    """Every committed result file a page names (`conv_bn_relu-cpu-xeon-DATE-LABEL.csv`, `-cpu-epyc-` alike,
    `NAME.{json,csv}`, `DATE-h200-NAME.csv`) is in benchmarks/results/."""
    results = ROOT / "benchmarks" / "results"
    missing = []
    for stem, ext in _RESULT_FILE.findall(doc.read_text()):
        for e in re.sub(r"[{}\s]", "", ext).split(","):
            if not (results / f"{stem}.{e}").is_file():
                missing.append(f"{stem}.{e}")
    assert not missing, f"{_doc_id(doc)} names result files that benchmarks/results/ lacks: {sorted(set(missing))}"


@functools.cache
def _options(*command: str) -> frozenset[str]:
    """The --flags a command's --help lists."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", done.stdout))


def _flags(text: str) -> set[str]:
    """The --flags a text names, without globs (`--synthetic-*`) and the values after them."""
    return {m.group(1) for m in re.finditer(r"(?<![\w-])(--[a-z][\w-]*[a-z0-9])(?![\w*-])", text)}


_BENCH_SCRIPTS = ("aspp_bench", "conv_bn_relu_bench", "train_bench", "overhead_bench")


def test_training_doc_flags_exist():
    """Every flag docs/training.md names is one of train.py's (or, for its `python -m model --summary` line, one of
    that command's; torchrun's --nproc_per_node)."""
    known = _options("train.py") | _options("-m", "model") | {"--nproc_per_node"}
    unknown = sorted(_flags((ROOT / "docs" / "training.md").read_text()) - known)
    assert not unknown, f"docs/training.md names flags that neither train.py nor python -m model has: {unknown}"


def test_benchmark_doc_flags_exist():
    """docs/benchmarks.md: a flag in the shared table is every one of its three scripts', one in a per-script row
    that script's, one in the overhead table overhead_bench's, and any other one some script's (train.py's for the
    training flags it quotes)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    helps = {s: _options(f"benchmarks/{s}.py") for s in _BENCH_SCRIPTS}
    wrong = []
    sections = re.split(r"^(#+ .*)$", text, flags=re.M)
    for heading, body in zip(sections[1::2], sections[2::2], strict=True):
        for row in re.findall(r"^\|(.*)\|$", body, re.M):
            cells = [c.strip() for c in row.split("|")]
            if heading.startswith("### Flags of aspp_bench"):
                owners = _BENCH_SCRIPTS[:3]
                flags = _flags(cells[0])
            elif heading.startswith("### Flags of one script") and cells[0] in helps:
                owners, flags = (cells[0],), _flags(cells[1])
            elif heading.startswith("## overhead_bench.py"):
                owners, flags = ("overhead_bench",), _flags(cells[0])
            else:
                continue
            wrong += [f"{f} ({o})" for f in flags for o in owners if f not in helps[o]]
    every = frozenset().union(*helps.values(), _options("train.py"))
    wrong += [f"{f} (no script)" for f in _flags(text) - every]
    assert not wrong, f"docs/benchmarks.md names flags the scripts do not have: {sorted(set(wrong))}"
