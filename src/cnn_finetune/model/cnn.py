"""The CNN v2: a compact convolutional classifier for 1 x 28 x 28 images.

Five 3x3 convolutions with batch norm (24-48-48-96-96 channels at the default width 24), max
pooling, a global max pool and one linear layer: about 158k parameters, no giant fully connected
layer. Batch norm computes its statistics over fixed "ghost" groups of samples, so splitting a
batch into micro-batches (the out-of-memory recovery) leaves every sample's normalisation, and
hence the step's result, unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


ARCH = "cnn_v2"
MAX_WIDTH = 512  # 71 million parameters already; 28x28 digits need a few dozen channels
MAX_CLASSES = 65536  # as many as IDX labels can name (0-65535); a larger head outweighs the rest of the model
MAX_GHOST_SIZE = 2**63 - 1  # ghost batch-norm groups cost no memory: any size the config takes


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics come from consecutive groups of ``ghost_size`` samples.

    The last group of a batch may be smaller. Running statistics are updated once per batch with
    the mean over groups; inside ``deferred_bn_stats`` the updates of several micro-batches are
    collected and applied once, as if the whole batch had been seen at once.
    """

    def __init__(self, num_features: int, ghost_size: int = 32) -> None:
        super().__init__(num_features)
        self.ghost_size = ghost_size
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def group_sizes(self, batch: int) -> list[int]:
        """Sizes of the ghost groups of a batch of ``batch`` samples."""
        g = self.ghost_size
        if g <= 0 or batch <= g:
            return [batch]
        return [g] * (batch // g) + ([batch % g] if batch % g else [])

    def _normalise(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalise ``n`` equal groups of ``x``; returns output and per-group updated running stats."""
        c = self.num_features
        rm = self.running_mean.repeat(n)
        rv = self.running_var.repeat(n)
        if n == 1:
            y = F.batch_norm(x, rm, rv, self.weight, self.bias, True, self.momentum, self.eps)
        else:
            b, _, h, w = x.shape
            g = b // n
            # Groups become channels: stats per (group, channel) over g samples, in one fused call.
            xr = x.reshape(n, g, c, h, w).transpose(0, 1).reshape(g, n * c, h, w)
            y = F.batch_norm(xr, rm, rv, self.weight.repeat(n), self.bias.repeat(n), True, self.momentum, self.eps)
            y = y.reshape(g, n, c, h, w).transpose(0, 1).reshape(b, c, h, w)
        return y, rm.view(n, c), rv.view(n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (nn.Module API)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        b, g = x.shape[0], self.ghost_size
        n_full, rest = (b // g, b % g) if 0 < g < b else (1, 0)
        main = b - rest
        y, rm, rv = self._normalise(x[:main] if rest else x, n_full)
        if rest:
            y_rest, rm_rest, rv_rest = self._normalise(x[main:], 1)
            y = torch.cat([y, y_rest])
            rm, rv = torch.cat([rm, rm_rest]), torch.cat([rv, rv_rest])
        if self._deferred is not None:
            self._deferred.append((rm.detach(), rv.detach()))
        else:
            self._apply_stats(rm, rv)
        return y

    @torch.no_grad()
    def _apply_stats(self, rm: torch.Tensor, rv: torch.Tensor) -> None:
        self.running_mean.copy_(rm.mean(0))
        self.running_var.copy_(rv.mean(0))
        self.num_batches_tracked.add_(1)

    def begin_deferred(self) -> None:
        """Collect running-stat updates instead of applying them (micro-batching)."""
        self._deferred = []

    def end_deferred(self, apply: bool = True) -> None:
        """Apply the collected updates as one batch-sized update (or drop them)."""
        pending, self._deferred = self._deferred, None
        if apply and pending:
            self._apply_stats(torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending]))


def conv_bn_relu(cin: int, cout: int, ghost: int) -> nn.Sequential:
    """3x3 convolution (no bias: batch norm has one), ghost batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), GhostBatchNorm2d(cout, ghost), nn.ReLU(inplace=True))


class CNNv2(nn.Module):
    """The CNN v2 classifier; ``features`` and ``head`` are separate for fine-tuning."""

    def __init__(self, num_classes: int, width: int = 32, bn_ghost_size: int = 32) -> None:
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.width = width
        self.bn_ghost_size = bn_ghost_size
        self.features = nn.Sequential(
            conv_bn_relu(1, w, bn_ghost_size), nn.MaxPool2d(2),  # 28 -> 14
            conv_bn_relu(w, 2 * w, bn_ghost_size), conv_bn_relu(2 * w, 2 * w, bn_ghost_size), nn.MaxPool2d(2),  # -> 7
            conv_bn_relu(2 * w, 4 * w, bn_ghost_size), conv_bn_relu(4 * w, 4 * w, bn_ghost_size),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a ``(B, 1, 28, 28)`` batch of normalised images."""
        return self.head(self.features(x))

    def train_mode(self, frozen_features: bool = False) -> None:
        """Training mode; with ``frozen_features`` only the head learns, and the feature layers keep their
        weights and batch-norm statistics."""
        self.features.requires_grad_(not frozen_features)
        self.train()
        if frozen_features:
            self.features.eval()

    def arch_params(self) -> dict[str, int]:
        """What is needed to rebuild this model: stored with its weights."""
        return {"num_classes": self.num_classes, "width": self.width, "bn_ghost_size": self.bn_ghost_size}


def build_model(num_classes: int, width: int = 32, bn_ghost_size: int = 32) -> CNNv2:
    """A freshly initialised CNN v2."""
    return CNNv2(num_classes, width=width, bn_ghost_size=bn_ghost_size)


def make_optimizer(model: CNNv2, *, name: str, lr: float, momentum: float, weight_decay: float,
                   feature_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW or SGD over parameter groups: features/head (``lr_scale``), weights/norms+biases (decay)."""
    groups: list[dict[str, Any]] = []
    for part, scale in ((model.features, feature_lr_scale), (model.head, 1.0)):
        decay = [p for p in part.parameters() if p.ndim > 1]
        no_decay = [p for p in part.parameters() if p.ndim <= 1]  # norms and biases
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": scale})
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": scale})
    # Fused kernels accept a device-side "found_inf" flag: a non-finite step is skipped without a
    # host-device synchronisation.
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, fused=True)


def grad_norm(model: nn.Module, clip: float = 0.0) -> torch.Tensor:
    """Total gradient norm (clipped to ``clip`` when positive), computed on the device: no sync."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=next(model.parameters()).device)
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: no rescaling pass
    if total_norm is None:
        return torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
    return total_norm([p.grad for p in params], foreach=True)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile and DistributedDataParallel wrappers (for saving and inspection)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        elif hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
            model = model.module  # DDP
        else:
            return model


@contextlib.contextmanager
def deferred_bn_stats(model: nn.Module, enabled: bool = True, keep: bool = True) -> Iterator[None]:
    """Inside, ghost batch norms collect their running-stat updates and apply them once at the end
    (not at all when the block fails, or with ``keep`` False: a pass whose samples do not count)."""
    mods = [m for m in unwrap(model).modules() if isinstance(m, GhostBatchNorm2d)] if enabled else []
    for m in mods:
        m.begin_deferred()
    ok = False
    try:
        yield
        ok = keep
    finally:
        for m in mods:
            m.end_deferred(apply=ok)


