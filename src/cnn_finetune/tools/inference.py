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
# Test-time augmentation (config ``tta``: auto turns it on for classes new to the base model; evaluate.py
# --tta / --no-tta): the unaugmented
# view first, then fixed small shifts and turns, as (shift x, shift y) in pixels and a rotation in degrees,
# well inside the training augmentation. A model file names its views (``tta_views``, written at the end of
# training); every tool predicts with them, so evaluation, prediction, calibration and export agree.
View = tuple[float, float, float]
PLAIN: tuple[View, ...] = ((0, 0, 0),)
TTA_VIEWS: tuple[View, ...] = (
    (0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 8), (0, 0, -8))
MAX_VIEWS, MAX_VIEW_SHIFT, MAX_VIEW_DEGREES = 64, 4.0, 45.0  # bounds of a model file's views (a damaged file is refused)


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
    try:
        model_views(meta)
    except ValueError as err:
        raise UserError(f"model file {path} has unusable test-time views ({err}): it was edited or damaged; use {BEST} "
                        "written by train_finetuned.py", path=str(path)) from None
    meta = dict(meta)
    meta["class_names"] = [str(n) for n in names]
    meta["path"] = str(path)
    return model, meta


def model_views(meta: dict[str, Any]) -> tuple[View, ...]:
    """The views a model predicts with: its ``tta_views`` (written at the end of training), else the plain
    image alone (files made before them, or trained with ``tta`` off). Raises ``ValueError`` for views that
    are not a list of (shift x, shift y, degrees) starting with the unaugmented one, within the bounds."""
    raw = meta.get("tta_views")
    if raw is None:
        return PLAIN
    if not isinstance(raw, (list, tuple)) or not 1 <= len(raw) <= MAX_VIEWS:
        raise ValueError(f"tta_views must be a list of 1 to {MAX_VIEWS} views, found {str(raw)[:80]}")
    views = []
    for v in raw:
        if (not isinstance(v, (list, tuple)) or len(v) != 3
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in v)):
            raise ValueError(f"a view must be three numbers (shift x, shift y, degrees), found {str(v)[:80]}")
        if max(abs(v[0]), abs(v[1])) > MAX_VIEW_SHIFT or abs(v[2]) > MAX_VIEW_DEGREES:
            raise ValueError(f"view {list(v)} is outside +-{MAX_VIEW_SHIFT:g} pixels and +-{MAX_VIEW_DEGREES:g} degrees")
        views.append((float(v[0]), float(v[1]), float(v[2])))
    if views[0] != (0.0, 0.0, 0.0):
        raise ValueError(f"the first view must be the unaugmented image [0, 0, 0], found {list(views[0])}")
    return tuple(views)


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
                   device: torch.device | str = "cpu", batch_size: int = 512, *,
                   views: tuple[View, ...] | None = None) -> torch.Tensor:
    """Float32 logits (on the CPU) for uint8 images, in batches, with the model in eval mode.

    With more than one view (``views``, default: the model's own, ``model_views``) they are test-time
    augmented: the log of the mean softmax over the views, which takes the place of logits (its softmax
    is the mean of the views' probabilities, and a temperature applies to it as to logits). Inference
    runs in float32 without autocast: results do not depend on the device's mixed precision, so exported
    models and predictions on another machine can be compared with it.
    """
    return _forward(model, meta, images_uint8, device, batch_size, features=False, views=views)[0]


@torch.no_grad()
def predict_logits_and_features(model: CNNv2, meta: dict[str, Any], images_uint8: torch.Tensor,
                                device: torch.device | str = "cpu", batch_size: int = 512, *,
                                views: tuple[View, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``predict_logits`` and the penultimate features the head reads on the unaugmented view (float32,
    CPU, ``N x 4*width``), from its forward pass: ``model.head(model.features(x))`` is ``model(x)``, op for op."""
    return _forward(model, meta, images_uint8, device, batch_size, features=True, views=views)


def _forward(model: torch.nn.Module, meta: dict[str, Any], images_uint8: torch.Tensor, device: torch.device | str,
             batch_size: int, *, features: bool, views: tuple[View, ...] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (and the plain view's features, else an empty tensor) of uint8 images, batched, in eval
    mode, in float32, over ``views`` (default: the model's)."""
    views = model_views(meta) if views is None else tuple(views)
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or tuple(images_uint8.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected uint8 images of shape N x 1 x 28 x 28, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    device = torch.device(device)
    was_training = model.training  # the trainer may pass its live model: give it back as it was
    model.eval()
    outputs, feats = [], []
    try:
        for i in range(0, images_uint8.shape[0], batch_size):
            batch = images_uint8[i:i + batch_size].to(device)
            x = normalise_images(batch, meta)
            if features:
                f = model.features(x)
                feats.append(f.float().cpu())
                logits = model.head(f).float()
            else:
                logits = model(x).float()
            if len(views) > 1:
                logits = mean_softmax_log(logits, [model(normalise_unit(view(to_unit(batch), *v), meta)).float()
                                                   for v in views[1:]])
            outputs.append(logits.cpu())
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
    grid = view_grid(x.shape[0], x.shape[2], x.shape[3], shift_x, shift_y, degrees, dtype=x.dtype, device=x.device)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def view_grid(batch: int, height: int, width: int, shift_x: float, shift_y: float, degrees: float, *,
              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``grid_sample`` grid ``(batch, H, W, 2)`` of one view: a shift in pixels and a turn about the centre."""
    angle = math.radians(degrees)
    # grid_sample's coordinates span 2 over a side: a pixel is 2 / side; the grid maps output to input.
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), -2.0 * shift_x / width],
                          [math.sin(angle), math.cos(angle), -2.0 * shift_y / height]], dtype=dtype, device=device)
    return sampling_grid(theta.expand(batch, 2, 3), height, width)


def mean_softmax_log(first: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """The log of the mean softmax of several views' logits (the plain view's first): test-time
    augmentation's output, in place of logits. Clamped at 1e-30 so that no class gets minus infinity."""
    probs = torch.softmax(first, 1)
    for logits in others:
        probs = probs + torch.softmax(logits, 1)
    return (probs / (1 + len(others))).clamp_min(1e-30).log()


class ViewAveraged(torch.nn.Module):
    """The network with its test-time views built in, for export: normalised images in, the log of the
    mean softmax over the views out (what ``predict_logits`` gives for a model file with those views).

    Each view's sampling grid is computed once, as ``view`` computes it, and kept as a constant: the
    traced and ONNX graphs then hold one ``grid_sample`` per view and no grid arithmetic."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], views: tuple[View, ...]) -> None:
        super().__init__()
        self.model = model
        self.mean = float(meta["normalization"]["mean"])
        self.std = float(meta["normalization"]["std"])
        grids = [view_grid(1, 28, 28, *v, dtype=torch.float32, device=torch.device("cpu")) for v in views[1:]]
        self.register_buffer("grids", torch.cat(grids) if grids else torch.zeros(0, 28, 28, 2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 (nn.Module API)
        unit = x * self.std + self.mean  # back to pixels in [0, 1], where a view pads with 0 as predict_logits does
        others = []
        for k in range(self.grids.shape[0]):
            grid = self.grids[k:k + 1].expand(x.shape[0], -1, -1, -1)
            seen = F.grid_sample(unit, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            others.append(self.model(normalize(seen, self.mean, self.std)))
        return mean_softmax_log(self.model(x), others)
