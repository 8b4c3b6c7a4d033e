"""Which weights become best_model_finetuned.pth (``model_selection``): the final epoch's unless the best
validation epoch is significantly better on the validation images that chose it (training/selection.py).
The runs are real CLI runs; the choice is checked against the weights and predictions themselves."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, load_state, run_cli

# A run whose best validation epoch (6: 63% of the 30 selection images) is not its last (8: 47%), on tiny
# data with a constant, high learning rate: the situation the choice is about.
NOISY = [*FAST, "--epochs", "8", "--base-model", "none", "--set", "scheduler=constant", "--lr", "0.02"]


def test_sign_test_matches_enumeration():
    from cnn_finetune.training.selection import sign_test_p

    for wins, losses in [(0, 0), (1, 0), (4, 0), (5, 0), (7, 2), (3, 3), (0, 6), (9, 1)]:
        n = wins + losses
        # Every outcome of n fair coin tosses, counted: the share with at least ``wins`` heads.
        brute = sum(sum(t) >= wins for t in itertools.product((0, 1), repeat=n)) / 2 ** n if n else 1.0
        assert sign_test_p(wins, losses) == pytest.approx(brute, abs=1e-12)
    assert sign_test_p(5, 0) < 0.05 < sign_test_p(4, 0)  # five images to none is the smallest significant gap


@pytest.fixture(scope="module")
def noisy_runs(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    runs = {}
    for rule in ("auto", "best"):
        cwd = tmp_path_factory.mktemp(f"select-{rule}")
        proc = run_cli([*NOISY, "--data", str(tiny_idx), "--set", f"model_selection={rule}", "--output-dir", str(cwd / "out")], cwd)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[rule] = (cwd / "out", proc.stdout + proc.stderr)
    return runs


def _selection_part(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images that chose the epoch, rebuilt as the run built them (same data, seed, fractions)."""
    from cnn_finetune.config import TrainConfig
    from cnn_finetune.pipeline import prepare_data

    cfg = TrainConfig.from_dict(json.loads((out / "config_finetuned.json").read_text())["config"], source="test")
    data = prepare_data(cfg)
    data.hold_out_for_calibration(cfg)
    return data.split.selection_part()


def _right(state: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from cnn_finetune.model.loading import model_from_state
    from cnn_finetune.tools.inference import predict_logits

    model, meta = model_from_state(state, "the test's model")
    return predict_logits(model, meta, images).argmax(1) == labels


def test_auto_keeps_the_final_weights_unless_the_best_epoch_is_significantly_better(noisy_runs):
    from cnn_finetune.training.selection import SIGNIFICANCE, sign_test_p

    out, log = noisy_runs["auto"]
    history = json.loads((out / "history.json").read_text())
    best_epoch = max(history, key=lambda r: (r["val_acc"], -r["val_loss"]))["epoch"]
    assert best_epoch != len(history) == 8, "the fixture's run should peak before its end"
    kept = load_state(out / "best_model_finetuned.pth")
    last = load_state(out / "checkpoint_last.pth")
    best = load_state(next(out.glob(f"best_epoch{best_epoch:03d}_*.pth")))
    record = kept["selection"]
    assert record["best_validation_epoch"] == best_epoch and record["final_epoch"] == 8

    # The counts are those of the two models on the 30 selection images (the 10 kept for the temperature left out).
    images, labels = _selection_part(out)
    best_right, final_right = _right(best, images, labels), _right(last, images, labels)
    assert record["validation_images"] == len(labels) == 30
    assert record["only_best_right"] == int((best_right & ~final_right).sum()) > record["only_final_right"]
    assert record["only_final_right"] == int((final_right & ~best_right).sum())
    assert record["p_value"] == pytest.approx(sign_test_p(record["only_best_right"], record["only_final_right"]), abs=1e-6)
    if record["p_value"] < SIGNIFICANCE:
        # The trajectory of this noisy run depends on the CPU's rounding (on an AMD EPYC the best epoch's gap is
        # significant, p 0.004): then the rule keeps the best epoch, its file bit for bit.
        assert record["kept_epoch"] == best_epoch and kept["epoch"] == best_epoch
        assert all(torch.equal(kept["model"][k], v) for k, v in best["model"].items())
        assert json.loads((out / "evaluation.json").read_text())["model"]["epoch"] == best_epoch
        return
    assert record["kept_epoch"] == 8

    # The model file is the final weights, bit for bit, with their epoch, and every tool reads it.
    assert kept["epoch"] == 8 and kept["metrics"]["val_acc"] == pytest.approx(history[-1]["val_acc"])
    for k, v in last["model"].items():
        assert torch.equal(kept["model"][k], v), k
    assert "calibration" in kept  # fitted for the kept weights, after the choice
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["model"]["epoch"] == 8
    assert f"model_selection: auto: epoch 8 (on 30 validation images epoch {best_epoch} alone gets" in log
    assert f"best epoch {best_epoch}: val_acc" in log and "holds the final weights, epoch 8 (model_selection auto)" in log
    # The best-K files stay the best validation epochs.
    assert (out / f"best_epoch{best_epoch:03d}_val_acc{history[best_epoch - 1]['val_acc']:.4f}.pth").is_file()


def test_best_keeps_the_best_validation_epoch_as_before(noisy_runs):
    out, log = noisy_runs["best"]
    auto_history = json.loads((noisy_runs["auto"][0] / "history.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert [r["val_acc"] for r in history] == [r["val_acc"] for r in auto_history]  # the rule changes no training
    kept = load_state(out / "best_model_finetuned.pth")
    best_epoch = max(history, key=lambda r: (r["val_acc"], -r["val_loss"]))["epoch"]
    assert kept["epoch"] == best_epoch and "selection" not in kept and "model_selection" not in log
    twin = next(out.glob(f"best_epoch{best_epoch:03d}_*.pth"))
    assert twin.samefile(out / "best_model_finetuned.pth")


def test_a_significant_gap_keeps_the_best_epoch_and_redoing_the_choice_changes_nothing(noisy_runs, tmp_path, monkeypatch):
    """The same finished run, chosen again with a looser significance under which its gap counts: the best
    epoch's file becomes best_model_finetuned.pth again (a hard link, as during training); choosing twice
    gives the same file. Under a stricter one the final weights are kept instead."""
    from cnn_finetune.files.rundir import RunDir
    from cnn_finetune.training import selection

    out = tmp_path / "out"
    shutil.copytree(noisy_runs["auto"][0], out)
    p = load_state(out / "best_model_finetuned.pth")["selection"]["p_value"]
    monkeypatch.setattr(selection, "SIGNIFICANCE", min(1.0, p * 1.5))
    images, labels = _selection_part(out)
    right = lambda state: _right(state, images, labels)  # noqa: E731
    for _ in range(2):
        choice = selection.select_model(RunDir(out), "auto", right)
        assert choice is not None and choice.kept_epoch == choice.best_epoch != 8
        twin = next(out.glob(f"best_epoch{choice.best_epoch:03d}_*.pth"))
        assert twin.samefile(out / "best_model_finetuned.pth")
        kept = load_state(out / "best_model_finetuned.pth")
        assert kept["epoch"] == choice.best_epoch and kept["selection"]["kept_epoch"] == choice.best_epoch
    # The same gap under a significance it does not reach (p not under it): "auto" keeps the final weights, bit
    # for bit, on every machine, whichever way the CLI run's own p fell on this CPU.
    p = choice.p_value  # exact (the file's record rounds it)
    monkeypatch.setattr(selection, "SIGNIFICANCE", p)
    last = load_state(out / "checkpoint_last.pth")
    choice = selection.select_model(RunDir(out), "auto", right)
    assert choice.kept_epoch == 8 and choice.p_value == pytest.approx(p, abs=1e-6)
    kept = load_state(out / "best_model_finetuned.pth")
    assert kept["epoch"] == 8 and kept["selection"]["kept_epoch"] == 8 and kept["selection"]["significance"] == p
    final = (last.get("averaged") or last)["model"]  # the averaged weights when the run averaged them
    assert all(torch.equal(kept["model"][k], v) for k, v in final.items())
    assert not twin.samefile(out / "best_model_finetuned.pth")
    # "last" takes the final weights whatever the evidence.
    choice = selection.select_model(RunDir(out), "last", right)
    assert choice.kept_epoch == 8 and load_state(out / "best_model_finetuned.pth")["epoch"] == 8
    assert load_state(twin)["epoch"] == choice.best_epoch  # the best epoch's own file is left as it was
