"""Inference shared by evaluation, prediction and export: one way to load a model, one way to run it.

Every consumer of a trained model goes through ``load_inference_model`` and ``predict_proba``, so
the normalisation applied here is exactly the one used in training (``augment.to_unit`` and
``augment.normalize`` with the mean and standard deviation stored in the model file) and the
three tools cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import torch.nn.functional as F

from ..data.augment import normalize, sampling_grid, to_unit
from ..data.loader import MIN_STD
from ..config import DEFAULT_OUTPUT_DIR
from ..errors import UserError
from ..files.kinds import special_kind
from ..model.cnn import CNNv2
from ..model.loading import load_model_file
from ..files.rundir import BEST

# What train_finetuned.py writes with its default settings: the tools' default --model.
DEFAULT_MODEL = Path(DEFAULT_OUTPUT_DIR) / BEST
# Test-time augmentation (evaluate.py --tta): the unaugmented view first, then fixed small shifts and
# turns, as (shift x, shift y) in pixels and a rotation in degrees, well inside the training augmentation.
TTA_VIEWS: tuple[tuple[float, float, float], ...] = (
    (0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 8), (0, 0, -8))


def load_inference_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[CNNv2, dict[str, Any]]:
    """Load a model file for inference; every problem becomes a ``UserError`` that names the file.

    ``load_model_file`` already turns missing, truncated and tampered files into ``UserError``;
    this adds the cases it lets through (weights that do not fit their architecture, metadata
    without class names or normalisation), which would otherwise surface as tracebacks.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--model {path} is a folder; pass the model file inside it, e.g. {path / BEST}")
    what = special_kind(path)
    if what is not None:  # a FIFO would block the read forever
        raise UserError(f"--model {path} is {what}, not a model file; pass the .pth or .safetensors file itself", path=str(path))
    if not path.exists():
        raise UserError(f"model file {path} does not exist; pass --model PATH, or train one first with scripts/train_finetuned.py")
    try:
        model, meta = load_model_file(path, device=device)
    except UserError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"model file {path} cannot be used: its weights do not fit the CNN v2 ({first})") from None
    names = meta.get("class_names")
    norm = meta.get("normalization")
    norm = norm if isinstance(norm, dict) else {}
    if not isinstance(names, list) or len(names) != model.num_classes:
        raise UserError(f"model file {path} has no usable class names (found {names!r} for {model.num_classes} outputs); "
                        f"use {BEST} or a best_epoch*.pth file written by train_finetuned.py")
    if not isinstance(norm.get("mean"), (int, float)) or not isinstance(norm.get("std"), (int, float)):
        raise UserError(f"model file {path} lacks the normalisation (mean, std) it was trained with; "
                        f"use {BEST} or a best_epoch*.pth file written by train_finetuned.py")
    if not (_within(norm["mean"], 0.0, 1.0) and _within(norm["std"], MIN_STD, 1.0)):
        # Training computes both from pixels scaled to [0, 1], the std at least MIN_STD: anything
        # else (std 0, a NaN mean, 1e-300 that float32 makes 0) gives "nan%" predictions.
        raise UserError(f"model file {path} has an unusable normalisation (mean {norm['mean']}, std {norm['std']}; a mean from 0 "
                        f"to 1 and a std from {MIN_STD} to 1 are needed): it was edited or damaged; use {BEST} written by "
                        "train_finetuned.py", path=str(path))
    meta = dict(meta)
    meta["class_names"] = [str(n) for n in names]
    meta["path"] = str(path)
    return model, meta


def _within(value: float, low: float, high: float) -> bool:
    """``low <= value <= high`` for a finite number (False for NaN, and for an int past float's range)."""
    try:
        return math.isfinite(value) and low <= value <= high
    except OverflowError:
        return False


def model_polarity(meta: dict[str, Any]) -> str:
    """The polarity setting the model was trained with (``auto`` for files that predate the field)."""
    config = meta.get("config") or {}
    return str(config.get("polarity", "auto"))


def model_max_pixels(meta: dict[str, Any]) -> int:
    """The image size limit the model was trained with (the default for files that predate the field)."""
    from ..data.imageprep import DEFAULT_MAX_PIXELS

    return int((meta.get("config") or {}).get("max_image_pixels", DEFAULT_MAX_PIXELS))


def normalise_images(images_uint8: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """uint8 ``N x 1 x 28 x 28`` -> the float32 network input, exactly as in training."""
    return normalise_unit(to_unit(images_uint8), meta)


def normalise_unit(x: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """Float images in [0, 1] -> the network input, with the model's normalisation."""
    norm = meta["normalization"]
    return normalize(x, float(norm["mean"]), float(norm["std"]))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, meta: dict[str, Any], images_uint8: torch.Tensor,
                   device: torch.device | str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """Float32 logits (on the CPU) for uint8 images, in batches, with the model in eval mode.

    Inference runs in float32 without autocast: results do not depend on the device's mixed
    precision, so exported models and predictions on another machine can be compared with it.
    """
    return _forward(model, meta, images_uint8, device, batch_size, features=False)[0]


@torch.no_grad()
def predict_logits_and_features(model: CNNv2, meta: dict[str, Any], images_uint8: torch.Tensor,
                                device: torch.device | str = "cpu", batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``predict_logits`` and, from the same forward pass, the penultimate features the head reads
    (float32, CPU, ``N x 4*width``): ``model.head(model.features(x))`` is ``model(x)``, op for op."""
    return _forward(model, meta, images_uint8, device, batch_size, features=True)


def _forward(model: torch.nn.Module, meta: dict[str, Any], images_uint8: torch.Tensor, device: torch.device | str,
             batch_size: int, *, features: bool, shift: tuple[float, float, float] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (and features, else an empty tensor) of uint8 images, batched, in eval mode, in float32;
    ``shift``: the images seen through that ``view`` first (test-time augmentation)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or tuple(images_uint8.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected uint8 images of shape N x 1 x 28 x 28, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    device = torch.device(device)
    was_training = model.training  # the trainer may pass its live model: give it back as it was
    model.eval()
    outputs, feats = [], []
    try:
        for i in range(0, images_uint8.shape[0], batch_size):
            batch = images_uint8[i:i + batch_size].to(device)
            x = normalise_images(batch, meta) if shift is None else normalise_unit(view(to_unit(batch), *shift), meta)
            if features:
                f = model.features(x)
                feats.append(f.float().cpu())
                outputs.append(model.head(f).float().cpu())
            else:
                outputs.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros((0, len(meta["class_names"])), dtype=torch.float32), torch.zeros((0, 0), dtype=torch.float32)
    return torch.cat(outputs), torch.cat(feats) if feats else torch.zeros((0, 0), dtype=torch.float32)


def predict_proba(model: torch.nn.Module, meta: dict[str, Any], images_uint8: torch.Tensor,
                  device: torch.device | str = "cpu", batch_size: int = 512, *,
                  temperature: float | None = None) -> torch.Tensor:
    """Calibrated class probabilities, float32 on the CPU, one row per image: ``softmax(logits / T)``
    with the temperature ``T`` fitted on the validation split at the end of training and stored in the
    model file (``meta["calibration"]``; 1.0 for files without one). ``temperature`` overrides it
    (``temperature=1.0``: the raw softmax)."""
    from .calibration import calibrated_probs, model_temperature

    t = model_temperature(meta) if temperature is None else float(temperature)
    return calibrated_probs(predict_logits(model, meta, images_uint8, device, batch_size), t)


@dataclass
class Answers:
    """What ``predict_with_unknown`` says about each image (one row per image, CPU tensors)."""

    probs: torch.Tensor  # calibrated probabilities, N x classes
    confidence: torch.Tensor  # the top calibrated probability, N
    distance: torch.Tensor | None  # squared Mahalanobis distance to the nearest class mean, N (None: no check)
    unknown: torch.Tensor  # bool, N: confidence under min_confidence OR distance over max_distance
    min_confidence: float
    max_distance: float | None  # None: no distance check (a file made before it, or turned off)


def predict_with_unknown(model: CNNv2, meta: dict[str, Any], images_uint8: torch.Tensor,
                         device: torch.device | str = "cpu", batch_size: int = 512, *,
                         min_confidence: float | None = None, max_distance: float | None = None) -> Answers:
    """Calibrated probabilities and the "unknown" answer of each image, from one forward pass.

    An image is unknown when EITHER its calibrated confidence is under ``min_confidence`` (default:
    the model's threshold, ``calibration.model_threshold``; 0 turns the check off) OR the squared
    Mahalanobis distance of its features to the nearest class mean is over ``max_distance`` (default:
    the model's, fitted at the end of training; 0 turns the check off; files made before it have none
    and get no distance check)."""
    from .calibration import calibrated_probs, feature_distance, model_distance, model_temperature, model_threshold

    logits, feats = predict_logits_and_features(model, meta, images_uint8, device, batch_size)
    probs = calibrated_probs(logits, model_temperature(meta))
    confidence = probs.max(1).values if probs.shape[0] else torch.zeros(0)
    threshold = model_threshold(meta) if min_confidence is None else float(min_confidence)
    unknown = confidence < threshold
    fitted = model_distance(meta, int(feats.shape[1]) if feats.shape[0] else None)
    limit = (fitted or {}).get("threshold") if max_distance is None else (float(max_distance) or None)
    distance = None
    if fitted is not None and limit is not None:
        distance = feature_distance(feats, fitted)
        unknown = unknown | (distance > limit)
    return Answers(probs, confidence, distance, unknown, threshold, limit if distance is not None else None)


def view(x: torch.Tensor, shift_x: float, shift_y: float, degrees: float) -> torch.Tensor:
    """Float images in [0, 1], ``(B, 1, H, W)``, shifted by whole or fractional pixels and turned about
    the centre (one bilinear resampling, zero background); the unchanged view is returned as it is."""
    if shift_x == 0 and shift_y == 0 and degrees == 0:
        return x
    height, width = x.shape[2], x.shape[3]
    angle = math.radians(degrees)
    # grid_sample's coordinates span 2 over a side: a pixel is 2 / side; the grid maps output to input.
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), -2.0 * shift_x / width],
                          [math.sin(angle), math.cos(angle), -2.0 * shift_y / height]], dtype=x.dtype, device=x.device)
    grid = sampling_grid(theta.expand(x.shape[0], 2, 3), height, width)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def predict_tta_log_probs(model: torch.nn.Module, meta: dict[str, Any], images_uint8: torch.Tensor,
                          device: torch.device | str = "cpu", batch_size: int = 512,
                          views: tuple[tuple[float, float, float], ...] = TTA_VIEWS) -> torch.Tensor:
    """Test-time augmentation: the log of the mean softmax over ``views`` (float32, on the CPU).

    The result takes the place of logits (its softmax is the mean of the views' probabilities), so a
    stored temperature applies to it as to logits; with the unaugmented view alone it gives the
    probabilities of ``predict_logits``. Costs one forward pass per view.
    """
    probs = sum(torch.softmax(_forward(model, meta, images_uint8, device, batch_size, features=False, shift=v)[0], 1)
                for v in views)
    return (probs / len(views)).clamp_min_(1e-30).log_()
