"""The moving average of the weights (``ema_decay``): its arithmetic, its batch-norm statistics, and that
it is training state - a killed and resumed run, and one that is retried after an error, end bit for bit
where the uninterrupted run does, and the best-model file holds the averaged weights that were validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_same_weights, finished_run, load_state, run_cli, stripped_history
from cnn_finetune.model.cnn import build_model
from cnn_finetune.training.averaging import WeightAverage

EMA = [*FAST, "--set", "ema_decay=0.999"]


def test_the_decay_warms_up_and_the_average_moves_by_one_minus_it():
    torch.manual_seed(0)
    model = build_model(3, width=4)
    avg = WeightAverage(model, 0.999)
    assert avg.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    before = [p.detach().clone() for p in avg.shadow.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model)
    for old, new, live in zip(before, avg.shadow.parameters(), model.parameters()):
        assert torch.allclose(new, 0.1 * old + 0.9 * live, atol=1e-6)
    assert avg.updates == 1 and avg.current_decay() == pytest.approx(2 / 11)
    avg.updates = 100_000
    assert avg.current_decay() == 0.999  # the ceiling, once warmed up
    off = WeightAverage(model, 0.0)
    assert not off.enabled and off.state_dict() is None
    off.update(model)  # a no-op
    assert torch.equal(off.weights(model)["head.weight"], model.state_dict()["head.weight"])


def test_recomputed_batch_norm_statistics_are_the_mean_over_the_training_batches():
    torch.manual_seed(0)
    model = build_model(3, width=4, bn_ghost_size=0)
    avg = WeightAverage(model, 0.99)
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8)
    prepare = lambda x: (x - 0.1) / 0.3  # noqa: E731 - any fixed input normalisation
    avg.recompute_bn(images, 32, prepare)
    first = avg.shadow.features[0]
    conv, bn = first[0], first[1]
    with torch.no_grad():
        per_batch = [conv(prepare(images[i:i + 32].float() / 255)).mean(dim=(0, 2, 3)) for i in range(0, 96, 32)]
    assert torch.allclose(bn.running_mean, torch.stack(per_batch).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and not avg.shadow.training  # given back as it was
    stats = bn.running_mean.clone()
    avg.recompute_bn(images[:32], 32, prepare)  # the same update count: not recomputed
    assert torch.equal(bn.running_mean, stats)


@pytest.fixture(scope="module")
def ema_reference(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run([*EMA, "--data", str(tiny_idx)], tmp_path_factory, "emaref")


def test_the_best_model_file_holds_the_average_that_was_validated(ema_reference: Path, tiny_idx: Path):
    last = load_state(ema_reference / "checkpoint_last.pth")
    best = load_state(ema_reference / "best_model_finetuned.pth")
    averaged = last["averaged"]
    assert averaged["updates"] == last["position"]["global_step"] > 0
    raw, avg = last["model"], averaged["model"]
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)  # the average is not the trained weights
    history = json.loads((ema_reference / "history.json").read_text())
    # The run is deterministic and its average improves to the end: the last epoch is the best, so its
    # file holds the final average exactly (batch-norm statistics included), not the trained weights.
    assert history[-1]["best"] and best["epoch"] == len(history)
    for k in avg:
        assert torch.equal(best["model"][k], avg[k]), k
    assert best["metrics"]["val_acc"] == max(r["val_acc"] for r in history)


def test_a_killed_run_with_the_average_resumes_bit_for_bit(ema_reference: Path, tiny_idx: Path, tmp_path: Path):
    args = [*EMA, "--data", str(tiny_idx), "--output-dir", "out"]
    proc = run_cli(args, cwd=tmp_path, faults="kill@9")
    assert proc.returncode == -9, proc.stderr
    assert load_state(tmp_path / "out" / "checkpoint_last.pth")["averaged"]["updates"] > 0
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoint_last.pth", "best_model_finetuned.pth"):
        assert_same_weights(ema_reference / name, tmp_path / "out" / name)
    a = load_state(ema_reference / "checkpoint_last.pth")["averaged"]
    b = load_state(tmp_path / "out" / "checkpoint_last.pth")["averaged"]
    assert a["updates"] == b["updates"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert stripped_history(ema_reference) == stripped_history(tmp_path / "out")


def test_an_error_retried_from_the_checkpoint_keeps_the_average_exact(ema_reference: Path, tiny_idx: Path, tmp_path: Path):
    proc = run_cli([*EMA, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path, faults="error@8")
    assert proc.returncode == 0, proc.stderr
    assert "recovering (retry 1/5)" in proc.stdout
    assert_same_weights(ema_reference / "best_model_finetuned.pth", tmp_path / "out" / "best_model_finetuned.pth")


def test_a_bad_decay_is_refused_with_the_value_and_a_fix(tiny_idx: Path, tmp_path: Path):
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--set", "ema_decay=1.5", "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "ema_decay=1.5 must be in [0, 1)" in proc.stderr
    assert not (tmp_path / "out").exists()


# --- clean batch-norm statistics (bn_stats "clean"): the trained weights, statistics from plain images ---

CLEAN = [*FAST, "--set", "bn_stats=clean"]


def test_a_following_copy_takes_the_trained_weights_and_recomputes_only_the_statistics():
    torch.manual_seed(0)
    model = build_model(3, width=4, bn_ghost_size=0)
    copy_ = WeightAverage(model, 0.0, "average", follow=True)
    assert copy_.enabled and copy_.bn == "recompute" and copy_.current_decay() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    copy_.update(model)
    assert copy_.updates == 1
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    prepare = lambda x: (x - 0.1) / 0.3  # noqa: E731
    copy_.recompute_bn(images, 32, prepare, model)
    for mine, theirs in zip(copy_.shadow.parameters(), model.parameters()):
        assert torch.equal(mine, theirs)  # the trained weights exactly, not a mean
    conv, bn = copy_.shadow.features[0][0], copy_.shadow.features[0][1]
    with torch.no_grad():
        per_batch = [conv(prepare(images[i:i + 32].float() / 255)).mean(dim=(0, 2, 3)) for i in (0, 32)]
    assert torch.allclose(bn.running_mean, torch.stack(per_batch).mean(0), atol=1e-5)
    assert not torch.equal(bn.running_mean, model.features[0][1].running_mean)  # the trained model's are left alone
    with pytest.raises(ValueError, match="needs the trained model"):
        copy_.updates += 1
        copy_.recompute_bn(images, 32, prepare)
    # With the weight average on, the average is kept and its own ema_bn decides.
    ema = WeightAverage(model, 0.99, "average", follow=True)
    assert not ema.follow and ema.bn == "average" and ema.current_decay() == pytest.approx(0.1)


@pytest.mark.parametrize("separability, fine_tuning, ema_decay, expected, why", [
    (0.80, True, 0.0, "clean", "below 90%: classes new to the base model"),
    (0.95, True, 0.0, "training", "at least 90%: classes much like the base model's"),
    (None, True, 0.0, "training", "was not measured"),
    (0.80, False, 0.0, "training", "training from scratch"),
    (0.80, True, 0.999, "training", "the weight average is on"),
])
def test_clean_statistics_are_chosen_for_classes_new_to_the_base_model(separability, fine_tuning, ema_decay, expected, why):
    from cnn_finetune.config import TrainConfig
    from cnn_finetune.training.recipe import auto_bn_stats, resolve

    value, note = auto_bn_stats(separability, fine_tuning, ema_decay)
    assert value == expected and note.startswith(f"auto: {expected} (") and why in note
    resolved = resolve(TrainConfig(ema_decay=ema_decay), 5, fine_tuning, separability=separability, per_class=30)
    assert resolved.config.bn_stats == expected and resolved.notes["bn_stats"] == note
    explicit = resolve(TrainConfig(bn_stats="training"), 5, fine_tuning, separability=separability, per_class=30)
    assert explicit.config.bn_stats == "training" and "bn_stats" not in explicit.notes  # the user's choice stays


@pytest.fixture(scope="module")
def clean_reference(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run([*CLEAN, "--data", str(tiny_idx)], tmp_path_factory, "cleanref")


def test_the_kept_model_has_the_trained_weights_with_clean_statistics(clean_reference: Path):
    last = load_state(clean_reference / "checkpoint_last.pth")
    kept = last["averaged"]
    assert last["config"]["bn_stats"] == "clean" and kept["updates"] == last["position"]["global_step"] > 0
    trained, copy_ = last["model"], kept["model"]
    weights = [k for k in trained if not k.split(".")[-1].startswith(("running_", "num_batches"))]
    assert weights and all(torch.equal(trained[k], copy_[k]) for k in weights)
    stats = [k for k in trained if k.endswith("running_var")]
    assert stats and all(not torch.equal(trained[k], copy_[k]) for k in stats)  # statistics of their own
    best = load_state(clean_reference / "best_model_finetuned.pth")
    history = json.loads((clean_reference / "history.json").read_text())
    # The kept file is an epoch's clean copy: its validation accuracy is the one recorded for its epoch.
    assert best["metrics"]["val_acc"] == history[best["epoch"] - 1]["val_acc"]
    if best["epoch"] == len(history):  # the final epoch: exactly the checkpoint's copy
        assert all(torch.equal(best["model"][k], copy_[k]) for k in copy_)


def test_a_killed_run_with_clean_statistics_resumes_bit_for_bit(clean_reference: Path, tiny_idx: Path, tmp_path: Path):
    args = [*CLEAN, "--data", str(tiny_idx), "--output-dir", "out"]
    proc = run_cli(args, cwd=tmp_path, faults="kill@9")
    assert proc.returncode == -9, proc.stderr
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoint_last.pth", "best_model_finetuned.pth"):
        assert_same_weights(clean_reference / name, tmp_path / "out" / name)
    a = load_state(clean_reference / "checkpoint_last.pth")["averaged"]["model"]
    b = load_state(tmp_path / "out" / "checkpoint_last.pth")["averaged"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert stripped_history(clean_reference) == stripped_history(tmp_path / "out")


def test_other_statistics_are_refused_on_resume(tiny_idx: Path, tmp_path: Path):
    args = [*CLEAN, "--data", str(tiny_idx), "--output-dir", "out"]
    proc = run_cli(args, cwd=tmp_path, faults="sigint@5")
    assert proc.returncode == 130, proc.stderr[-2000:]
    before = (tmp_path / "out" / "checkpoint_last.pth").read_bytes()
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--set", "bn_stats=training", "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "bn_stats: checkpoint has 'clean', this run has 'training'" in proc.stderr
    assert (tmp_path / "out" / "checkpoint_last.pth").read_bytes() == before  # nothing of the run touched
