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

The softmax alone cannot tell noise from a digit: the network can be as confident on uniform noise
as on its own classes, and a temperature only rescales that confidence. The second signal is a
distance in the penultimate feature space (the vector the linear head reads): the smallest
Mahalanobis distance (squared) from an image's features to the mean of a class, with one covariance
shared by all classes (the pooled within-class covariance of the training split's unaugmented images),
shrunk half-way towards its diagonal (``SHRINKAGE``; with tens of images per class and 96 features
the pooled covariance alone is singular or nearly so) plus a small ridge. Means and the precision
matrix are fitted on the training split at the end of a run; the distance threshold is the value
that keeps ``KEEP_CORRECT`` of the correctly classified validation images at or under it (their 99th
percentile), the same rule as the confidence. An image is unknown when EITHER signal says so. The
means and the precision are rounded to float32 before the threshold is chosen, so that the model
file reproduces exactly what was measured.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
KEEP_CORRECT = 0.99
T_MIN, T_MAX = 0.05, 20.0  # a fit outside these says the split is too small or degenerate: clamped
SHRINKAGE = 0.5  # weight of the diagonal in the shared covariance (0: the pooled covariance as it is)
RIDGE = 1e-3  # added to the diagonal, relative to the mean variance: keeps dead features' precision finite


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


# --- the distance in feature space --------------------------------------------------------------------


def fit_feature_distance(features: torch.Tensor, labels: torch.Tensor, shrinkage: float = SHRINKAGE) -> dict[str, Any]:
    """Class means and the shared precision matrix of the Mahalanobis distance, from the unaugmented
    training images' penultimate ``features`` (N, D) and ``labels`` (N,).

    Classes without an image get no mean (the distance is to the nearest class that has one). The
    covariance is pooled within classes (N - K degrees of freedom), shrunk towards its diagonal by
    ``shrinkage``, with ``RIDGE`` times the mean variance added to the diagonal; everything in float64,
    stored rounded to float32 as plain lists (the model file's metadata is JSON in a safetensors export)."""
    f, y = features.detach().double().cpu(), labels.detach().long().cpu()
    present = torch.unique(y)
    means = torch.stack([f[y == c].mean(0) for c in present.tolist()])
    centred = f - means[torch.searchsorted(present, y)]
    cov = centred.T @ centred / max(f.shape[0] - len(present), 1)
    diag = torch.diag(torch.diag(cov))
    shrunk = (1.0 - shrinkage) * cov + shrinkage * diag
    scale = float(torch.diag(cov).mean()) if float(torch.diag(cov).mean()) > 0 else 1.0
    shrunk = shrunk + RIDGE * scale * torch.eye(f.shape[1], dtype=torch.float64)
    precision = torch.linalg.inv(shrunk)
    precision = (precision + precision.T) / 2  # exactly symmetric: the distances cannot go negative by rounding
    return {"means": means.float().tolist(), "precision": precision.float().tolist(),
            "classes": present.tolist(), "shrinkage": shrinkage, "ridge": RIDGE, "num_images": int(f.shape[0])}


def feature_distance(features: torch.Tensor, fitted: dict[str, Any]) -> torch.Tensor:
    """The squared Mahalanobis distance of each row of ``features`` to its nearest class mean (float64, CPU)."""
    means = torch.tensor(fitted["means"], dtype=torch.float64)
    precision = torch.tensor(fitted["precision"], dtype=torch.float64)
    f = features.detach().double().cpu()
    if f.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    fp = f @ precision
    d = (fp * f).sum(1, keepdim=True) - 2 * fp @ means.T + ((means @ precision) * means).sum(1)
    return d.min(1).values.clamp(min=0.0)


def distance_threshold(distances: torch.Tensor, correct: torch.Tensor, keep: float = KEEP_CORRECT) -> float | None:
    """The distance that keeps ``keep`` of the correctly classified images at or under it (None without any)."""
    right = distances[correct.cpu()].double()
    if right.numel() == 0:
        return None
    return float(torch.quantile(right, keep, interpolation="higher"))


def fit_distance_check(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                       val_correct: torch.Tensor) -> dict[str, Any] | None:
    """The fitted distance (``fit_feature_distance``) and its ``threshold`` chosen on the validation split;
    None without training images or without a correctly classified validation image (no distance check)."""
    if train_features.shape[0] == 0:
        return None
    fitted = fit_feature_distance(train_features, train_labels)
    threshold = distance_threshold(feature_distance(val_features, fitted), val_correct)
    return None if threshold is None else {**fitted, "threshold": threshold, "keep_correct": KEEP_CORRECT}


def model_distance(meta: dict[str, Any], feature_size: int | None = None) -> dict[str, Any] | None:
    """The fitted feature distance stored with a model, or None (files made before it, or a field that
    does not hold a finite threshold, means and a square precision of the model's feature size)."""
    fitted = (meta.get("calibration") or {}).get("feature_distance")
    if not isinstance(fitted, dict):
        return None
    try:
        means = torch.tensor(fitted["means"], dtype=torch.float64)
        precision = torch.tensor(fitted["precision"], dtype=torch.float64)
        threshold = float(fitted["threshold"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    d = precision.shape[0] if precision.dim() == 2 else -1
    shapes = means.dim() == 2 and means.shape[0] > 0 and means.shape[1] == d and tuple(precision.shape) == (d, d)
    if not shapes or (feature_size is not None and d != feature_size):
        return None
    if not (math.isfinite(threshold) and bool(torch.isfinite(means).all()) and bool(torch.isfinite(precision).all())):
        return None
    return fitted
