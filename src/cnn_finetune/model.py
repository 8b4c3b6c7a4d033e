"""The CNN v2: a compact convolutional classifier for 1 x 28 x 28 images.

Five 3x3 convolutions with batch norm (24-48-48-96-96 channels at the default width 24), max
pooling, a global max pool and one linear layer: about 158k parameters, no giant fully connected
layer. Batch norm computes its statistics over fixed "ghost" groups of samples, so splitting a
batch into micro-batches (the out-of-memory recovery) leaves every sample's normalisation, and
hence the step's result, unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

ARCH = "cnn_v2"


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


def adapt_state_dict(model: CNNv2, state: dict[str, torch.Tensor], base_classes: list[str] | None,
                     class_names: list[str], source: str) -> str:
    """Load a base model's weights into ``model``, replacing the head when the classes differ.

    Feature layers must match exactly (a clear error names the first mismatch). Head rows of
    classes present in both models are kept, so fine-tuning 0-9 to 0-9 plus letters keeps the digits.
    Returns a one-line description of what was done.
    """
    own = model.state_dict()
    feats = {k: v for k, v in state.items() if k.startswith("features.")}
    missing = [k for k in own if k.startswith("features.") and k not in feats]
    if missing or not feats:
        raise UserError(f"base model {source} is not a CNN v2 (missing {missing[0] if missing else 'features.*'}); pass weights saved by this program with --base-model, or --base-model none to train from scratch")
    for k, v in feats.items():
        if k not in own:
            raise UserError(f"base model {source} has an unexpected layer {k}; it is not a CNN v2 of this program")
        if own[k].shape != v.shape:
            raise UserError(f"base model {source} does not fit: layer {k} has shape {tuple(v.shape)}, the model here needs {tuple(own[k].shape)} (is --width different from the base model's?)")
    new_state = dict(own)
    new_state.update(feats)
    head_w, head_b = state.get("head.weight"), state.get("head.bias")
    kept = 0
    if head_w is not None and head_w.shape[1] == own["head.weight"].shape[1]:
        if base_classes is None and head_w.shape[0] == len(class_names):
            new_state["head.weight"], new_state["head.bias"] = head_w, head_b
            kept = len(class_names)
        elif base_classes is not None:
            w, b = own["head.weight"].clone(), own["head.bias"].clone()
            for i, name in enumerate(class_names):
                if name in base_classes:
                    j = base_classes.index(name)
                    w[i], b[i] = head_w[j], head_b[j]
                    kept += 1
            new_state["head.weight"], new_state["head.bias"] = w, b
    model.load_state_dict(new_state)
    if kept == len(class_names):
        return f"fine-tuning from {source}: all layers loaded"
    return f"fine-tuning from {source}: feature layers loaded, classifier head new ({kept} of {len(class_names)} classes carried over)"


def load_base_model(model: CNNv2, path: Path, class_names: list[str]) -> str:
    """Load weights from a model file, checkpoint, ``.safetensors`` file or plain state dict saved by
    this program."""
    from .checkpoint import SAFETENSORS_SUFFIX, CheckpointError, load_checkpoint, load_safetensors

    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            weights, meta = load_safetensors(path)
        except CheckpointError as err:
            raise UserError(f"base model cannot be used: {err}", path=str(path)) from None
        return adapt_state_dict(model, weights, (meta or {}).get("class_names"), class_names, str(path))
    try:
        state = load_checkpoint(path)
        if "model" not in state:
            raise UserError(f"base model {path} is a checkpoint of this program but holds no model weights")
        weights = state["model"]
        base_classes = state.get("class_names")
    except CheckpointError as err:
        try:  # a plain state_dict saved with torch.save(model.state_dict())
            weights = torch.load(path, map_location="cpu", weights_only=True)
            base_classes = None
        except Exception:
            raise UserError(f"base model cannot be used: {err}") from None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise UserError(f"base model {path} holds neither a model of this program nor a state dict of tensors") from None
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        # Training would start from weights that no checkpoint may hold, with nothing to roll back to.
        raise UserError(f"base model {path} holds NaN/Inf weights; pass another --base-model, or --base-model none")
    return adapt_state_dict(model, weights, base_classes, class_names, str(path))


def read_model_file(path: Path) -> dict[str, Any]:
    """The state inside a model file: a ``.pth`` written by training, or a ``.safetensors`` written by
    export.py (weights under ``model``, the metadata beside them). Raises ``CheckpointError``."""
    from .checkpoint import SAFETENSORS_SUFFIX, CheckpointError, load_checkpoint, load_safetensors

    if path.suffix != SAFETENSORS_SUFFIX:
        return load_checkpoint(path)
    weights, meta = load_safetensors(path)
    if meta is None:
        raise CheckpointError(f"{path} is a safetensors file but not a model written by this program (its header has no "
                              "cnn_finetune metadata); use a .safetensors file written by export.py", path=str(path))
    return {**meta, "model": weights}


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[CNNv2, dict[str, Any]]:
    """Load ``best_model_finetuned.pth`` (or a best-epoch file, a checkpoint, or a ``.safetensors``
    file written by export.py) for inference.

    Returns the model in eval mode and its metadata: class names, normalisation, epoch, metrics.
    """
    from .checkpoint import CheckpointError

    try:
        state = read_model_file(Path(path))
    except CheckpointError as err:
        raise UserError(f"model file cannot be used: {err}") from None
    if "arch" not in state or "model" not in state:
        raise UserError(f"{path} is not a model saved by this program (no architecture or weights inside)")
    if state["arch"] != ARCH:
        raise UserError(f"{path} holds architecture {state['arch']!r}; this program knows {ARCH!r}")
    model = build_model(**state["arch_params"])
    model.load_state_dict(state["model"])
    model.to(device).eval()
    meta = {k: v for k, v in state.items() if k != "model"}
    return model, meta
