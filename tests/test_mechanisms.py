"""Unit tests of the small stateful mechanisms: early stopping, best-K keeper, schedules, seeds."""

from __future__ import annotations

import math

import pytest

from cnn_finetune.training.checkpoint_manager import BestKeeper
from cnn_finetune.training.mechanisms import is_better
from cnn_finetune.training.faults import FaultInjector
from cnn_finetune.errors import UserError
from cnn_finetune.training.mechanisms import EarlyStopping, NanGuard, lr_at, mix_seed
from cnn_finetune.training.microbatch import MicroBatcher


def stop_epoch(metrics: list[float], patience: int, min_delta: float = 0.0, mode: str = "max") -> int | None:
    es = EarlyStopping(patience, min_delta, mode)
    for epoch, m in enumerate(metrics, start=1):
        stop, reason = es.update(m, epoch)
        if stop:
            assert "no improvement" in reason
            return epoch
    return None


@pytest.mark.parametrize(
    "metrics, patience, min_delta, mode, expected",
    [
        ([0.5, 0.6, 0.7, 0.8], 2, 0.0, "max", None),  # always improving
        ([0.5, 0.6, 0.6, 0.6], 2, 0.0, "max", 4),  # equal is not better
        ([0.5, 0.4, 0.45, 0.49, 0.7], 3, 0.0, "max", 4),
        ([0.5, 0.505, 0.509, 0.6], 2, 0.01, "max", 3),  # gains under min_delta do not count
        ([1.0, 0.9, 0.95, 0.91, 0.92], 2, 0.0, "min", 4),
        ([0.5, float("nan"), float("nan"), 0.9], 2, 0.0, "max", 3),  # NaN is never an improvement
        ([float("nan"), 0.1, 0.1, 0.1], 2, 0.0, "max", 4),  # anything beats "no best yet"
        ([0.1, 0.1, 0.1, 0.1], 0, 0.0, "max", None),  # patience 0: early stopping off
    ],
)
def test_early_stopping_stops_at_the_scripted_epoch(metrics, patience, min_delta, mode, expected):
    assert stop_epoch(metrics, patience, min_delta, mode) == expected


def test_early_stopping_state_round_trip_gives_same_decision():
    seq = [0.5, 0.6, 0.55, 0.58, 0.59, 0.57]
    full = stop_epoch(seq, 3)
    es = EarlyStopping(3)
    for i, m in enumerate(seq[:3], 1):
        es.update(m, i)
    resumed = EarlyStopping(3)
    resumed.load_state_dict(es.state_dict())
    got = None
    for i, m in enumerate(seq[3:], 4):
        if resumed.update(m, i)[0]:
            got = i
            break
    assert got == full == 5


def test_is_better_treats_nan_as_worst():
    assert is_better(0.5, None, "max")
    assert is_better(0.5, float("nan"), "max")
    assert not is_better(float("nan"), 0.1, "max")
    assert is_better(0.1, 0.2, "min") and not is_better(0.2, 0.1, "min")
    assert not is_better(0.205, 0.2, "max", min_delta=0.01)


def test_best_keeper_keeps_top_k_and_reports_the_dropped(tmp_path):
    k = BestKeeper(tmp_path, 2, "max")
    dropped_all = []
    for epoch, m in enumerate([0.5, 0.7, 0.6, 0.9, 0.6], start=1):
        if k.would_keep(m):
            name = k.file_name(epoch, m, "val_acc")
            (tmp_path / name).write_bytes(b"x")
            dropped_all += k.add(epoch, m, name)
    assert [e["epoch"] for e in k.entries] == [4, 2]
    assert k.best()["epoch"] == 4
    assert dropped_all == [k.file_name(1, 0.5, "val_acc"), k.file_name(3, 0.6, "val_acc")]
    # ties keep the earlier epoch ahead; a NaN metric never enters
    k2 = BestKeeper(tmp_path, 2, "max")
    k2.add(1, 0.8, "a")
    k2.add(2, 0.8, "b")
    assert [e["epoch"] for e in k2.entries] == [1, 2]
    assert not k2.would_keep(float("nan"))
    # equal accuracy: the lower validation loss ranks first, then the earlier epoch
    k3 = BestKeeper(tmp_path, 2, "max", tiebreak_mode="min")
    k3.add(1, 0.9, "a", tiebreak=0.30)
    k3.add(2, 0.9, "b", tiebreak=0.20)
    assert k3.would_keep(0.9, 0.25, 3) and not k3.would_keep(0.9, 0.35, 3)
    assert k3.add(3, 0.9, "c", tiebreak=0.25) == ["a"]
    assert [e["epoch"] for e in k3.entries] == [2, 3]
    restored = BestKeeper(tmp_path, 2, "max")
    restored.load_state_dict(k.state_dict())
    assert restored.entries == k.entries


def test_best_keeper_finds_stray_files(tmp_path):
    k = BestKeeper(tmp_path, 3, "max")
    k.add(1, 0.5, k.file_name(1, 0.5, "val_acc"))
    (tmp_path / k.file_name(1, 0.5, "val_acc")).write_bytes(b"x")
    (tmp_path / k.file_name(2, 0.6, "val_acc")).write_bytes(b"x")  # written by a killed run
    (tmp_path / "best_model_finetuned.pth").write_bytes(b"x")
    assert [p.name for p in k.stray_files()] == [k.file_name(2, 0.6, "val_acc")]


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_lr_schedule_shapes(schedule):
    total = 100
    lrs = [lr_at(s, total, 1e-2, schedule, 0.25) for s in range(total)]
    assert all(lr >= 0 for lr in lrs)
    if schedule == "constant":
        assert set(lrs) == {1e-2}
    elif schedule == "cosine":
        assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    else:
        assert lrs[0] == pytest.approx(1e-2 / 25)
        assert max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == 25
        assert lrs[-1] == pytest.approx(1e-2 / 1e4)
    assert lr_at(5, total, 1e-2, schedule, 0.25) == lr_at(5, total, 1e-2, schedule, 0.25)


def test_mix_seed_is_stable_and_distinct():
    assert mix_seed(42, 3, 7) == mix_seed(42, 3, 7)
    seeds = {mix_seed(42, e, s) for e in range(20) for s in range(200)}
    assert len(seeds) == 20 * 200
    assert all(0 <= x < 2**63 for x in seeds)


def test_micro_batcher_doubles_and_probes_down():
    m = MicroBatcher(probe_steps=3)
    assert m.on_oom() == 2 and m.on_oom() == 4
    assert [m.on_success() for _ in range(3)] == [False, False, True]
    assert m.parts == 2
    state = m.state_dict()
    m2 = MicroBatcher(3)
    m2.load_state_dict(state)
    assert m2.parts == 2 and m2.clean_steps == 0


def test_nan_guard_rolls_back_a_bounded_number_of_times():
    g = NanGuard(max_consecutive=2, lr_factor=0.5, max_rollbacks=2)
    assert not g.needs_rollback(1) and g.needs_rollback(2)
    assert g.roll_back() == 0.5 and g.roll_back() == 0.25
    assert not g.can_roll_back()
    assert math.isclose(NanGuard().lr_scale, 1.0)


def test_fault_spec_parsing():
    f = FaultInjector("oom@12, error@30,nan@45-47,kill@60")
    assert f.planned["oom"] == {12} and f.planned["nan"] == {45, 46, 47} and f.planned["kill"] == {60}
    assert not FaultInjector("")
    with pytest.raises(UserError, match="not understood"):
        FaultInjector("explode@3")
    with pytest.raises(UserError, match="step number"):
        FaultInjector("oom@soon")
    f.before_step(29)
    with pytest.raises(RuntimeError, match="injected fault: error at step 30"):
        f.before_step(30)
    f.before_step(30)  # at most once per process


@pytest.mark.parametrize("balance", ["none", "sampler", "weighted_loss"])
def test_balancing_changes_what_the_rare_class_weighs(tmp_path, balance):
    import torch

    from cnn_finetune.config import TrainConfig
    from cnn_finetune.training.trainer import RobustTrainer, SplitData

    labels = torch.tensor([0] * 450 + [1] * 50)
    images = torch.zeros((500, 1, 28, 28), dtype=torch.uint8)
    data = SplitData(images, labels, images[:10], labels[:10], ["a", "b"], 0.1, 0.3, "x")
    cfg = TrainConfig(width=8, balance=balance, output_dir=str(tmp_path), base_model=None)
    trainer = RobustTrainer(cfg, data, torch.device("cpu"), log=lambda s: None)
    order = trainer.epoch_order(0)
    share_of_rare = float((labels[order] == 1).float().mean())
    assert torch.equal(order, trainer.epoch_order(0))  # a function of (seed, epoch)
    if balance == "sampler":
        assert 0.42 < share_of_rare < 0.58  # drawn as often as the frequent class
        assert trainer.class_weights is None
    else:
        assert share_of_rare == pytest.approx(0.1) and sorted(order.tolist()) == list(range(500))
    if balance == "weighted_loss":
        assert trainer.class_weights.tolist() == pytest.approx([500 / 900, 500 / 100])
    elif balance == "none":
        assert trainer.class_weights is None


def test_train_faults_with_a_huge_step_range_parse_at_once():
    """Found by tests/test_fuzz.py: kill@0-99999999999 built a set of 10^11 steps (3e7 took 2.4 GB)."""
    import resource

    from cnn_finetune.training.faults import FaultInjector

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    faults = FaultInjector("nan@3-99999999999,oom@12")
    assert 3 in faults.planned["nan"] and 99999999999 in faults.planned["nan"] and 2 not in faults.planned["nan"]
    assert faults._take("nan", 5 * 10**10) and not faults._take("nan", 5 * 10**10)  # once per step
    assert 12 in faults.planned["oom"] and 13 not in faults.planned["oom"] and not faults.planned["kill"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
