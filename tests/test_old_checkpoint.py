"""A run folder written by the code before the package was split into sub-packages still resumes.

``tests/fixtures/premove_run/`` was made by the flat-layout code (commit 59abac7) with the FAST
settings on the tiny data, stopped by SIGINT after global step 8 (epoch 2 of 3). Checkpoints hold
plain tensors, numbers and strings, never pickled class paths, so moving modules must not matter:
resuming it now ends with exactly the weights of an uninterrupted run of today's code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import FAST, assert_same_weights, load_state, run_cli, stripped_history

FIXTURE = Path(__file__).parent / "fixtures" / "premove_run"


def test_checkpoint_holds_no_class_paths() -> None:
    # A pickled class of ours would be a global outside torch's weights-only allow-list.
    for name in ("checkpoint_last.pth", "best_model_finetuned.pth"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(FIXTURE / name) == []
    state = load_state(FIXTURE / "checkpoint_last.pth")
    assert state["position"]["global_step"] == 9


def test_a_run_saved_before_the_move_resumes_bit_exactly(reference_run: Path, tiny_idx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resum" in proc.stdout.lower()
    assert_same_weights(reference_run / "checkpoint_last.pth", out / "checkpoint_last.pth")
    assert stripped_history(reference_run) == stripped_history(out)
    assert len(json.loads((out / "history.json").read_text())) == 3
