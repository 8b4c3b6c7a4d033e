"""A checkpoint's fields, checked one by one before a run acts on them.

A checkpoint's SHA-256 has no key: anyone who can write the run folder can change a checkpoint and
compute the checksum again. The checksum detects damage, not forgery, so everything read from a
checkpoint is untrusted input. ``check_training_state`` refuses (``CheckpointError``) a state whose
fields have the wrong type or are out of range, or whose best-K list names anything but a best-epoch
file of the run folder itself; such a checkpoint is treated like one that fails its checksum (the
previous one is used, or the run is refused), never acted on. A forged file name would otherwise be
deleted when the epoch falls out of the best K, whatever and wherever it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..files.rundir import RunDir

# What a training checkpoint holds besides the weights and optimizer state (checked by torch on load).
_DICTS = ("arch_params", "config", "position", "accumulators", "early_stopping", "best_keeper", "micro_batching",
          "nan_guard", "timing")
_ACCUMULATORS = {"loss_sum": torch.float64, "correct": torch.int64, "seen": torch.int64, "nonfinite": torch.int64,
                 "streak": torch.int64, "max_streak": torch.int64}


class _Forged(Exception):
    """One field of the state is unusable: ``field`` and why."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")


def _int(value: Any, field: str, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Forged(field, f"{value!r} is not a whole number")
    if value < low or (high is not None and value > high):
        raise _Forged(field, f"{value} is outside {low}..{'' if high is None else high}")
    return value


def _number(value: Any, field: str, *, optional: bool = False, finite: bool = True, low: float | None = None) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Forged(field, f"{value!r} is not a number")
    if finite and not math.isfinite(value):
        raise _Forged(field, f"{value!r} is not finite")
    if low is not None and value < low:
        raise _Forged(field, f"{value!r} is below {low}")


def _position(state: dict[str, Any]) -> tuple[int, int]:
    """The position must be one an uninterrupted run can be at: returns (epoch, planned epochs)."""
    pos, planned = state["position"], _int(state["config"].get("epochs"), "config.epochs", 1)
    steps = _int(pos.get("steps_per_epoch"), "position.steps_per_epoch", 1)
    epoch = _int(pos.get("epoch"), "position.epoch", 0, planned)
    # step == steps_per_epoch: stopped after the last step of an epoch, before its validation.
    step = _int(pos.get("step"), "position.step", 0, steps)
    if _int(pos.get("global_step"), "position.global_step") != epoch * steps + step:
        raise _Forged("position.global_step", f"{pos['global_step']} is not epoch {epoch} x {steps} steps + step {step}")
    if epoch == planned and step:
        raise _Forged("position.step", f"{step} is past the last of the {planned} planned epochs")
    return epoch, planned


def best_entry_file(run: RunDir, name: Any, field: str) -> None:
    """A best-K entry may name only a best-epoch file directly inside the run folder (no path, no link out)."""
    if not isinstance(name, str) or not run.is_best_epoch_member(name):
        raise _Forged(field, f"{name!r} is not the name of a best-epoch file of this run folder "
                             "(best_epochNNN_<metric>.pth, no folder, no '..')")
    path = run / name
    if path.is_symlink():
        raise _Forged(field, f"{name!r} is a symbolic link ({path} -> {path.readlink()}), not a file this run wrote")


def _best_keeper(run: RunDir, keeper: dict[str, Any], done: int) -> None:
    if keeper.get("mode") not in ("max", "min"):
        raise _Forged("best_keeper.mode", f"{keeper.get('mode')!r} is neither 'max' nor 'min'")
    entries = keeper.get("entries")
    if not isinstance(entries, list):
        raise _Forged("best_keeper.entries", f"{type(entries).__name__} is not a list")
    seen: set[Any] = set()
    for k, entry in enumerate(entries):
        where = f"best_keeper.entries[{k}]"
        if not isinstance(entry, dict):
            raise _Forged(where, f"{type(entry).__name__} is not a record")
        best_entry_file(run, entry.get("file"), f"{where}.file")
        _int(entry.get("epoch"), f"{where}.epoch", 1, max(1, done))
        _number(entry.get("metric"), f"{where}.metric", finite=False)
        _number(entry.get("tiebreak"), f"{where}.tiebreak", optional=True, finite=False)
        if entry["file"] in seen or entry["epoch"] in seen:
            raise _Forged(where, f"epoch {entry['epoch']} or file {entry['file']!r} is listed twice")
        seen |= {entry["file"], entry["epoch"]}


def _mechanisms(state: dict[str, Any], done: int) -> None:
    early = state["early_stopping"]
    _int(early.get("wait"), "early_stopping.wait", 0, max(0, done))
    _number(early.get("best"), "early_stopping.best", optional=True, finite=False)
    if early.get("best_epoch") is not None:
        _int(early["best_epoch"], "early_stopping.best_epoch", 1, max(1, done))
    micro = state["micro_batching"]
    _int(micro.get("parts"), "micro_batching.parts", 1, 1 << 20)
    _int(micro.get("clean_steps"), "micro_batching.clean_steps")
    nan = state["nan_guard"]
    _number(nan.get("lr_scale"), "nan_guard.lr_scale")
    if not 0 < nan["lr_scale"] <= 1:
        raise _Forged("nan_guard.lr_scale", f"{nan['lr_scale']!r} is outside (0, 1]")
    _int(nan.get("rollbacks"), "nan_guard.rollbacks")
    for key in ("epoch_elapsed", "train_elapsed"):
        _number(state["timing"].get(key), f"timing.{key}", low=0.0)
    acc = state["accumulators"]
    for key, dtype in _ACCUMULATORS.items():
        value = acc.get(key)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != 0:
            raise _Forged(f"accumulators.{key}", f"not a scalar tensor of {dtype}")
    norm = state.get("normalization")
    if not isinstance(norm, dict):
        raise _Forged("normalization", "missing")
    _number(norm.get("mean"), "normalization.mean")
    _number(norm.get("std"), "normalization.std")
    if not norm["std"] > 0:
        raise _Forged("normalization.std", f"{norm['std']!r} is not positive")


def _schedule_and_end(state: dict[str, Any], epoch: int, planned: int) -> None:
    steps = state["position"]["steps_per_epoch"]
    schedule = state.get("schedule", [[0, planned * steps]])
    if not isinstance(schedule, list) or not schedule:
        raise _Forged("schedule", "not a list of learning-rate segments")
    for k, seg in enumerate(schedule):
        if not isinstance(seg, (list, tuple)) or len(seg) != 2:
            raise _Forged(f"schedule[{k}]", f"{seg!r} is not a [start, end] pair")
        start = _int(seg[0], f"schedule[{k}][0]", 0)
        _int(seg[1], f"schedule[{k}][1]", start + 1)
    _int(state.get("world_size", 1), "world_size", 1, 1 << 16)
    finished = state.get("finished")
    if finished is not None:
        if not isinstance(finished, dict) or not isinstance(finished.get("detail"), str):
            raise _Forged("finished", f"{finished!r} is not a record of how the run ended")
        _int(finished.get("epoch"), "finished.epoch", 0, epoch)
    for key in ("history", "events"):
        if not isinstance(state.get(key, []), list) or not all(isinstance(r, dict) for r in state.get(key, [])):
            raise _Forged(key, "not a list of records")
    if len(state.get("history", [])) > epoch:
        raise _Forged("history", f"{len(state['history'])} epoch records, but the position is epoch {epoch}")


def _label_review(review: Any) -> None:
    """The label review's totals (absent in checkpoints of older versions): two 1-D tensors of one length."""
    if review is None:
        return
    if not isinstance(review, dict) or set(review) != {"margin_sum", "times_seen"}:
        raise _Forged("label_review", "not the two totals of the label review")
    sums, seen = review["margin_sum"], review["times_seen"]
    if not (isinstance(sums, torch.Tensor) and isinstance(seen, torch.Tensor)) or sums.dim() != 1 or seen.shape != sums.shape:
        raise _Forged("label_review", "the totals are not two tensors of one image count")
    if not sums.is_floating_point() or seen.is_floating_point() or seen.dtype == torch.bool:
        raise _Forged("label_review", f"totals of type {sums.dtype} and {seen.dtype}")
    if not bool(torch.isfinite(sums).all()) or (seen.numel() and int(seen.min()) < 0):
        raise _Forged("label_review", "a margin total that is not finite, or a negative count")


def _set_aside(decision: Any, review: Any, epoch: int) -> None:
    """The images set aside half-way (absent before the decision, and in checkpoints of older versions):
    distinct indices of the training split, decided at an epoch already reached, with its note."""
    if decision is None:
        return
    if not isinstance(decision, dict) or set(decision) != {"epoch", "images", "note"} or not isinstance(decision["note"], str):
        raise _Forged("set_aside", "not the record of the images set aside")
    images, at = decision["images"], decision["epoch"]
    if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at <= epoch:
        raise _Forged("set_aside", f"decided at epoch {at!r}, but the position is epoch {epoch}")
    if not isinstance(images, torch.Tensor) or images.dim() != 1 or images.dtype != torch.int64:
        raise _Forged("set_aside", "the images are not a list of indices")
    count = review["margin_sum"].shape[0] if isinstance(review, dict) else None
    if images.numel() and (int(images.min()) < 0 or (count is not None and int(images.max()) >= count)
                           or images.unique().numel() != images.numel()):
        raise _Forged("set_aside", "indices that are not distinct images of the training split")


def check_training_state(state: Any, run: RunDir, path: Path) -> None:
    """Refuse (``CheckpointError``) a training state from ``path`` that a run must not act on.

    Checked: the kind and the shape of every part, the position (an epoch of the plan, a step of the
    epoch, a global step that matches), the best-K list (best-epoch file names of ``run`` itself,
    epochs already done), counters and scales in range, the normalisation usable.
    """
    try:
        if not isinstance(state, dict) or state.get("kind") != "training":
            raise _Forged("kind", f"{state.get('kind') if isinstance(state, dict) else type(state).__name__!r} is not a training state")
        for key in _DICTS:
            if not isinstance(state.get(key), dict):
                raise _Forged(key, "missing or not a record")
        if not isinstance(state.get("model"), dict) or not isinstance(state.get("optimizer"), dict):
            raise _Forged("model", "the weights or the optimizer state are missing")
        epoch, planned = _position(state)
        _best_keeper(run, state["best_keeper"], epoch)
        _mechanisms(state, epoch)
        _schedule_and_end(state, epoch, planned)
        _label_review(state.get("label_review"))
        _set_aside(state.get("set_aside"), state.get("label_review"), epoch)
        automatic = state.get("automatic", {})
        if not isinstance(automatic, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in automatic.items()):
            raise _Forged("automatic", "not the notes of the automatic settings (names and texts)")
    except _Forged as err:
        raise CheckpointError(f"{path} holds an unusable value in {err}; it was damaged or forged (the checksum has no "
                              "key), so it is not used", path=str(path)) from None
