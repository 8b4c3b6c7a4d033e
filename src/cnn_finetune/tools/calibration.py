"""Calibrated confidence: one temperature fitted on the validation split, its error, the "unknown" rule.

A softmax trained with label smoothing and augmentation is not a probability. Temperature scaling
(Guo et al. 2017) divides the logits by one number ``T`` fitted to minimise the negative
log-likelihood of the validation split; it keeps every prediction (the arg max is unchanged) and,
with a single parameter, cannot overfit a validation split of a few hundred images the way matrix
or vector scaling with one parameter per class would. The fit is LBFGS on ``log T`` in float64.

The expected calibration error (ECE) uses 15 equal-width confidence bins: the share-weighted mean of
``|accuracy - mean confidence|`` per bin.

"Unknown": an image whose calibrated confidence is under a threshold is answered as unknown. The
threshold is chosen on the validation split as the confidence that keeps ``KEEP_CORRECT`` (99%) of
the correctly classified validation images above it (their 1st percentile), so that at most about
1% of the answers the model gets right are withheld.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
KEEP_CORRECT = 0.99
T_MIN, T_MAX = 0.05, 20.0  # a fit outside these says the split is too small or degenerate: clamped


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` for ``labels`` (1.0 without data)."""
    if logits.shape[0] == 0:
        return 1.0
    z, y = logits.detach().double().cpu(), labels.detach().long().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, T_MIN), T_MAX) if math.isfinite(t) else 1.0


def calibrated_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature)`` in float32."""
    return torch.softmax(logits.float() / float(temperature), dim=1)


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per confidence bin ``[lo, hi)`` (the last closed): count, accuracy and mean confidence (None when empty)."""
    conf, pred = probs.max(1)
    correct = (pred == labels.long()).double()
    conf = conf.double()
    which = (conf * bins).floor().clamp(0, bins - 1).long()
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                    "accuracy": float(correct[mask].mean()) if n else None,
                    "confidence": float(conf[mask].mean()) if n else None})
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float | None:
    """ECE over ``bins`` equal-width bins (None without images)."""
    n = probs.shape[0]
    if n == 0:
        return None
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, labels, bins) if b["count"])


def unknown_threshold(probs: torch.Tensor, labels: torch.Tensor, keep: float = KEEP_CORRECT) -> float:
    """The confidence that keeps ``keep`` of the correctly classified images at or above it (0.0 without any)."""
    conf, pred = probs.max(1)
    right = conf[pred == labels.long()].double()
    if right.numel() == 0:
        return 0.0
    return float(torch.quantile(right, 1.0 - keep, interpolation="lower"))


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, Any]:
    """What evaluation.json says about confidence: the temperature, ECE after and before scaling, the bins."""
    probs = calibrated_probs(logits, temperature)
    return {"temperature": float(temperature),
            "ece": expected_calibration_error(probs, labels),
            "ece_uncalibrated": expected_calibration_error(calibrated_probs(logits, 1.0), labels),
            "reliability": reliability_bins(probs, labels)}


def model_temperature(meta: dict[str, Any]) -> float:
    """The temperature stored with a model (1.0 for files made before calibration, or without it)."""
    t = (meta.get("calibration") or {}).get("temperature", 1.0)
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) and t > 0 else 1.0


def model_threshold(meta: dict[str, Any]) -> float:
    """The "unknown" threshold stored with a model (0.0: never unknown, for older files)."""
    t = (meta.get("calibration") or {}).get("unknown_threshold", 0.0)
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) else 0.0
