"""One typed configuration for a training run.

Defaults live here and in ``configs/finetune.json`` (kept equal by a test); the command line
overrides both. Values are validated once, in ``__post_init__``, with messages that name the
field, the bad value and what would be right. The config travels as plain data (``asdict``) in
every checkpoint and in ``config_finetuned.json``, never as a pickled object.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_PATH = Path("configs/finetune.json")
DEFAULT_OUTPUT_DIR = "models/cnn_modelo_v2_finetuned"
DEFAULT_BASE_MODEL = "models/cnn_modelo_v2/best_model.pth"

CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "polarity": ("auto", "invert", "keep"),
    "balance": ("none", "weighted_loss", "sampler"),
    "optimizer": ("adamw", "sgd"),
    "scheduler": ("onecycle", "cosine", "constant"),
    "monitor": ("val_acc", "val_loss"),
    "amp": ("auto", "off", "bf16"),
    "channels_last": ("auto", "on", "off"),
}


@dataclass
class TrainConfig:
    """Every hyper-parameter and run setting of one training run."""

    # --- data -------------------------------------------------------------------------------
    data: str | None = None  # data source; None: ./data if it exists, else the built-in MNIST sample
    val_data: str | None = None  # explicit validation source; None: split off val_fraction
    val_fraction: float = 0.1  # share of each class held out for validation
    polarity: str = "auto"  # raw images: auto-detect from the border, invert, or keep
    balance: str = "none"  # class imbalance: none, weighted_loss or sampler
    cache_dir: str | None = None  # preprocessed-data cache; None: $XDG_CACHE_HOME/cnn_finetune
    # --- model ------------------------------------------------------------------------------
    arch: str = "cnn_v2"  # architecture name stored with the weights
    width: int = 24  # channels of the first block; later blocks use 2x and 4x
    bn_ghost_size: int = 32  # batch-norm statistics per group of this many samples (0: whole batch)
    base_model: str | None = DEFAULT_BASE_MODEL  # weights to fine-tune from (None: from scratch)
    freeze_features_epochs: int = 0  # epochs during which only the classifier head trains
    feature_lr_scale: float = 1.0  # learning-rate factor of the feature layers (e.g. 0.1 when fine-tuning)
    # --- optimisation -----------------------------------------------------------------------
    epochs: int = 15  # training epochs
    batch_size: int = 128  # samples per optimizer step (the effective batch, also under OOM)
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 5e-4  # decoupled weight decay (not applied to norms and biases)
    optimizer: str = "adamw"  # adamw or sgd (Nesterov momentum)
    momentum: float = 0.9  # SGD momentum / Adam beta1
    scheduler: str = "onecycle"  # onecycle (warm-up then cosine), cosine or constant
    warmup_fraction: float = 0.25  # share of the steps spent warming up (onecycle)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    grad_clip: float = 0.0  # clip the gradient norm to this value (0: off)
    # --- augmentation (batched, on the training device) -------------------------------------
    aug_rotation: float = 15.0  # maximum rotation, degrees
    aug_translate: float = 0.12  # maximum translation, fraction of the image side
    aug_scale: float = 0.15  # maximum relative scale change (0.15: 0.85x to 1.15x)
    aug_noise: float = 0.05  # standard deviation of Gaussian pixel noise (pixels in [0, 1])
    # --- early stopping and checkpoints -----------------------------------------------------
    patience: int = 8  # epochs without improvement before stopping
    min_delta: float = 0.0  # smallest change of the monitored metric that counts as improvement
    monitor: str = "val_acc"  # metric for early stopping and the best checkpoints
    keep_best: int = 3  # number of best epochs kept as separate files (at least 1: the best)
    checkpoint_every_steps: int = 0  # also save checkpoint_last.pth every N steps (0: off)
    checkpoint_every_seconds: float = 120.0  # also save it after this many seconds (0: off)
    # --- robustness -------------------------------------------------------------------------
    max_retries: int = 5  # recovery attempts after failures in training
    cooldown_min: float = 5.0  # cool-down before a retry: random between min and max seconds,
    cooldown_max: float = 10.0  # doubled for each consecutive failure
    nan_max_consecutive: int = 3  # skipped non-finite steps in a row before a rollback
    nan_lr_factor: float = 0.5  # learning-rate factor applied at each NaN rollback
    nan_max_rollbacks: int = 3  # rollbacks before giving up
    oom_probe_steps: int = 200  # clean steps before trying fewer micro-batches after an OOM
    eval_batch_size: int = 1000  # validation batch size (halved on out-of-memory)
    sync_every: int = 0  # host-device syncs for NaN checks/logging every N steps (0: auto)
    # --- runtime ----------------------------------------------------------------------------
    seed: int = 42  # every random draw is a function of (seed, epoch, step)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    amp: str = "auto"  # mixed precision: auto (bf16 on CUDA), off, bf16 (bf16 needs no loss scaling)
    channels_last: str = "auto"  # memory format: auto (on for CUDA), on, off
    compile: bool = False  # torch.compile the model (start-up cost; pays off on long GPU runs)
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    output_dir: str = DEFAULT_OUTPUT_DIR  # where the artifacts go

    def __post_init__(self) -> None:
        _check_types(self)
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if name == "device" and (value.startswith("cuda:") and value[5:].isdigit()):
                continue
            if value not in allowed:
                raise ConfigError(
                    f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}"
                    + (" (or cuda:N)" if name == "device" else "")
                )
        _positive(self, "epochs", "batch_size", "eval_batch_size", "width", "keep_best")
        _non_negative(
            self, "lr", "weight_decay", "label_smoothing", "grad_clip", "aug_rotation",
            "aug_translate", "aug_scale", "aug_noise", "min_delta", "checkpoint_every_steps",
            "checkpoint_every_seconds", "max_retries", "cooldown_min", "cooldown_max",
            "freeze_features_epochs", "bn_ghost_size", "oom_probe_steps", "sync_every", "patience",
            "num_threads", "nan_max_rollbacks",
        )
        if self.lr == 0:
            raise ConfigError("lr=0 would never change the weights; use a positive value such as 3e-3")
        if not 0.0 < self.val_fraction < 1.0 and self.val_data is None:
            raise ConfigError(
                f"val_fraction={self.val_fraction} must be between 0 and 1 (e.g. 0.1 for 10%), "
                "or give an explicit validation folder with --val-data"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1), e.g. 0.1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1), e.g. 0.25")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1), e.g. 0.9")
        if self.aug_translate >= 0.5:
            raise ConfigError(f"aug_translate={self.aug_translate} would move digits out of the image; use < 0.5 (e.g. 0.1)")
        if self.aug_scale >= 1.0:
            raise ConfigError(f"aug_scale={self.aug_scale} must be < 1 (0.1 means 0.9x to 1.1x)")
        if self.aug_rotation > 180:
            raise ConfigError(f"aug_rotation={self.aug_rotation} degrees is more than half a turn; use 0-180")
        if self.cooldown_max < self.cooldown_min:
            raise ConfigError(
                f"cooldown_max={self.cooldown_max} is below cooldown_min={self.cooldown_min}; "
                "set cooldown_max >= cooldown_min (or --cooldown SECONDS for a fixed value)"
            )
        if self.nan_max_consecutive < 1:
            raise ConfigError(f"nan_max_consecutive={self.nan_max_consecutive} must be at least 1")
        if not 0.0 < self.nan_lr_factor < 1.0:
            raise ConfigError(f"nan_lr_factor={self.nan_lr_factor} must be in (0, 1), e.g. 0.5")
        if self.feature_lr_scale < 0:
            raise ConfigError(f"feature_lr_scale={self.feature_lr_scale} must be >= 0 (1.0: same as the head)")
        if self.arch != "cnn_v2":
            raise ConfigError(f"arch={self.arch!r} is not known; the only architecture is 'cnn_v2'")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build a config from plain data, refusing unknown keys with a suggestion."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; known keys are listed in configs/finetune.json")
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def field_help() -> dict[str, str]:
    """One-line description of each field, read from the comments above (for --help and docs)."""
    import inspect
    import re

    src = inspect.getsource(TrainConfig)
    out: dict[str, str] = {}
    for match in re.finditer(r"^\s{4}(\w+): [^=]+= .*?#\s*(.*)$", src, re.M):
        out[match.group(1)] = match.group(2).strip()
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON config file; errors name the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing file with --config or omit the flag") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of key: value pairs, not {type(values).__name__}")
    return values


def build_config(file_path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the config file (if any), then command-line overrides; validated once."""
    values: dict[str, Any] = {}
    source = "command line"
    if file_path is not None:
        values.update(load_config_file(file_path))
        source = str(file_path)
        cfg_from_file = TrainConfig.from_dict(dict(values), source=source)  # names the file on errors
        values = cfg_from_file.to_dict()
    values.update(overrides)
    return TrainConfig.from_dict(values, source=source if not overrides else f"{source} + command line")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        expected = hints[f.name]
        args = typing.get_args(expected)
        optional = type(None) in args and (typing.get_origin(expected) in (typing.Union, types.UnionType))
        base = next((a for a in args if a is not type(None)), expected) if optional else expected
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{f.name} must not be null; expected a {_type_name(base)}")
        ok = False
        if base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                if not math.isfinite(value):
                    raise ConfigError(f"{f.name}={value} must be a finite number")
                setattr(cfg, f.name, value)
        elif base is str:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(
                f"{f.name}={value!r} has the wrong type: expected {_type_name(base)}"
                + (" or null" if optional else "") + f", got {type(value).__name__}"
            )


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be a positive number")


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must not be negative")


# Settings that do not change the trajectory of training: they may differ between a run and its
# resumption. Everything else must match, or resuming would silently mix two different runs.
RESUME_FREE_KEYS = frozenset({
    "device", "max_retries", "cooldown_min", "cooldown_max", "checkpoint_every_steps",
    "checkpoint_every_seconds", "eval_batch_size", "num_threads", "output_dir", "cache_dir",
    "patience", "min_delta", "keep_best", "sync_every", "compile", "data", "val_data", "base_model",
    "oom_probe_steps",
})


def resume_mismatches(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Human-readable list of settings that differ in a way that forbids resuming."""
    now = current.to_dict()
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUME_FREE_KEYS:
            continue
        if saved.get(key) != now.get(key):
            out.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {now.get(key)!r}")
    return out

