"""The installed package, as a user meets it (issue 14): `import model` from any folder after
`pip install --no-build-isolation -e .`, and the setuptools floor the packaging metadata needs."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

INSTALL = "pip install --no-build-isolation -e ."
# pyproject.toml writes `license = "BSD-3-Clause"` (an SPDX expression, PEP 639): setuptools reads that from 77 on;
# older ones stop the install with a schema error about project.license.
SETUPTOOLS_FLOOR = "77"

USER_CODE = textwrap.dedent("""
    import os, sys
    import torch
    import deeplab_ops, model
    import training.loop  # what train.py imports from training
    for mod in (deeplab_ops, model):
        print(mod.__name__, "from", os.path.dirname(mod.__file__))
    torch.manual_seed(0)
    net = model.deeplabv3_resnet50(num_classes=3, fused=True, width=8).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 33, 33))["out"]
    assert out.shape == (1, 3, 33, 33), out.shape
    assert torch.isfinite(out).all()
    print("forward ok", tuple(out.shape))
""")


def test_model_imports_from_outside_the_repository(tmp_path):
    # What a user does after installing: a fresh process, started elsewhere, no PYTHONPATH.
    try:
        dist = importlib.metadata.distribution("deeplab_ops")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"deeplab_ops is not installed in {sys.prefix} ({sys.executable}); this test checks the "
                    f"installed package: run `{INSTALL}` from {ROOT} first")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", USER_CODE], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (
        f"`import model` and a fused forward failed in a process started in {tmp_path} with the installed "
        f"deeplab_ops {dist.version} ({sys.executable}). If the error is ModuleNotFoundError for model or "
        f"training, the install predates their packaging: run `{INSTALL}` again from {ROOT}.\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    )
    assert "forward ok (1, 3, 33, 33)" in result.stdout
    # imported from an install, not from the temporary working directory
    assert str(tmp_path) not in result.stdout


def _pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _setuptools_requirement(lines) -> Requirement:
    reqs = [Requirement(line) for line in lines]
    found = [r for r in reqs if r.name.lower() == "setuptools"]
    assert len(found) == 1, f"one setuptools requirement expected, got {[str(r) for r in found]}"
    return found[0]


def _check_floor(req: Requirement, where: str) -> None:
    spec = req.specifier
    assert spec.contains(f"{SETUPTOOLS_FLOOR}.0.0"), f"{where}: {req} refuses setuptools {SETUPTOOLS_FLOOR}"
    for old in ("64.0", "65.5.0", "76.1.0"):
        assert not spec.contains(old), (
            f"{where}: {req} allows setuptools {old}, which rejects pyproject's license string: "
            f"state setuptools>={SETUPTOOLS_FLOOR}"
        )


def test_setuptools_floor_in_pyproject():
    data = _pyproject()
    # the reason for the floor: an SPDX string license (older setuptools want a table)
    assert isinstance(data["project"]["license"], str)
    _check_floor(_setuptools_requirement(data["build-system"]["requires"]), "pyproject.toml [build-system]")


def test_setuptools_floor_in_requirements():
    lines = []
    for raw in (ROOT / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    _check_floor(_setuptools_requirement(lines), "requirements.txt")


def test_every_package_is_installed():
    # deeplab_ops, model and training, with their subpackages: every folder holding an __init__.py is listed
    packages = set(_pyproject()["tool"]["setuptools"]["packages"])
    assert {"deeplab_ops", "model", "training"} <= packages
    for top in ("deeplab_ops", "model", "training"):
        for init in (ROOT / top).rglob("__init__.py"):
            name = ".".join(init.parent.relative_to(ROOT).parts)
            assert name in packages, f"{name} has an __init__.py but is not in [tool.setuptools] packages"


def test_train_py_is_installed_as_a_module():
    # A regular install (`pip install --no-build-isolation .`, or a wheel) installed deeplab_ops, model and training but
    # not train.py: `python train.py` in the repository then imports the source tree's deeplab_ops (no _C there) and
    # fails, and no folder outside it had train. Installed as the module `train`: `python -m train` from any folder.
    assert "train" in _pyproject()["tool"]["setuptools"]["py-modules"]
    text = (ROOT / "train.py").read_text()
    assert "\ndef main(" in text and 'if __name__ == "__main__":' in text


def test_source_tree_before_an_installed_package_is_named(tmp_path):
    # After a regular install, Python started in the repository imports the source tree's deeplab_ops, which has no _C:
    # the error said "_C is missing, build it with pip install -e ." though the install was fine. It names both folders.
    import shutil

    import torch

    source = tmp_path / "repo"
    shutil.copytree(ROOT / "deeplab_ops", source / "deeplab_ops",
                    ignore=shutil.ignore_patterns("_C*", "_build_info.json", "__pycache__"))
    site = tmp_path / "site"  # a stand-in for site-packages holding the installed package and its record
    (site / "deeplab_ops").mkdir(parents=True)
    (site / "deeplab_ops" / "__init__.py").write_text("")
    record = site / "deeplab_ops-0.1.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: deeplab_ops\nVersion: 0.1.0\n")
    (record / "RECORD").write_text("deeplab_ops/__init__.py,,\ndeeplab_ops-0.1.0.dist-info/RECORD,,\n")
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    # -S: no site processing (an editable install's finder would otherwise find this repository's deeplab_ops)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "PYTHONPATH": f"{source}:{site}:{site_packages}"}
    proc = subprocess.run([sys.executable, "-S", "-c", "import deeplab_ops"], cwd=source, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert f"missing from {source / 'deeplab_ops'}" in proc.stderr, proc.stderr[-2000:]
    assert f"installed deeplab_ops ({site / 'deeplab_ops'})" in proc.stderr and "python -m train" in proc.stderr
