"""Micro-batching after CUDA out-of-memory: how many parts a step is cut into, and where the cuts fall.

Cuts fall only between ghost batch-norm groups, so a step redone as micro-batches with gradient
accumulation computes the same result as the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from ..errors import TrainingFailed
from ..model.cnn import GhostBatchNorm2d, unwrap


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

    def split_after_oom(self, split: Callable[[int], list[int]], advice: str) -> list[int]:
        """Double the split after an OOM; returns the new micro-batch sizes, ``split(parts)``.

        Raises ``TrainingFailed`` (with ``advice``) when the batch cannot be cut any finer.
        """
        before = split(self.parts)
        sizes = split(self.on_oom())
        if len(sizes) <= len(before):
            raise TrainingFailed(f"out of memory even with micro-batches of {min(before)} sample(s) (one batch-norm group): "
                                 + advice)
        return sizes

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


def ghost_groups(model: nn.Module, batch: int) -> list[int]:
    """Sizes of the batch-norm groups of a batch of ``batch`` samples (a batch without ghost groups is one)."""
    bn = next((m for m in unwrap(model).modules() if isinstance(m, GhostBatchNorm2d)), None)
    return bn.group_sizes(batch) if bn is not None else [batch]


def split_for_micro_batches(model: nn.Module, batch: int, parts: int) -> list[int]:
    """Micro-batch sizes that cut a batch only between ghost-BN groups (so the math is unchanged).

    Returns fewer than ``parts`` sizes when the batch has fewer groups than that.
    """
    bn = next((m for m in unwrap(model).modules() if isinstance(m, GhostBatchNorm2d)), None)
    # Without ghost groups (bn_ghost_size 0) batch norm sees the whole batch: any split would change
    # its statistics, so the batch is one indivisible group (and an OOM stops with a clear message).
    groups = bn.group_sizes(batch) if bn is not None else [1] * batch
    parts = min(parts, len(groups))
    sizes = []
    start = 0
    for i in range(parts):
        end = round(len(groups) * (i + 1) / parts)
        sizes.append(sum(groups[start:end]))
        start = end
    return sizes
