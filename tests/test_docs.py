"""The documentation matches the software: every flag, artifact and fault kind is in the README and
in the Spanish guide, and the README starts with the set-up, run and test commands CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cnn_finetune.cli import build_parser
from cnn_finetune.training.faults import KINDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"README.md": ROOT / "README.md", "guia": ROOT / "docs" / "guia_entrenamiento.md"}
ARTIFACTS = ["best_model_finetuned.pth", "checkpoint_last.pth", "checkpoint_prev.pth", "history.json",
             "config_finetuned.json", "data_report.json", "training_curves.png", "evaluation.json",
             "confusion_matrix.png", "model_card.md", "train.log", "metrics.csv", "reliability_diagram.png",
             "label_review.csv", "report.html", "--min-confidence", "--max-distance", "feature_distance", "temperature", "ece_uncalibrated", '"unknown"']


def flags() -> list[str]:
    return sorted({opt for action in build_parser()._actions for opt in action.option_strings
                   if opt.startswith("--") and opt != "--help"})


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_flag_artifact_and_fault_is_documented(doc: str):
    text = DOCS[doc].read_text(encoding="utf-8")
    missing = [f for f in flags() if f not in text]
    missing += [a for a in ARTIFACTS if a not in text]
    missing += [f"{k}@" for k in KINDS if f"{k}@" not in text]
    assert not missing, f"{doc} does not mention: {missing}"


def test_readme_starts_with_setup_run_and_test_commands_that_ci_uses():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    setup_and_run = [line for line in blocks[0].splitlines() if line.strip()]
    assert setup_and_run == [
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt",
        ".venv/bin/python scripts/train_finetuned.py",
    ]
    test_command = blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_and_run[0] in ci
    assert test_command.replace("-m pytest", "-m pytest -q") in ci


def test_the_readme_imports_only_the_package_face():
    # Notebooks copy the README: its code imports from ``cnn_finetune`` itself, never a layer inside it.
    import cnn_finetune

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S))
    imports = re.findall(r"^from (cnn_finetune\S*) import (.+)$", code, re.M)
    assert imports
    for module, names in imports:
        assert module == "cnn_finetune", module
        assert all(n.strip() in cnn_finetune.__all__ for n in names.split(",")), names
