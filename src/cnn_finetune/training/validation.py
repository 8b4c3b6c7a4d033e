"""Validation during training: loss and accuracy of the model on uint8 images, robust to out-of-memory.

A CUDA out-of-memory error in validation halves the evaluation batch and evaluates again; the
training batch is never touched, so the training trajectory stays exactly the same. The lowered
batch is kept for the rest of the run. Under several processes each rank evaluates its share of the
images and the sums are added up, so every rank gets the same (global) loss and accuracy.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.augment import to_unit
from .distributed import Dist
from ..errors import TrainingFailed
from ..log import logger


class Validator:
    """Evaluates a network in batches of ``batch_size`` (halved on out-of-memory)."""

    def __init__(self, batch_size: int, device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor],
                 autocast: Callable[[], Any], dist: Dist | None = None) -> None:
        self.batch_size = batch_size
        self.configured = batch_size  # as configured; batch_size may be lowered after out-of-memory errors
        self.device = device
        self.prepare = prepare  # images in [0, 1] -> the network's input
        self.autocast = autocast
        self.dist = dist or Dist()

    @torch.no_grad()
    def __call__(self, net: nn.Module, model: nn.Module, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """Mean loss, accuracy and this rank's predictions; ``model`` is put in eval mode and given back as it was."""
        was_training = model.training
        model.eval()
        try:
            while True:
                try:
                    return self._evaluate(net, images, labels)
                except torch.OutOfMemoryError:
                    self._lower_batch()
        finally:
            model.train(was_training)

    def _evaluate(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        d, n = self.dist, len(labels)
        mine = slice(n * d.rank // d.world, n * (d.rank + 1) // d.world)
        images, labels = images[mine], labels[mine]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        preds = []
        for i in range(0, len(labels), self.batch_size):
            x = self.prepare(to_unit(images[i:i + self.batch_size]))
            with self.autocast():
                logits = net(x)
            loss_sum += F.cross_entropy(logits.float(), labels[i:i + self.batch_size], reduction="sum").double()
            preds.append(logits.argmax(1))
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=self.device)
        sums = d.sum_(torch.stack([loss_sum, (pred == labels).sum().double()]))
        return float(sums[0]) / max(1, n), float(sums[1]) / max(1, n), pred

    def _lower_batch(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size == 1:
            raise TrainingFailed("out of memory while validating one image at a time") from None
        self.batch_size = max(1, self.batch_size // 2)
        logger.info(f"CUDA out of memory in validation: evaluation batch lowered to {self.batch_size} (training batch unchanged)")
