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

import pytest
import torch

from conftest import FAST, assert_same_weights, finished_run, load_state, run_cli, stripped_history

FIXTURE = Path(__file__).parent / "fixtures" / "premove_run"


def test_checkpoint_holds_no_class_paths() -> None:
    # A pickled class of ours would be a global outside torch's weights-only allow-list.
    for name in ("checkpoint_last.pth", "best_model_finetuned.pth"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(FIXTURE / name) == []
    state = load_state(FIXTURE / "checkpoint_last.pth")
    assert state["position"]["global_step"] == 9


@pytest.fixture(scope="module")
def whole_split_reference(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Today's uninterrupted run as a run of that time validated: on the whole validation split (the
    calibration part came later; a run begun before it keeps doing so when resumed)."""
    return finished_run([*FAST, "--data", str(tiny_idx), "--set", "calibration_fraction=0"], tmp_path_factory, "wholeref")


def test_a_run_saved_before_the_move_resumes_bit_exactly(reference_run: Path, whole_split_reference: Path,
                                                        tiny_idx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resum" in proc.stdout.lower()
    # The validation split never touches the weights: those of today's default run, bit for bit on the CPU
    # type that wrote the fixture; another one rounds the fixture's first 9 steps differently (an AMD EPYC:
    # 4.8e-7 at the end), so the comparison allows that much.
    assert_same_weights(reference_run / "checkpoint_last.pth", out / "checkpoint_last.pth", atol=1e-5)
    for a, b in zip(stripped_history(whole_split_reference), stripped_history(out), strict=True):
        assert a.keys() == b.keys() and a["epoch"] == b["epoch"] and a["val_acc"] == b["val_acc"]
        assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in ("train_loss", "val_loss"))
    assert stripped_history(reference_run) != stripped_history(out)  # (today's default validates on 30 of the 40)
    assert len(json.loads((out / "history.json").read_text())) == 3
