"""An exponential moving average of the weights (EMA), the model that is validated and kept when it is on.

After every optimizer step the average moves towards the trained weights by ``1 - d``, with a decay
that warms up, ``d_t = min(decay, (1 + t) / (w + t))`` after ``t`` updates (``w``: ``ema_warmup``): a
fixed 0.999 from the start would keep most of the base model (or of the random initialisation) for
thousands of updates, while a few hundred is all a few-shot run has. With the warm-up the average
covers roughly the last ``1 / (w - 1)`` of the updates so far (a tenth for ``w`` = 10), whatever the
run's length.

Batch norm: averaged weights do not match the running statistics of any model that was trained, so
with ``ema_bn="recompute"`` the statistics are computed anew for the averaged weights before each
validation, from the unaugmented training images in their stored order (at most ``BN_IMAGES``, in
batches of the training batch size, so ghost batch norm sees the groups it was trained with), as a
plain average over the batches (what SWA's ``update_bn`` does). ``"average"`` averages the running
statistics like the weights instead (no extra forward pass). No random number is drawn either way.

``follow=True`` (``bn_stats="clean"`` with the average off) keeps no average: the copy takes the
trained weights as they are, and only its batch-norm statistics are recomputed as above. The running
statistics a run accumulates come from augmented batches (pixel noise, turns, shifts, scale), while
the kept model is shown plain images; on scripts new to the base model the recomputed ones gained
0.15-1.4 points (docs/PERFORMANCE.md section 7). The weights are copied only when the statistics are
recomputed (before each validation), not after every step: nothing else reads the copy in between.

The average, its update count and its batch-norm statistics are training state: a checkpoint holds
them, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from ..data.augment import to_unit
from ..model.cnn import CNNv2, GhostBatchNorm2d, unwrap

BN_IMAGES = 2048  # enough for stable statistics of 96 channels; bounded so big datasets pay little


class WeightAverage:
    """The EMA of a model's weights (``decay`` 0: off, and every method is a no-op), or with ``follow``
    (and ``decay`` 0) a copy of the trained weights whose batch-norm statistics are recomputed."""

    def __init__(self, model: nn.Module, decay: float, bn: str = "recompute", warmup: float = 10.0,
                 follow: bool = False) -> None:
        self.follow = follow and decay <= 0  # an EMA's own ema_bn decides when the average is on
        self.decay, self.bn, self.warmup = decay, "recompute" if self.follow else bn, warmup
        self.updates = 0
        keep = decay > 0 or self.follow
        self.shadow: CNNv2 | None = copy.deepcopy(unwrap(model)).eval() if keep else None
        if self.shadow is not None:
            self.shadow.requires_grad_(False)
        self._stats_for = -1  # the update count the shadow's batch-norm statistics were recomputed at

    @property
    def enabled(self) -> bool:
        """Whether an average is kept."""
        return self.shadow is not None

    def current_decay(self) -> float:
        """The decay of the next update (warmed up; 0 for a following copy: it takes the weights as they are)."""
        if self.follow:
            return 0.0
        return min(self.decay, (1.0 + self.updates) / (self.warmup + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights (after an optimizer step). A skipped (non-finite)
        step left the weights as they were, so averaging them again is harmless."""
        if self.shadow is None:
            return
        if self.follow:  # the weights are copied when the statistics are recomputed
            self.updates += 1
            return
        d = self.current_decay()
        mine = list(self.shadow.parameters())
        theirs = [t.detach() for t in unwrap(model).parameters()]
        if self.bn == "average":
            mine += [b for b in self.shadow.buffers() if b.dtype.is_floating_point]
            theirs += [b for b in unwrap(model).buffers() if b.dtype.is_floating_point]
        torch._foreach_lerp_(mine, theirs, 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def recompute_bn(self, images: torch.Tensor, batch_size: int, prepare: Callable[[torch.Tensor], torch.Tensor],
                     model: nn.Module | None = None) -> None:
        """Batch-norm statistics of the averaged weights from ``images`` (uint8, unaugmented), once per update
        count; a following copy first takes ``model``'s weights."""
        if self.shadow is None or self.bn != "recompute" or self._stats_for == self.updates:
            return
        if self.follow:
            if model is None:
                raise ValueError("a following copy needs the trained model to copy its weights from")
            torch._foreach_copy_(list(self.shadow.parameters()), [t.detach() for t in unwrap(model).parameters()])
        if len(images) == 0:
            return
        norms = [m for m in self.shadow.modules() if isinstance(m, GhostBatchNorm2d)]
        images, momenta = images[:BN_IMAGES], [m.momentum for m in norms]
        self.shadow.train()
        try:
            for k, start in enumerate(range(0, len(images), batch_size)):
                for m in norms:  # the k-th batch weighs 1/(k+1): a plain mean over the batches
                    m.momentum = 1.0 / (k + 1)
                self.shadow(prepare(to_unit(images[start:start + batch_size])))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
            self.shadow.eval()
        self._stats_for = self.updates

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The weights a model file holds: the average when on, else ``model``'s own."""
        return (self.shadow if self.shadow is not None else unwrap(model)).state_dict()

    def state_dict(self) -> dict[str, Any] | None:
        """Training state (None when off)."""
        if self.shadow is None:
            return None
        # (decay, warm-up and ema_bn are in the run's config, which resuming checks)
        return {"model": self.shadow.state_dict(), "updates": self.updates, "stats_for": self._stats_for}

    def load_state_dict(self, state: dict[str, Any] | None, model: nn.Module) -> None:
        """Restore; a checkpoint without an average (older, or written with it off) starts one from ``model``."""
        if self.shadow is None:
            return
        if state is None:
            self.shadow.load_state_dict(unwrap(model).state_dict())
            self.updates, self._stats_for = 0, -1
            return
        self.shadow.load_state_dict(state["model"])
        self.updates, self._stats_for = int(state["updates"]), int(state.get("stats_for", -1))
