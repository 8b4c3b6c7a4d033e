"""The small mechanisms of the trainer, each with ``state_dict``/``load_state_dict`` where it has state.

Resuming is "load every state": the position, the epoch's running metrics, early stopping,
micro-batching after out-of-memory errors, the NaN guard and the timing all keep what they know in
plain data that goes into the checkpoint. The retry budget is the one mechanism that is not
restored: it belongs to one run of the command. Pure functions of the position (``lr_at``,
``mix_seed``) replace scheduler and RNG state.
"""

from __future__ import annotations

import math
import operator
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..errors import TrainingFailed

# ------------------------------------------------------------------------------------------------
# Metric comparison shared by early stopping, the best-K keeper and the plots

@dataclass
class FitResult:
    """How ``RobustTrainer.fit`` ended."""

    status: str  # "completed" or "early_stopped"
    message: str
    best: dict[str, Any] | None = None


MODE_OF_METRIC = {"val_acc": "max", "val_loss": "min"}
_BETTER = {"max": operator.gt, "min": operator.lt}


def is_better(new: float, old: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """``new`` improves on ``old`` by more than ``min_delta``; NaN is never better, anything beats None/NaN."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return True
    delta = min_delta if mode == "max" else -min_delta
    return _BETTER[mode](new - delta, old)


class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta`` (0: off).

    With ``min_delta`` 0, an epoch that equals the best metric and beats it on the second metric
    (``tiebreak``, in ``tiebreak_mode``) improves too: the ranking of the best-K keeper. A validation
    accuracy stuck at 100% on a small validation set then does not stop a run whose loss still falls.
    """

    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "max", tiebreak_mode: str = "min") -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.mode, self.tiebreak_mode = mode, tiebreak_mode
        self.best: float | None = None
        self.best_tiebreak: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0

    def _improves(self, metric: float, tiebreak: float | None) -> bool:
        if is_better(metric, self.best, self.mode, self.min_delta):
            return True
        return (self.min_delta == 0 and tiebreak is not None and metric == self.best
                and is_better(tiebreak, self.best_tiebreak, self.tiebreak_mode))

    def update(self, metric: float, epoch: int, tiebreak: float | None = None) -> tuple[bool, str]:
        """Record one epoch's metric (and second metric); returns ``(should_stop, reason)``. NaN never improves."""
        if self._improves(metric, tiebreak):
            self.best, self.best_epoch, self.wait = float(metric), epoch, 0
            self.best_tiebreak = None if tiebreak is None else float(tiebreak)
        else:
            self.wait += 1
        if self.patience > 0 and self.wait >= self.patience:
            best = "none" if self.best is None else f"{self.best:.4f} at epoch {self.best_epoch}"
            return True, f"no improvement larger than {self.min_delta} for {self.patience} epochs (best {best})"
        return False, ""

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for the checkpoint."""
        return {"best": self.best, "best_tiebreak": self.best_tiebreak, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]
        self.best_tiebreak = state.get("best_tiebreak")


class NanGuard:
    """Non-finite losses or gradients: skipped updates, then rollbacks with a lower learning rate."""

    def __init__(self, max_consecutive: int = 3, lr_factor: float = 0.5, max_rollbacks: int = 3) -> None:
        self.max_consecutive = max_consecutive
        self.lr_factor = lr_factor
        self.max_rollbacks = max_rollbacks
        self.lr_scale = 1.0
        self.rollbacks = 0

    def needs_rollback(self, streak: int) -> bool:
        """True when ``streak`` skipped steps in a row call for a rollback."""
        return streak >= self.max_consecutive

    def can_roll_back(self) -> bool:
        """True while rollbacks are left."""
        return self.rollbacks < self.max_rollbacks

    def roll_back(self) -> float:
        """Count a rollback and lower the learning rate; returns the new scale."""
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        return self.lr_scale

    def start_rollback(self, streak: int, base_lr: float, cause: str | None = None) -> float:
        """``roll_back``, or ``TrainingFailed`` when no rollback is left; ``cause``: what went non-finite
        (default: a streak of ``streak`` non-finite losses)."""
        if not self.can_roll_back():
            raise TrainingFailed(
                f"{cause or f'the loss stayed NaN/Inf ({streak} steps in a row)'} after {self.rollbacks} rollbacks that lowered the "
                f"learning rate to {base_lr * self.lr_scale:.3g}; check the data for broken images and lower --lr")
        return self.roll_back()

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for the checkpoint."""
        return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.lr_scale = float(state["lr_scale"])
        self.rollbacks = int(state["rollbacks"])


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str, warmup_fraction: float) -> float:
    """Learning rate of a global step: a pure function of the step, so resume needs no scheduler state.

    ``onecycle``: linear warm-up from lr/25 to lr over ``warmup_fraction`` of the steps, then cosine
    down to lr/1e4 (the shape of ``torch.optim.lr_scheduler.OneCycleLR``). ``cosine``: cosine from lr
    to 0. ``constant``: lr.
    """
    if schedule == "constant" or total_steps <= 1:
        return base_lr
    t = min(step, total_steps - 1)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t / (total_steps - 1)))
    warm = int(total_steps * warmup_fraction)
    start, end = base_lr / 25.0, base_lr / 1e4
    if t < warm:
        return start + (base_lr - start) * t / warm
    frac = (t - warm) / max(1, total_steps - 1 - warm)
    return end + (base_lr - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): distinct streams per (seed, epoch, step)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


# ------------------------------------------------------------------------------------------------
# Position, running metrics, timing, retries


@dataclass
class Position:
    """Where training is: 0-based epoch, step within the epoch, and global optimizer step."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1
        self.global_step += 1

    def next_epoch(self) -> None:
        """The epoch is done: the next one starts at its step 0."""
        self.epoch += 1
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        """Plain-data state for the checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict`` (extra keys are ignored)."""
        self.epoch, self.step, self.global_step = int(state["epoch"]), int(state["step"]), int(state["global_step"])


class EpochMetrics:
    """The epoch's running sums, kept on the training device: no host-device sync per step.

    A step whose loss or gradient is not finite adds nothing but counts as skipped, and extends the
    streak of non-finite steps that the NaN guard reads. Under several processes each rank sums its
    own share of the samples (``SHARED``); the totals are added up when they are read or saved, and a
    checkpoint holds the totals (given back to rank 0 alone on resume).
    """

    SHARED = ("loss_sum", "correct", "seen")  # per-rank shares; the other sums are the same on every rank

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Zero every sum (a new epoch)."""
        def z(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=self.device)

        self.sums = {"loss_sum": z(torch.float64), "correct": z(torch.int64), "seen": z(torch.int64),
                     "nonfinite": z(torch.int64), "streak": z(torch.int64), "max_streak": z(torch.int64)}

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, denom: Any, bad: torch.Tensor,
            batch: int | None = None) -> None:
        """Account one step: ``loss_sum`` of (weighted) losses of ``seen`` samples of a ``batch`` (default:
        ``seen``) whose loss normaliser is ``denom``; ``bad``: the step was not finite and is skipped."""
        s, good = self.sums, ~bad
        s["loss_sum"] += torch.where(good, loss_sum.double() / denom * (seen if batch is None else batch), 0.0)
        s["correct"] += torch.where(good, correct, 0)
        s["seen"] += torch.where(good, seen, 0)
        s["nonfinite"] += bad.long()
        s["streak"] = (s["streak"] + 1) * bad.long()
        s["max_streak"] = torch.maximum(s["max_streak"], s["streak"])

    def clear_streak(self) -> None:
        """Start counting non-finite steps afresh (after a rollback)."""
        self.sums["streak"].zero_()
        self.sums["max_streak"].zero_()

    def max_streak(self) -> int:
        """Longest run of non-finite steps so far (reads the device)."""
        return int(self.sums["max_streak"])

    def totals(self, sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
        """Copies of the sums, the per-rank shares added up over the ranks by ``sum_`` (a collective)."""
        return {k: sum_(v.clone()) if k in self.SHARED else v.clone() for k, v in self.sums.items()}

    def summary(self, sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> tuple[float, float, int, int]:
        """``(train_loss, train_acc, images seen, skipped steps)`` of the epoch (reads the device)."""
        s = self.totals(sum_)
        seen = int(s["seen"])
        loss = float(s["loss_sum"]) / seen if seen else float("nan")
        acc = int(s["correct"]) / seen if seen else float("nan")
        return loss, acc, seen, int(s["nonfinite"])

    def state_dict(self, sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
        """Plain-data state for the checkpoint (CPU copies of the totals)."""
        return {k: v.detach().cpu() for k, v in self.totals(sum_).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], owner: bool = True) -> None:
        """Restore the state saved by ``state_dict``; ``owner`` False: a rank that starts its shares at 0."""
        self.sums = {k: (v if owner or k not in self.SHARED else torch.zeros_like(v)).to(self.device)
                     for k, v in state.items()}


class Clock:
    """Wall time of the current epoch and of its training steps, carried across restarts (timing only)."""

    def __init__(self) -> None:
        self.epoch_before = 0.0  # seconds of this epoch spent by earlier processes
        self.train_before = 0.0
        self.epoch_t0 = time.monotonic()
        self.train_t0: float | None = None

    def start_epoch(self) -> None:
        """The current epoch (re)starts in this process now."""
        self.epoch_t0 = time.monotonic()

    def start_training(self) -> None:
        """A stretch of training steps starts."""
        self.train_t0 = time.monotonic()

    def stop_training(self) -> None:
        """The stretch of training steps ends (validation follows)."""
        self.train_before = self.train_seconds()
        self.train_t0 = None

    def epoch_seconds(self) -> float:
        """Seconds spent on the current epoch, across processes."""
        return self.epoch_before + (time.monotonic() - self.epoch_t0)

    def train_seconds(self) -> float:
        """Seconds spent in training steps of the current epoch, across processes."""
        return self.train_before + (time.monotonic() - self.train_t0 if self.train_t0 is not None else 0.0)

    def new_epoch(self) -> None:
        """Zero the counters for the next epoch."""
        self.epoch_before = self.train_before = 0.0
        self.train_t0 = None
        self.start_epoch()

    def state_dict(self) -> dict[str, float]:
        """Plain-data state for the checkpoint."""
        return {"epoch_elapsed": self.epoch_seconds(), "train_elapsed": self.train_seconds()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.epoch_before = float(state["epoch_elapsed"])
        self.train_before = float(state["train_elapsed"])
        self.train_t0 = None
        self.start_epoch()


class RetryBudget:
    """At most ``max_retries`` recoveries per run of the command, with a growing cool-down.

    Not part of the checkpoint: every run of the command gets the whole budget again. The cool-down
    is random between ``cooldown_min`` and ``cooldown_max`` seconds, doubled for each failure since
    the last checkpoint that recorded new progress (at most 300 s).
    """

    def __init__(self, max_retries: int, cooldown_min: float, cooldown_max: float) -> None:
        self.max_retries = max_retries
        self.cooldown_min, self.cooldown_max = cooldown_min, cooldown_max
        self.failures: list[str] = []
        self.consecutive = 0

    def record(self, where: str, err: BaseException) -> None:
        """Count a failure; raises ``TrainingFailed`` listing all of them when the budget is spent."""
        self.failures.append(f"{where}: {type(err).__name__}: {err}")
        self.consecutive += 1
        if len(self.failures) > self.max_retries:
            raise TrainingFailed(
                f"training failed {len(self.failures)} times, more than --max-retries {self.max_retries}:\n  "
                + "\n  ".join(self.failures)
            )

    def take(self, where: str, err: BaseException) -> bool:
        """Count a failure if a retry is left (True); False, counting nothing, when the budget is spent."""
        if len(self.failures) >= self.max_retries:
            return False
        self.record(where, err)
        return True

    def progress(self) -> None:
        """A checkpoint recorded new progress: the next failure cools down from the start again."""
        self.consecutive = 0

    def cooldown_seconds(self) -> float:
        """How long to wait before the next retry."""
        return min(300.0, random.uniform(self.cooldown_min, self.cooldown_max) * 2 ** max(0, self.consecutive - 1))

    def cool_down(self, stop_requested: Callable[[], bool], log: Callable[[str], None]) -> bool:
        """Wait before a retry, polling ``stop_requested``; returns False when a stop cut the wait short."""
        seconds = self.cooldown_seconds()
        if seconds > 0:
            log(f"cooling down {seconds:.1f}s before retrying")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if stop_requested():
                return False
            time.sleep(max(0.0, min(0.1, end - time.monotonic())))
        return True
