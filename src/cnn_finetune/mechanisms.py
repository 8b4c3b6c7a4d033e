"""The small stateful mechanisms of the trainer, each with ``state_dict``/``load_state_dict``.

Resuming is "load every state": early stopping, micro-batching after out-of-memory errors, and the
NaN guard all keep what they know in plain data that goes into the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from .checkpoint import is_better


class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta`` (0: off)."""

    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "max") -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0

    def update(self, metric: float, epoch: int) -> tuple[bool, str]:
        """Record one epoch's metric; returns ``(should_stop, reason)``. NaN never improves."""
        if is_better(metric, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = float(metric), epoch, 0
        else:
            self.wait += 1
        if self.patience > 0 and self.wait >= self.patience:
            best = "none" if self.best is None else f"{self.best:.4f} at epoch {self.best_epoch}"
            return True, f"no improvement larger than {self.min_delta} for {self.patience} epochs (best {best})"
        return False, ""

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for the checkpoint."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]


class MicroBatcher:
    """How many micro-batches a step is split into after CUDA out-of-memory errors.

    The count doubles on each OOM and is halved again after ``probe_steps`` clean steps, so a
    transient memory spike does not slow the rest of the run.
    """

    def __init__(self, probe_steps: int = 200) -> None:
        self.probe_steps = probe_steps
        self.parts = 1
        self.clean_steps = 0

    def on_oom(self) -> int:
        """Double the split after an OOM; returns the new number of micro-batches."""
        self.parts *= 2
        self.clean_steps = 0
        return self.parts

    def on_success(self) -> bool:
        """Count a clean step; returns True when the split was just reduced (a probe)."""
        if self.parts == 1:
            return False
        self.clean_steps += 1
        if self.probe_steps > 0 and self.clean_steps >= self.probe_steps:
            self.parts //= 2
            self.clean_steps = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for the checkpoint."""
        return {"parts": self.parts, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.parts, self.clean_steps = int(state["parts"]), int(state["clean_steps"])


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
