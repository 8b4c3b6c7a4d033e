"""Suspect labels set aside half-way through a run (training/set_aside.py).

Units check which images are chosen and that a set-aside image's label no longer moves the gradient;
end-to-end runs of the real command (FAST: 3 epochs, so the decision comes at the start of epoch 3,
step 12) check the label review's marks, the history, and that a run killed after the decision resumes
with the same images set aside, bit for bit; a forged decision in a checkpoint is refused.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_same_weights, finished_run, load_state, run_cli, stripped_history

ON = [*FAST, "--set", "set_aside=on"]


def test_the_lowest_scores_are_chosen_never_the_unseen():
    from cnn_finetune.training.set_aside import decide, lowest, switch_epoch

    scores = torch.tensor([0.5, -2.0, float("nan"), 3.0, -2.0, 1.0] + [4.0] * 34, dtype=torch.float64)
    assert lowest(scores).tolist() == [1, 4]  # 5% of 40: the two lowest (tied: by index); NaN (never trained on) never
    assert lowest(scores, 0.1).tolist() == [0, 1, 4, 5]
    assert decide("on", scores, 2).images.tolist() == [1, 4]
    off = decide("off", scores, 2)
    assert off.images.numel() == 0 and off.note == "off"
    with pytest.raises(ValueError, match="resolved to on or off"):
        decide("auto", scores, 2)
    assert [switch_epoch(e) for e in (3, 4, 89)] == [2, 2, 45]


@pytest.mark.parametrize("separability, fine_tuning, expected, why", [
    (0.8, True, "on", "below 90%: classes new to the base model; half-way, the 5% of the training images"),
    (0.97, True, "off", "at least 90%: classes much like the base model's"),
    (None, True, "off", "was not measured"),
    (0.8, False, "off", "training from scratch")])
def test_likely_wrong_labels_are_set_aside_for_classes_new_to_the_base_model(separability, fine_tuning, expected, why):
    from cnn_finetune.config import TrainConfig
    from cnn_finetune.training.recipe import resolve

    resolved = resolve(TrainConfig(), 5, fine_tuning, separability=separability, per_class=30)
    assert resolved.config.set_aside == expected
    assert resolved.notes["set_aside"].startswith(f"auto: {expected} (") and why in resolved.notes["set_aside"]
    explicit = resolve(TrainConfig(set_aside="off"), 5, fine_tuning, separability=separability, per_class=30)
    assert explicit.config.set_aside == "off" and "set_aside" not in explicit.notes  # the user's choice stays


def test_a_set_aside_image_no_longer_moves_the_gradient(tmp_path: Path):
    from cnn_finetune.config import TrainConfig
    from cnn_finetune.training.trainer import RobustTrainer, SplitData

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.arange(16) % 4
    data = SplitData(images, labels, images[:4], labels[:4], ["a", "b", "c", "d"], 0.1, 0.3, "x")
    trainer = RobustTrainer(TrainConfig(width=8, batch_size=16, output_dir=str(tmp_path), base_model=None), data,
                            torch.device("cpu"), log=lambda s: None)

    def gradient(y: torch.Tensor) -> torch.Tensor:
        x = trainer.prepare(images.float() / 255)
        trainer.steps._forward_backward(x, y, torch.arange(16), 16.0, 1.0)
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    relabelled = labels.clone()
    relabelled[:3] = (labels[:3] + 1) % 4
    assert not torch.equal(gradient(labels), gradient(relabelled))  # every label counts
    trainer.steps.set_aside(torch.tensor([0, 1, 2]))
    assert torch.equal(gradient(labels), gradient(relabelled))  # set aside: their labels count no more
    trainer.steps.set_aside(torch.zeros(0, dtype=torch.int64))
    assert trainer.steps.keep is None


@pytest.fixture(scope="module")
def aside_reference(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run([*ON, "--data", str(tiny_idx)], tmp_path_factory, "asideref")


def test_the_review_marks_the_images_the_run_set_aside(aside_reference: Path):
    state = load_state(aside_reference / "checkpoint_last.pth")
    decision = state["set_aside"]
    assert decision["epoch"] == 2 and decision["images"].numel() == 18  # 5% of the 360 training images
    assert decision["note"] == "the 18 lowest-margin training images (5% of them)"
    with open(aside_reference / "label_review.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    marked = [r for r in rows if r["set_aside"] == "yes"]
    assert len(marked) == 18 and all(r["set_aside"] == "" for r in rows if r not in marked)
    assert all(int(r["times_seen"]) == 3 for r in marked)  # still trained on (weight 0), still reviewed
    history = json.loads((aside_reference / "history.json").read_text())
    events = [e for r in history for e in r["events"] if e["type"] == "set_aside"]
    assert events == [{"type": "set_aside", "epoch": 3, "images": 18, "note": decision["note"]}]
    assert [e for e in history[2]["events"] if e["type"] == "set_aside"]  # recorded in the epoch it began
    assert ("set_aside: the 18 lowest-margin training images (5% of them) stop counting in the loss from epoch 3 on "
            "(marked in label_review.csv)") in (aside_reference / "train.log").read_text()


def test_a_run_stopped_and_killed_after_the_decision_resumes_bit_for_bit(aside_reference: Path, tiny_idx: Path,
                                                                         tmp_path: Path):
    args = [*ON, "--data", str(tiny_idx), "--output-dir", "out"]
    proc = run_cli(args, cwd=tmp_path, faults="sigint@14")  # epoch 3, two steps after the decision: saved there
    assert proc.returncode == 130, proc.stderr
    stopped = load_state(tmp_path / "out" / "checkpoint_last.pth")
    assert stopped["position"]["global_step"] == 15
    assert torch.equal(stopped["set_aside"]["images"], load_state(aside_reference / "checkpoint_last.pth")["set_aside"]["images"])
    proc = run_cli(args, cwd=tmp_path, faults="kill@16")  # resumed with the saved decision, then killed
    assert proc.returncode == -9, proc.stderr
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoint_last.pth", "best_model_finetuned.pth"):
        assert_same_weights(aside_reference / name, tmp_path / "out" / name)
    assert stripped_history(aside_reference) == stripped_history(tmp_path / "out")
    assert (tmp_path / "out" / "label_review.csv").read_bytes() == (aside_reference / "label_review.csv").read_bytes()


def test_another_set_aside_setting_is_refused_on_resume(tiny_idx: Path, tmp_path: Path):
    proc = run_cli([*ON, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path, faults="sigint@14")
    assert proc.returncode == 130, proc.stderr[-2000:]
    before = (tmp_path / "out" / "checkpoint_last.pth").read_bytes()
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--set", "set_aside=off", "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "set_aside: checkpoint has 'on', this run has 'off'" in proc.stderr
    assert (tmp_path / "out" / "checkpoint_last.pth").read_bytes() == before
