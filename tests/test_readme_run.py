"""The README's run command, exactly as a new user types it, on the built-in sample on the CPU:
it must end with the four artifacts of the guide and a validation accuracy above 98.5%; then the
README's "Using the model" commands run in order on that model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.long
def test_readme_run_command_trains_a_good_model(tmp_path: Path):
    command = re.findall(r"```bash\n(.*?)```", README, re.S)[0].strip().splitlines()[1]
    assert command == ".venv/bin/python scripts/train_finetuned.py"
    # Run it in a fresh folder laid out like the checkout (scripts/, configs/, .venv/), so that the
    # models/ folder it creates is the test's own.
    for name in ("scripts", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    argv = command.split()
    if (ROOT / ".venv" / "bin" / "python").exists():
        (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    else:  # tests run from another environment: same command with this interpreter
        argv[0] = sys.executable
    env = cli_env(tmp_path)
    env.pop("OMP_NUM_THREADS")  # the user's run: torch picks its threads
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "models" / "cnn_modelo_v2_finetuned"
    for name in ("best_model_finetuned.pth", "checkpoint_last.pth", "history.json", "config_finetuned.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    best = max(r["val_acc"] for r in history)
    assert best > 0.985, f"best validation accuracy {best:.4f}"
    whole = json.loads((out / "evaluation.json").read_text())  # the best model on the whole validation split
    assert "built-in MNIST sample" in proc.stdout and f"validation accuracy {100 * whole['accuracy']:.2f}% on all 500" in proc.stdout
    # The closing line names the best validation epoch (on the 350 images that chose it) and, when the final
    # weights were kept instead (model_selection auto), says so: evaluation.json is of the kept weights.
    best_epoch = min(history, key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))["epoch"]
    kept = whole["model"]["epoch"]
    assert f"best epoch {best_epoch}: val_acc {best:.4f}" in proc.stdout
    assert kept == best_epoch or (kept == len(history) and f"holds the final weights, epoch {kept}" in proc.stdout)

    # Then the README's "Using the model" commands, in order, as a fresh clone has them after training.
    using = re.findall(r"```bash\n(.*?)```", README.split("## Using the model", 1)[1], re.S)[0].strip().splitlines()
    assert using[0] == ".venv/bin/python scripts/evaluate.py" and len(using) == 3
    runs = []
    for line in using:
        tool_argv = line.split()
        tool_argv[0] = argv[0]  # the same interpreter as the training command
        runs.append(subprocess.run(tool_argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600))
        assert runs[-1].returncode == 0, (line, runs[-1].stderr[-3000:])
    assert "no --data: evaluating on the built-in MNIST sample" in runs[0].stdout
    assert "is the data this model was trained on" in runs[0].stderr  # said, since it is
    evaluations = [json.loads((folder / "evaluation" / "evaluation.json").read_text()) for folder in (out, out / "export")]
    assert evaluations[0]["num_samples"] == 5000 and evaluations[0]["data"]["seen_in_training"] == "training"
    assert evaluations[1]["predictions"] == evaluations[0]["predictions"]  # the .safetensors export: the same model
    assert "identical logits: ok" in runs[1].stdout
