"""The README's run command, exactly as a new user types it, on the built-in sample on the CPU:
it must end with the four artifacts of the guide and a validation accuracy above 98.5%."""

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
    assert "built-in MNIST sample" in proc.stdout and f"validation accuracy {100 * best:.2f}%" in proc.stdout
