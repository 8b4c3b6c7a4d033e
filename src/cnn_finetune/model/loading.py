"""Base models and model files: weights from a ``.pth`` or ``.safetensors`` file into a CNN v2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .cnn import ARCH, MAX_CLASSES, MAX_GHOST_SIZE, MAX_WIDTH, CNNv2, build_model


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
    from ..files.checkpoint import SAFETENSORS_SUFFIX, CheckpointError, load_safetensors

    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            weights, meta = load_safetensors(path)
        except CheckpointError as err:
            raise UserError(f"base model cannot be used: {err}", path=str(path)) from None
        base_classes = (meta or {}).get("class_names")
    else:
        weights, base_classes = _pth_weights(path)
    if not all_finite(weights):
        # Training would start from weights that no checkpoint may hold, with nothing to roll back to.
        raise UserError(f"base model {path} holds NaN/Inf weights; pass another --base-model, or --base-model none", path=str(path))
    return adapt_state_dict(model, weights, base_classes, class_names, str(path))


def _pth_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The weights (and class names, when known) of a ``.pth``: a file of this program or a plain state dict."""
    from ..files.checkpoint import CheckpointError, load_checkpoint

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
    return weights, base_classes


def read_model_file(path: Path) -> dict[str, Any]:
    """The state inside a model file: a ``.pth`` written by training, or a ``.safetensors`` written by
    export.py (weights under ``model``, the metadata beside them). Raises ``CheckpointError``."""
    from ..files.checkpoint import SAFETENSORS_SUFFIX, CheckpointError, load_checkpoint, load_safetensors

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
    from ..files.checkpoint import CheckpointError

    try:
        state = read_model_file(Path(path))
    except CheckpointError as err:
        raise UserError(f"model file cannot be used: {err}") from None
    return model_from_state(state, path, device)


def model_from_state(state: dict[str, Any], path: str | Path, device: str | torch.device = "cpu") -> tuple[CNNv2, dict[str, Any]]:
    """The model (eval mode, on ``device``) and metadata of a model file's content ``state``, checked as
    ``load_model_file`` checks a file's (``path`` names it in the messages): also for a state still in
    memory, such as the final weights the end of training compares with the best epoch's."""
    if "arch" not in state or "model" not in state:
        raise UserError(f"{path} is not a model saved by this program (no architecture or weights inside)")
    if state["arch"] != ARCH:
        raise UserError(f"{path} holds architecture {state['arch']!r}; this program knows {ARCH!r}")
    model = build_model(**checked_arch_params(state.get("arch_params"), str(path)))
    model.load_state_dict(state["model"])
    if not all_finite(state["model"]):
        # Training never saves such weights; a forged or damaged file would answer "nan%" for every image.
        from ..files.rundir import LAST

        raise UserError(f"model file {path} holds NaN/Inf weights: it was damaged or edited; use another model file "
                        f"({LAST} or a best-epoch file of the run)", path=str(path))
    model.to(device).eval()
    meta = {k: v for k, v in state.items() if k != "model"}
    return model, meta


def all_finite(obj: Any) -> bool:
    """True when every floating-point tensor in a nested structure of dicts and lists is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def checked_arch_params(params: Any, source: str) -> dict[str, int]:
    """A model file's ``arch_params`` checked against the limits of training before anything is built:
    a forged ``width`` of 1500 would otherwise allocate gigabytes first. Raises ``UserError``."""
    limits = {"num_classes": (2, MAX_CLASSES), "width": (1, MAX_WIDTH), "bn_ghost_size": (0, MAX_GHOST_SIZE)}
    if not isinstance(params, dict) or not set(params) <= set(limits) or "num_classes" not in params:
        raise UserError(f"model file {source} has unusable architecture parameters ({str(params)[:120]}); expected "
                        f"{', '.join(limits)}: it was not written by this program or was edited", path=source)
    for name, value in params.items():
        low, high = limits[name]
        if type(value) is not int or not low <= value <= high:
            raise UserError(f"model file {source} says {name}={str(value)[:40]}, outside {low} to {high}: it was not written "
                            "by this program or was edited; nothing was built", path=source)
    return params
