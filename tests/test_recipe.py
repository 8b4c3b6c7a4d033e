"""The recipe that fits the data: the automatic training length, extending a finished run (exactly
resumable, like any run), and the MNIST base model shipped in the package."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, ROOT, assert_same_weights, load_state, run_cli, stripped_history

from cnn_finetune.config import PACKAGED_BASE_MODEL, TrainConfig
from cnn_finetune.training.recipe import auto_epochs, resolve, segment_lr

# FAST without its explicit --epochs: the tests below choose the length themselves.
SHORT = [a for a in FAST if a not in ("--epochs", "3")]


@pytest.mark.parametrize("steps, expected", [(36, 23), (14, 58), (7, 115), (3, 150), (1, 150), (200, 15)])
def test_auto_epochs_is_a_budget_of_updates_within_a_floor_and_a_ceiling(steps, expected):
    cfg = TrainConfig()  # at least 800 updates, 15 to 150 epochs
    epochs, why = auto_epochs(cfg, steps)
    assert epochs == expected
    assert f"{epochs} epochs" in why and f"{steps} steps" in why
    # a smaller dataset (fewer steps per epoch) never gets fewer epochs
    assert auto_epochs(cfg, max(1, steps // 2))[0] >= epochs
    # from a base model the ceiling is 60 epochs: the features already work
    tuned, why = auto_epochs(cfg, steps, fine_tuning=True)
    assert tuned == min(expected, 60) and "when fine-tuning" in why
    # ... and 90 for classes new to the base model, whose feature layers must learn new shapes
    new, why = auto_epochs(cfg, steps, fine_tuning=True, new_classes=True)
    assert new == min(expected, 90) and "when fine-tuning classes new to the base model" in why
    assert auto_epochs(cfg, steps, fine_tuning=False, new_classes=True)[0] == expected  # from scratch: no base to be new to


@pytest.mark.parametrize("separability, epochs", [(None, 60), (0.97, 60), (0.899, 90), (0.75, 90)])
def test_the_fine_tuning_length_follows_how_well_the_base_features_fit(separability, epochs):
    tuned = resolve(TrainConfig(), 3, fine_tuning=True, separability=separability, per_class=27)
    assert tuned.config.epochs == epochs and tuned.notes["epochs"].startswith(f"auto: {epochs} epochs (the ceiling) of 3 steps")
    assert ("classes new to the base model" in tuned.notes["epochs"]) == (epochs == 90)
    assert resolve(TrainConfig(epochs=7), 3, fine_tuning=True, separability=separability).config.epochs == 7  # explicit


def test_resolve_fills_in_the_automatic_settings():
    scratch = resolve(TrainConfig(), 36, fine_tuning=False)
    tuned = resolve(TrainConfig(), 36, fine_tuning=True)
    assert scratch.config.epochs == 23 and scratch.config.patience == 13  # 8 x 23 / 15, rounded up
    assert scratch.config.feature_lr_scale == 1.0 and tuned.config.feature_lr_scale < 1.0
    explicit = resolve(TrainConfig(epochs=5, patience=2, feature_lr_scale=0.5), 36, fine_tuning=True)
    assert (explicit.config.epochs, explicit.config.patience, explicit.config.feature_lr_scale) == (5, 2, 0.5)
    assert not {"epochs", "patience", "feature_lr_scale"} & set(explicit.notes)  # nothing was chosen for the user


def test_an_extension_has_its_own_learning_rate_segment():
    cfg = TrainConfig(epochs=10, lr=0.01)
    plan = [(0, 100)]
    extended = [(0, 100), (100, 200)]
    assert segment_lr(99, plan, cfg) == pytest.approx(0.01 / 1e4)  # the plan annealed to (almost) zero
    assert segment_lr(99, extended, cfg) == segment_lr(99, plan, cfg)  # the past is unchanged
    lrs = [segment_lr(s, extended, cfg) for s in range(100, 200)]
    peak = max(lrs)
    assert peak == pytest.approx(0.01 * 0.5) and lrs.index(peak) < 20  # a short warm-up to half the peak
    assert lrs[-1] < peak / 1000  # then a decay to (almost) zero
    early = [(0, 100), (60, 200)]  # an early-stopped run extended from step 60 follows the new segment
    assert segment_lr(60, early, cfg) == segment_lr(100, extended, cfg)


def test_auto_length_is_chosen_recorded_and_overridden(tiny_idx: Path, tmp_path: Path):
    args = [*SHORT, "--data", str(tiny_idx), "--set", "budget_updates=30", "--set", "budget_min_epochs=2",
            "--set", "budget_max_epochs=4"]
    proc = run_cli([*args, "--output-dir", "auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "auto" / "config_finetuned.json").read_text())
    assert manifest["config"]["epochs"] == 4 and manifest["resolved"]["epochs"] == 4  # 30 updates / 6 steps: 5, above the ceiling
    why = manifest["resolved"]["automatic"]["epochs"]
    assert why.startswith("auto: 4 epochs (the ceiling) of 6 steps") and f"epochs: {why}" in proc.stdout
    assert len(json.loads((tmp_path / "auto" / "history.json").read_text())) == 4
    proc = run_cli([*args, "--epochs", "3", "--output-dir", "explicit"], cwd=tmp_path)
    assert proc.returncode == 0 and "epochs: auto" not in proc.stdout
    assert json.loads((tmp_path / "explicit" / "config_finetuned.json").read_text())["config"]["epochs"] == 3


# --- extending a finished run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def extended_reference(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs, then the same command with --epochs 4: the uninterrupted extension."""
    work = tmp_path_factory.mktemp("extended")
    for epochs in ("2", "4"):
        proc = run_cli([*SHORT, "--data", str(tiny_idx), "--epochs", epochs, "--output-dir", "out"], cwd=work)
        assert proc.returncode == 0, proc.stderr
    return work / "out"


def test_a_finished_run_is_extended_from_its_final_state(extended_reference: Path):
    history = json.loads((extended_reference / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    marks = [e for r in history for e in r["events"] if e["type"] == "extended"]
    assert marks == [{"type": "extended", "from_epochs": 2, "to_epochs": 4, "global_step": 12}]
    assert "extended" in [e["type"] for e in history[2]["events"]]  # in the record of the first added epoch
    # the added epochs have their own warm-up: the lr rises again after the plan had annealed it
    assert history[1]["lr"] < 1e-5 < history[2]["lr"]
    state = load_state(extended_reference / "checkpoint_last.pth")
    assert state["schedule"] == [[0, 12], [12, 24]] and state["finished"]["reason"] == "completed"
    assert json.loads((extended_reference / "config_finetuned.json").read_text())["config"]["epochs"] == 4


def test_an_interrupted_extension_resumes_bit_for_bit(extended_reference: Path, tiny_idx: Path, tmp_path: Path):
    args = [*SHORT, "--data", str(tiny_idx), "--output-dir", "out"]
    assert run_cli([*args, "--epochs", "2"], cwd=tmp_path).returncode == 0
    step = random.Random(2026).randrange(12, 23)  # somewhere in the added epochs
    proc = run_cli([*args, "--epochs", "4"], cwd=tmp_path, faults=f"kill@{step}")
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_cli([*args, "--epochs", "4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(extended_reference / "checkpoint_last.pth", tmp_path / "out" / "checkpoint_last.pth")
    assert stripped_history(extended_reference) == stripped_history(tmp_path / "out")


def test_extending_refuses_fewer_epochs_and_other_data(extended_reference: Path, tiny_idx: Path, tmp_path: Path):
    import shutil

    from cnn_finetune.data.loader import read_idx, write_idx

    work = tmp_path / "work"
    shutil.copytree(extended_reference.parent, work)
    proc = run_cli([*SHORT, "--data", str(tiny_idx), "--epochs", "3", "--output-dir", "out"], cwd=work)
    assert proc.returncode == 2 and "--epochs 3 is fewer than the 4 epochs the run in out has already done" in proc.stderr
    other = tmp_path / "other"
    other.mkdir()
    imgs, labels = read_idx(tiny_idx), read_idx(tiny_idx.with_name("train-labels-idx1-ubyte.gz"))
    write_idx(other / "train-images-idx3-ubyte.gz", imgs[:-10])
    write_idx(other / "train-labels-idx1-ubyte.gz", labels[:-10])
    proc = run_cli([*SHORT, "--data", str(other / "train-images-idx3-ubyte.gz"), "--epochs", "6", "--output-dir", "out"], cwd=work)
    assert proc.returncode == 2 and "different data" in proc.stderr
    proc = run_cli([*SHORT, "--data", str(tiny_idx), "--epochs", "6", "--lr", "0.01", "--output-dir", "out"], cwd=work)
    assert proc.returncode == 2 and "lr: checkpoint has 0.003, this run has 0.01" in proc.stderr


def test_an_early_stopped_run_is_extended_from_where_it_stopped(tiny_idx: Path, tmp_path: Path):
    args = [*SHORT, "--data", str(tiny_idx), "--output-dir", "out", "--patience", "2", "--min-delta", "0.5"]
    proc = run_cli([*args, "--epochs", "10"], cwd=tmp_path)
    assert proc.returncode == 0 and "early stopping after epoch 3" in proc.stdout
    proc = run_cli([*args, "--epochs", "12"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = load_state(tmp_path / "out" / "checkpoint_last.pth")
    assert state["schedule"] == [[0, 60], [18, 72]]  # the new segment starts at the step where the run stopped
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history[3]["epoch"] == 4 and any(e["type"] == "extended" for e in history[3]["events"])


# --- the shipped MNIST base model ---------------------------------------------------------------------


def test_the_shipped_base_model_is_the_default_base(tiny_idx: Path, tmp_path: Path):
    assert PACKAGED_BASE_MODEL.is_file()
    args = ["--data", str(tiny_idx), "--epochs", "1", "--batch-size", "64", "--cooldown", "0",
            "--set", "checkpoint_every_seconds=0"]
    proc = run_cli([*args, "--output-dir", "tuned"], cwd=tmp_path)  # default width 24: the shipped base fits
    assert proc.returncode == 0, proc.stderr
    assert "fine-tuning from the MNIST base model shipped with the package" in proc.stdout
    manifest = json.loads((tmp_path / "tuned" / "config_finetuned.json").read_text())
    assert manifest["resolved"]["init"].startswith(f"fine-tuning from {PACKAGED_BASE_MODEL}")
    assert manifest["config"]["feature_lr_scale"] < 1.0  # the fine-tuning recipe
    proc = run_cli([*args, "--base-model", "none", "--output-dir", "scratch"], cwd=tmp_path)
    assert proc.returncode == 0 and "fine-tuning" not in proc.stdout
    scratch = json.loads((tmp_path / "scratch" / "config_finetuned.json").read_text())
    assert scratch["resolved"]["init"] == "training from scratch" and scratch["config"]["feature_lr_scale"] == 1.0


def test_the_shipped_base_model_is_not_used_on_the_data_it_was_trained_on():
    from cnn_finetune.pipeline import prepare_data, resolve_base_model

    data = prepare_data(TrainConfig(base_model="models/cnn_modelo_v2/best_model.pth"))  # the built-in sample
    base, note = resolve_base_model(TrainConfig(), data)
    assert base is None and "was trained on this very data" in note


@pytest.mark.long
def test_the_shipped_base_model_is_made_by_its_documented_command(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_base_model.py"), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the retrained base model equals the shipped one" in proc.stdout
    state = torch.load(PACKAGED_BASE_MODEL, weights_only=True)["state"]
    assert state["made_by"].startswith("python scripts/make_base_model.py") and state["class_names"] == [str(i) for i in range(10)]


# --- the feature-layer learning rate chosen from the data (issue 18) ---------------------------------


def _two_class_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of two classes told apart by where the ink is (top or bottom half), with noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (2 * n, 1, 28, 28), generator=g, dtype=torch.uint8)
    x[:n, :, :14] += 150
    x[n:, :, 14:] += 150
    return x, torch.tensor([0] * n + [1] * n)


def test_feature_separability_is_a_leave_one_out_nearest_class_mean_accuracy():
    from cnn_finetune.training.recipe import feature_separability

    x, y = _two_class_images(20)
    pixels = torch.nn.Flatten()  # "features" that are the pixels themselves: the two classes are far apart
    assert feature_separability(pixels, x, y, 0.3, 0.3) == 1.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert feature_separability(pixels, x, shuffled, 0.3, 0.3) < 0.7  # labels unrelated to the features: near chance
    # leave-one-out: an image alone in its class has no class mean to be near, and counts as wrong
    lonely = torch.cat([y, torch.tensor([2])])
    blank = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    assert feature_separability(pixels, torch.cat([x, blank]), lonely, 0.3, 0.3) == pytest.approx(40 / 41)
    # the same numbers on every call (no random draw), and a module in training mode is left so
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
    conv.train()
    first = feature_separability(conv, x, y, 0.3, 0.3)
    assert feature_separability(conv, x, y, 0.3, 0.3) == first and conv.training
    assert int(conv[1].num_batches_tracked) == 0  # evaluation mode: the batch-norm statistics are not touched


def test_the_probe_looks_at_a_stratified_capped_subset():
    from cnn_finetune.training.recipe import probe_subset

    labels = torch.arange(3).repeat_interleave(1000)[torch.randperm(3000, generator=torch.Generator().manual_seed(0))]
    images = torch.arange(3000).view(-1, 1, 1, 1)
    sub_x, sub_y = probe_subset(images, labels, limit=300)
    assert torch.bincount(sub_y).tolist() == [100, 100, 100]
    for c in range(3):  # the first images of each class, in the split's order
        assert sub_x.flatten()[sub_y == c].tolist() == torch.nonzero(labels == c).flatten()[:100].tolist()
    assert probe_subset(images[:50], labels[:50], limit=300)[1].tolist() == labels[:50].tolist()


@pytest.mark.parametrize("separability, per_class, factor, why", [
    (None, 90, 0.3, "feature layers learn slower than the new head)"),
    (0.97, 27, 0.3, "97.0% nearest-class-mean accuracy, at least 90%: classes much like"),
    (0.97, 90, 0.3, "97.0% nearest-class-mean accuracy, at least 90%: classes much like"),  # digits, however many
    (0.80, 27, 0.7, "80.0% nearest-class-mean accuracy, below 90%: classes new to the base model, and 27 training "
                    "images per class, under 50: the feature layers must learn the new shapes, slower than the head "
                    "with this few images)"),
    (0.80, 90, 1.0, "below 90%: classes new to the base model, and 90 training images per class, at least 50: enough "
                    "for the feature layers to learn at the head's rate)"),
    (0.80, None, 0.7, "below 90%: classes new to the base model: the feature layers must learn")])
def test_the_fine_tuning_factor_follows_how_well_the_base_features_fit_and_how_many_images(separability, per_class,
                                                                                           factor, why):
    tuned = resolve(TrainConfig(), 36, fine_tuning=True, separability=separability, per_class=per_class)
    # 0.3 for digits (and when nothing was measured); 0.7 for new classes with few images, 1.0 with enough of them
    assert tuned.config.feature_lr_scale == factor and why in tuned.notes["feature_lr_scale"]
    assert tuned.notes["feature_lr_scale"].startswith(f"auto: {factor} (")
    # from scratch, or with an explicit factor, the measurement changes nothing
    assert resolve(TrainConfig(), 36, fine_tuning=False, separability=separability).config.feature_lr_scale == 1.0
    explicit = resolve(TrainConfig(feature_lr_scale=0.5), 36, fine_tuning=True, separability=separability)
    assert explicit.config.feature_lr_scale == 0.5 and "feature_lr_scale" not in explicit.notes


@pytest.mark.parametrize("separability, per_class, frozen", [
    (0.99, 27, True), (0.95, 90, True), (0.95, 100, True),  # digits, up to the largest size measured
    (0.949, 27, False), (0.80, 27, False),  # not separated well enough: the features must learn
    (0.99, 101, False),  # more images than measured: the features learn at 0.3, as before
    (None, 27, False), (0.99, None, False)])  # nothing measured, nothing known: the default
def test_classes_the_base_already_separates_train_the_head_alone(separability, per_class, frozen):
    from cnn_finetune.training.recipe import FREEZE_WHOLE_RUN

    tuned = resolve(TrainConfig(), 36, fine_tuning=True, separability=separability, per_class=per_class)
    assert tuned.config.freeze_features_epochs == (FREEZE_WHOLE_RUN if frozen else 0)
    new = separability is not None and separability < 0.9
    assert tuned.config.feature_lr_scale == ((1.0 if per_class and per_class >= 50 else 0.7) if new else 0.3)
    if frozen:
        why = tuned.notes["freeze_features_epochs"]
        assert why.startswith("auto: the whole run (") and f"{100 * separability:.1f}% nearest-class-mean" in why
        assert f"{per_class} training images per class, at most 100: only the head trains" in why
        assert tuned.notes["feature_lr_scale"].endswith("; no effect while the feature layers are frozen")
    else:
        assert "freeze_features_epochs" not in tuned.notes
    # The user's own choice of either setting, or training from scratch, is never overridden.
    for cfg in (TrainConfig(feature_lr_scale=0.3), TrainConfig(freeze_features_epochs=3)):
        explicit = resolve(cfg, 36, fine_tuning=True, separability=separability, per_class=per_class)
        assert explicit.config.freeze_features_epochs == (cfg.freeze_features_epochs or 0)
    assert resolve(TrainConfig(), 36, fine_tuning=False, separability=separability,
                   per_class=per_class).config.freeze_features_epochs == 0


def _scrambled(images: np.ndarray, labels: np.ndarray, folder: Path) -> Path:
    """Digits with their pixels in a fixed shuffled order, as an IDX pair in ``folder``: classes the MNIST
    base cannot tell apart."""
    from cnn_finetune.data.loader import write_idx

    order = np.random.default_rng(0).permutation(784)
    folder.mkdir(exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.ascontiguousarray(images.reshape(-1, 784)[:, order].reshape(-1, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder / "train-images-idx3-ubyte.gz"


def _scrambled_digits(tiny_idx: Path, folder: Path) -> Path:
    """The tiny digits, scrambled (``_scrambled``)."""
    from cnn_finetune.data.loader import read_idx

    return _scrambled(read_idx(tiny_idx), read_idx(tiny_idx.parent / "train-labels-idx1-ubyte.gz"), folder)


def test_the_feature_rate_is_said_recorded_and_kept_on_resume(tiny_idx: Path, tmp_path: Path, monkeypatch):
    from cnn_finetune.training import recipe

    args = ["--epochs", "1", "--batch-size", "64", "--cooldown", "0", "--set", "checkpoint_every_seconds=0"]
    runs = {"digits": (tiny_idx, "at least 90%", 0.3),
            "scrambled": (_scrambled_digits(tiny_idx, tmp_path / "scrambled_data"), "below 90%", 0.7)}
    for name, (data, verdict, factor) in runs.items():
        proc = run_cli([*args, "--data", str(data), "--output-dir", name], cwd=tmp_path)  # the shipped base model
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((tmp_path / name / "config_finetuned.json").read_text())
        why = manifest["resolved"]["automatic"]["feature_lr_scale"]
        assert f"feature_lr_scale: {why}" in proc.stdout and f"nearest-class-mean accuracy, {verdict}" in why
        assert manifest["config"]["feature_lr_scale"] == factor and why.startswith(f"auto: {factor} (")
        assert load_state(tmp_path / name / "checkpoint_last.pth")["automatic"]["feature_lr_scale"] == why
    # The digits (the base model's own kind, 36 training images per class) train the head alone, and say so.
    digits = json.loads((tmp_path / "digits" / "config_finetuned.json").read_text())
    frozen_why = digits["resolved"]["automatic"]["freeze_features_epochs"]
    assert digits["config"]["freeze_features_epochs"] == recipe.FREEZE_WHOLE_RUN and "only the head trains" in frozen_why
    scrambled = json.loads((tmp_path / "scrambled" / "config_finetuned.json").read_text())
    assert scrambled["config"]["freeze_features_epochs"] == 0 and "freeze_features_epochs" not in scrambled["resolved"]["automatic"]
    # Clean batch-norm statistics for the classes new to the base model only; the frozen digits keep the base's.
    assert digits["config"]["bn_stats"] == "training" and scrambled["config"]["bn_stats"] == "clean"
    clean_why = scrambled["resolved"]["automatic"]["bn_stats"]
    assert clean_why.startswith("auto: clean (") and "below 90%" in clean_why
    assert load_state(tmp_path / "scrambled" / "checkpoint_last.pth")["automatic"]["bn_stats"] == clean_why
    assert load_state(tmp_path / "scrambled" / "checkpoint_last.pth")["averaged"]["updates"] > 0  # the clean copy is kept
    # The likely wrong labels set aside half-way, for the new classes only (said, and kept in the checkpoint).
    assert digits["config"]["set_aside"] == "off" and scrambled["config"]["set_aside"] == "on"
    aside_why = scrambled["resolved"]["automatic"]["set_aside"]
    assert aside_why.startswith("auto: on (") and "below 90%" in aside_why and f"set_aside: {aside_why}" in proc.stdout
    base = load_state(PACKAGED_BASE_MODEL)["model"]
    tuned = load_state(tmp_path / "digits" / "checkpoint_last.pth")["model"]
    features = [k for k in base if k.startswith("features.")]
    assert features and all(torch.equal(base[k], tuned[k]) for k in features)  # weights and batch-norm statistics
    # The measurement draws no random number: the default runs are the explicit runs of what they chose, bit for bit.
    for name, data, flags in (("digits", tiny_idx, ["--feature-lr-scale", "0.3", "--freeze-features-epochs",
                                                    str(recipe.FREEZE_WHOLE_RUN)]),
                              ("scrambled", runs["scrambled"][0], ["--feature-lr-scale", "0.7"])):
        chosen = json.loads((tmp_path / name / "config_finetuned.json").read_text())["config"]  # explicit too
        proc = run_cli([*args, "--data", str(data), *flags, "--set", f"tta={chosen['tta']}",
                        "--set", f"bn_stats={chosen['bn_stats']}", "--set", f"set_aside={chosen['set_aside']}",
                        "--output-dir", f"explicit-{name}"], cwd=tmp_path)
        assert proc.returncode == 0 and "nearest-class-mean" not in proc.stdout
        assert_same_weights(tmp_path / name / "checkpoint_last.pth", tmp_path / f"explicit-{name}" / "checkpoint_last.pth")
    # Extended (resumed) after the defaults changed (a newer version): the run keeps what its start chose.
    monkeypatch.setattr(recipe, "FINETUNE_FEATURE_LR_SCALE", 0.5)
    monkeypatch.setattr(recipe, "NEW_CLASSES_FEATURE_LR_SCALE", 0.8)
    monkeypatch.setattr(recipe, "FROZEN_MIN_SEPARABILITY", 1.01)
    for name in runs:
        proc = run_cli([*args[2:], "--epochs", "2", "--data", str(runs[name][0]), "--output-dir", name], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads((tmp_path / name / "history.json").read_text())) == 2
    manifest = json.loads((tmp_path / "scrambled" / "config_finetuned.json").read_text())
    assert manifest["config"]["feature_lr_scale"] == 0.7
    assert manifest["config"]["bn_stats"] == "clean"
    assert manifest["resolved"]["automatic"]["bn_stats"] == f"{clean_why}; decided when the run started, kept"
    assert manifest["config"]["set_aside"] == "on"
    assert manifest["resolved"]["automatic"]["set_aside"] == f"{aside_why}; decided when the run started, kept"
    assert manifest["resolved"]["automatic"]["feature_lr_scale"].endswith("slower than the head with this few images); "
                                                                          "decided when the run started, kept")
    manifest = json.loads((tmp_path / "digits" / "config_finetuned.json").read_text())
    assert manifest["config"]["freeze_features_epochs"] == recipe.FREEZE_WHOLE_RUN
    assert manifest["resolved"]["automatic"]["freeze_features_epochs"] == f"{frozen_why}; decided when the run started, kept"
    tuned = load_state(tmp_path / "digits" / "checkpoint_last.pth")["model"]
    assert all(torch.equal(base[k], tuned[k]) for k in features)  # the extension kept the features frozen


def test_new_classes_get_the_longer_fine_tuning_ceiling_through_the_command(tiny_idx: Path, tmp_path: Path):
    # the ceilings made small, so that the runs are short: 3 epochs for the digits, 4 for the scrambled ones;
    # the factor explicit, so that only the automatic length asks for the separability
    args = ["--batch-size", "64", "--cooldown", "0", "--set", "checkpoint_every_seconds=0",  # the shipped base's width
            "--feature-lr-scale", "0.3", "--set", "tta=off", "--set", "budget_min_epochs=1", "--set",
            "budget_max_epochs_finetune=3", "--set", "budget_max_epochs_new_classes=4"]
    runs = {"digits": (tiny_idx, 3, "when fine-tuning)"),
            "scrambled": (_scrambled_digits(tiny_idx, tmp_path / "scrambled_data"), 4,
                          "when fine-tuning classes new to the base model)")}
    for name, (data, epochs, why) in runs.items():
        proc = run_cli([*args, "--data", str(data), "--output-dir", name], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((tmp_path / name / "config_finetuned.json").read_text())
        assert manifest["config"]["epochs"] == epochs and manifest["resolved"]["automatic"]["epochs"].endswith(why)
        assert len(json.loads((tmp_path / name / "history.json").read_text())) == epochs
        assert "feature_lr_scale" not in manifest["resolved"]["automatic"]  # the explicit factor stays the user's
    # cut in its second epoch, then resumed with a ceiling that changed since: the run keeps the length it
    # was planned with, and says so
    cut = run_cli([*args, "--data", str(runs["scrambled"][0]), "--output-dir", "cut"], cwd=tmp_path, faults="sigint@7")
    assert cut.returncode == 130, cut.stderr[-2000:]
    started = load_state(tmp_path / "cut" / "checkpoint_last.pth")["automatic"]["epochs"]
    assert started.startswith("auto: 4 epochs (the ceiling)") and started.endswith("classes new to the base model)")
    proc = run_cli([*args[:-2], "--set", "budget_max_epochs_new_classes=2", "--data", str(runs["scrambled"][0]),
                    "--output-dir", "cut"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((tmp_path / "cut" / "history.json").read_text())) == 4
    kept = f"{started}; decided when the run started, kept"
    assert f"epochs: {kept}" in proc.stdout
    assert json.loads((tmp_path / "cut" / "config_finetuned.json").read_text())["resolved"]["automatic"]["epochs"] == kept


def test_new_classes_with_enough_images_fine_tune_the_features_at_full_rate(tmp_path: Path):
    # 60 built-in digits per class with their pixels scrambled: classes the base model cannot separate,
    # 54 training images each (at least ADAPT_MIN_PER_CLASS): the feature layers learn at the head's rate.
    from cnn_finetune.data.loader import load_dataset
    from cnn_finetune.training.recipe import ADAPT_MIN_PER_CLASS

    ds = load_dataset(None, use_cache=False)
    pick = torch.cat([torch.nonzero(ds.labels == c).flatten()[:60] for c in range(10)])
    data = _scrambled(ds.images[pick, 0].numpy(), ds.labels[pick].numpy(), tmp_path)
    proc = run_cli(["--epochs", "1", "--batch-size", "64", "--cooldown", "0", "--data", str(data), "--output-dir", "out"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "config_finetuned.json").read_text())
    why = manifest["resolved"]["automatic"]["feature_lr_scale"]
    assert manifest["config"]["feature_lr_scale"] == 1.0 and 54 >= ADAPT_MIN_PER_CLASS
    assert why.startswith("auto: 1.0 (fine-tuning from a base model;") and "54 training images per class" in why
    assert f"feature_lr_scale: {why}" in proc.stdout
