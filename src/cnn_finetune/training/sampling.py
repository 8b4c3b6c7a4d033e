"""The training data on the training device, and the sample order of every epoch.

The images stay ``uint8`` on the device: a batch is an index gather, and the conversion to float
happens inside the batched augmentation. The order of epoch ``e`` is drawn from a generator seeded
by ``(seed, e)``, so it is a pure function of the position: resuming needs no sampler state.
"""

from __future__ import annotations

import math

import torch

from ..data.loader import SplitData, class_weights
from .mechanisms import mix_seed


class DeviceData:
    """Training and validation tensors on ``device``, the batch size, and the class balancing."""

    def __init__(self, data: SplitData, device: torch.device, batch_size: int, seed: int, balance: str = "none") -> None:
        self.x_train, self.y_train = data.train_images.to(device), data.train_labels.to(device)
        x_val, y_val = data.selection_part()  # the calibration part never picks the epoch
        self.x_val, self.y_val = x_val.to(device), y_val.to(device)
        self.device, self.seed = device, seed
        n = len(self.y_train)
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = math.ceil(n / self.batch_size)
        self.class_weights: torch.Tensor | None = None  # --balance weighted_loss: per-class loss weights
        self.sample_weights: torch.Tensor | None = None  # --balance sampler: per-sample drawing weights
        if balance != "none":
            w = class_weights(data.train_labels, len(data.class_names))
            if balance == "weighted_loss":
                self.class_weights = w.to(device)
            else:
                self.sample_weights = w[data.train_labels].to(torch.float64)
        self._n = n

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample indices of an epoch, from a generator seeded by (seed, epoch)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xE90C))
        if self.sample_weights is not None:
            order = torch.multinomial(self.sample_weights, self._n, replacement=True, generator=g)
        else:
            order = torch.randperm(self._n, generator=g)
        return order.to(self.device)

    def step_indices(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """The samples of step ``step`` of an epoch with sample order ``order``."""
        return order[step * self.batch_size:(step + 1) * self.batch_size]
