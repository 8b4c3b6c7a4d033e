"""One typed configuration for a training run.

Every field of ``TrainConfig`` carries its help text, whether it has a command-line flag, and
whether it may change when a run is resumed (``dataclasses.field(metadata=...)``): the parser,
``--help`` and the resume check are derived from it. Values are validated once, in
``__post_init__``, with messages that name the field, the bad value and what would be right. The
default config ships inside the package (``default_config.json``, equal to the dataclass defaults;
``configs/finetune.json`` in a checkout is the copy users edit). The config travels as plain data
(``asdict``) in every checkpoint and in ``config_finetuned.json``, never as a pickled object.
Relative paths in a config (data, output folder, base model, cache) are relative to the current folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .data.imageprep import DEFAULT_MAX_PIXELS
from .model.cnn import MAX_WIDTH
from .files.rundir import LAST

DEFAULT_CONFIG_PATH = Path("configs/finetune.json")  # a checkout's editable copy, used when present
PACKAGED_CONFIG_PATH = Path(__file__).with_name("default_config.json")
DEFAULT_OUTPUT_DIR = "models/cnn_modelo_v2_finetuned"
DEFAULT_BASE_MODEL = "models/cnn_modelo_v2/best_model.pth"
# The MNIST base model shipped in the package (scripts/make_base_model.py): the default base when the
# user has no DEFAULT_BASE_MODEL of their own.
PACKAGED_BASE_MODEL = Path(__file__).parent / "model" / "base_models" / "cnn_v2_mnist5k.pth"
MAX_SEED = 2**63 - 1  # a seed fits a signed 64-bit integer wherever it travels (torch, NumPy, JSON readers)
MAX_THREADS = 4096  # torch takes a C int; more threads than this is a typo
# Elastic distortion on 28x28 images: alpha beyond 100 pixels moves strokes across the whole image; sigma
# below 0.5 pixels leaves per-pixel noise, above 14 (half the side) a near-uniform shift, and sizes the kernel.
MAX_ELASTIC, MIN_ELASTIC_SIGMA, MAX_ELASTIC_SIGMA = 100.0, 0.5, 14.0

CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda"),
    "polarity": ("auto", "invert", "keep"),
    "balance": ("none", "weighted_loss", "sampler"),
    "optimizer": ("adamw", "sgd"),
    "scheduler": ("onecycle", "cosine", "constant"),
    "monitor": ("val_acc", "val_loss"),
    "model_selection": ("auto", "best", "last"),
    "tta": ("auto", "on", "off"),
    "ema_bn": ("recompute", "average"),
    "bn_stats": ("auto", "training", "clean"),
    "set_aside": ("auto", "on", "off"),
    "amp": ("auto", "off", "bf16"),
    "channels_last": ("auto", "on", "off"),
    "logger": ("none", "tensorboard"),
}

FIXED, FREE = "fixed", "free"  # may the value change when a run is resumed?


def _f(default: Any, help: str, *, flag: bool | str = False, resume: str = FIXED) -> Any:
    """A config field with its metadata: help text, command-line flag (True: ``--field-name``), resume rule."""
    return field(default=default, metadata={"help": help, "flag": flag, "resume": resume})


@dataclass
class TrainConfig:
    """Every hyper-parameter and run setting of one training run."""

    # --- data -------------------------------------------------------------------------------
    data: str | None = _f(None, "data source: a folder with raw/ and/or processed/ class folders, a plain <class>/ tree, an IDX "
                                "images file, a CSV of pixels, a .npz (x_train/y_train) or a folder with labels.csv "
                                "(default: data/ when it exists, else the built-in MNIST sample)", flag=True, resume=FREE)
    val_data: str | None = _f(None, "explicit validation source instead of a split of --data", flag=True, resume=FREE)
    test_data: str | None = _f(None, "a test source evaluated with the best model at the end (e.g. t10k-images-idx3-ubyte.gz, or mnist.npz: its x_test); "
                                     "never used for training or model selection", flag=True, resume=FREE)
    val_fraction: float = _f(0.1, "share of each class held out for validation", flag=True)
    calibration_fraction: float = _f(0.3, "share of each class's validation images kept apart from the choice of the "
                                          "best epoch and used only to fit the confidence's temperature (a split that "
                                          "also picked the epoch flatters the model; 0: fit it on the whole split)")
    polarity: str = _f("auto", "raw images: auto-detect from the border, invert, or keep", flag=True)
    balance: str = _f("none", "class imbalance: none, weighted_loss or sampler", flag=True)
    cache_dir: str | None = _f(None, "preprocessed-data cache; None: $CNN_FINETUNE_CACHE, else $XDG_CACHE_HOME/cnn_finetune", resume=FREE)
    cache: bool = _f(True, "read and write the preprocessed-data cache", flag="--no-cache", resume=FREE)
    # FREE: a limit that changes which images are used changes the data fingerprint, which resume checks.
    max_image_pixels: int = _f(DEFAULT_MAX_PIXELS, "images with more pixels (width x height) are skipped before they are "
                                                   "decoded and listed in the data report (decompression bombs)", resume=FREE)
    # --- model ------------------------------------------------------------------------------
    arch: str = _f("cnn_v2", "architecture name stored with the weights")
    width: int = _f(24, "channels of the first block, 1 to 512; later blocks use 2x and 4x", flag=True)
    bn_ghost_size: int = _f(32, "batch-norm statistics per group of this many samples (0: whole batch)")
    base_model: str | None = _f(DEFAULT_BASE_MODEL, f"weights to fine-tune from ('none': from scratch; the default {DEFAULT_BASE_MODEL} "
                                                    "is used when it exists)", flag=True, resume=FREE)
    freeze_features_epochs: int | None = _f(None, "epochs during which only the classifier head trains (default: chosen "
                                                  "for fine-tuning when a base model is used, 0 from scratch)", flag=True)
    feature_lr_scale: float | None = _f(None, "learning-rate factor of the feature layers (default: chosen for fine-tuning "
                                              "when a base model is used, 1.0 from scratch)", flag=True)
    # --- optimisation -----------------------------------------------------------------------
    epochs: int | str = _f("auto", "training epochs, or auto: enough optimizer updates for the data (at least "
                                   "budget_updates, within budget_min_epochs and budget_max_epochs)", flag=True, resume=FREE)
    budget_updates: int = _f(800, "epochs auto: at least this many optimizer updates", resume=FREE)
    budget_min_epochs: int = _f(15, "epochs auto: at least this many epochs", resume=FREE)
    budget_max_epochs: int = _f(150, "epochs auto: at most this many epochs", resume=FREE)
    budget_max_epochs_finetune: int = _f(60, "epochs auto: at most this many epochs when fine-tuning from a base model "
                                             "(it starts from features that already work)", resume=FREE)
    budget_max_epochs_new_classes: int = _f(90, "epochs auto: at most this many epochs when fine-tuning classes new to "
                                                "the base model (its features separate them under 90%: letters, symbols, "
                                                "other scripts), whose feature layers must learn new shapes", resume=FREE)
    batch_size: int = _f(128, "samples per optimizer step (the effective batch, also under OOM)", flag=True)
    lr: float = _f(3e-3, "peak learning rate", flag=True)
    weight_decay: float = _f(5e-4, "decoupled weight decay (not applied to norms and biases)")
    optimizer: str = _f("adamw", "adamw or sgd (Nesterov momentum)")
    momentum: float = _f(0.9, "SGD momentum / Adam beta1")
    scheduler: str = _f("onecycle", "onecycle (warm-up then cosine), cosine or constant")
    warmup_fraction: float = _f(0.25, "share of the steps spent warming up (onecycle)")
    label_smoothing: float = _f(0.1, "cross-entropy label smoothing")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: off)")
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights with this decay (warmed up: "
                               "min(decay, (1+t)/(ema_warmup+t)) after t updates), validate and keep it as the model (0: off)")
    ema_warmup: float = _f(10.0, "warm-up of the average's decay: it covers about the last 1/(ema_warmup-1) of the updates")
    ema_bn: str = _f("recompute", "batch-norm statistics of the averaged weights: recompute (from the training images, "
                                  "before each validation) or average (like the weights)")
    bn_stats: str = _f("auto", "batch-norm statistics of the validated and kept model: training (the running averages of "
                               "the augmented training batches), clean (recomputed from the unaugmented training images "
                               "before each validation), or auto: clean when fine-tuning classes new to the base model "
                               "(their features' nearest-class-mean accuracy under 90%), training otherwise; with "
                               "ema_decay on, ema_bn decides")
    set_aside: str = _f("auto", "half-way through the run, the 5% of the training images with the lowest area under the "
                                "margin (likely wrong labels, marked in label_review.csv) stop counting in the loss: on, "
                                "off, or auto: on when fine-tuning classes new to the base model (their features' "
                                "nearest-class-mean accuracy under 90%), off otherwise")
    # --- augmentation (batched, on the training device) -------------------------------------
    aug_rotation: float = _f(15.0, "maximum rotation, degrees")
    aug_translate: float = _f(0.12, "maximum translation, fraction of the image side")
    aug_scale: float = _f(0.15, "maximum relative scale change (0.15: 0.85x to 1.15x)")
    aug_noise: float = _f(0.05, "standard deviation of Gaussian pixel noise (pixels in [0, 1])")
    aug_elastic: float = _f(0.0, "elastic distortion (Simard et al. 2003): alpha, the scale of the smoothed random "
                                 "displacement field in pixels (0: off; Simard used 34)")
    aug_elastic_sigma: float = _f(4.0, "elastic distortion: standard deviation of the field's Gaussian smoothing, pixels")
    # --- early stopping and checkpoints -----------------------------------------------------
    patience: int | None = _f(None, "epochs without improvement before early stopping (0 turns it off; default: 8, "
                                    "scaled with runs longer than 15 epochs: 8 x epochs / 15)", flag=True, resume=FREE)
    min_delta: float = _f(0.0, "smallest change of the monitored metric that counts as improvement", flag=True, resume=FREE)
    monitor: str = _f("val_acc", "metric for early stopping and the best checkpoints")
    model_selection: str = _f("auto", "which weights become the best model file at the end: auto (the final epoch's, unless the "
                                      "best validation epoch gets significantly more validation images right: an exact "
                                      "McNemar test at 5%), best (the best validation epoch) or last", resume=FREE)
    tta: str = _f("auto", "test-time augmentation: on: the best model file names 7 views (the image, shifted by a pixel "
                          "each way, turned by +-8 degrees) whose probabilities evaluation, prediction, calibration and "
                          "export average; off: the image alone; auto: on when fine-tuning classes new to the base model "
                          "(their features' nearest-class-mean accuracy under 90%), off otherwise", resume=FREE)
    keep_best: int = _f(3, "best epochs kept as separate files (at least 1: the best)", flag=True, resume=FREE)
    checkpoint_every_steps: int = _f(0, f"also save {LAST} every N steps (0: off)", flag=True, resume=FREE)
    checkpoint_every_seconds: float = _f(120.0, "also save it after this many seconds (0: off)", flag=True, resume=FREE)
    resume: bool = _f(True, "continue the run in the output folder; off: start afresh, an earlier run is moved aside, "
                            "never deleted", flag="--no-resume", resume=FREE)
    # --- robustness -------------------------------------------------------------------------
    max_retries: int = _f(5, "recovery attempts after failures in training", flag=True, resume=FREE)
    cooldown_min: float = _f(5.0, "cool-down before a retry: random between min and max seconds, doubled per consecutive failure",
                             resume=FREE)
    cooldown_max: float = _f(10.0, "upper end of the cool-down", resume=FREE)
    nan_max_consecutive: int = _f(3, "skipped non-finite steps in a row before a rollback")
    nan_lr_factor: float = _f(0.5, "learning-rate factor applied at each NaN rollback")
    nan_max_rollbacks: int = _f(3, "rollbacks before giving up")
    oom_probe_steps: int = _f(200, "clean steps before trying fewer micro-batches after an OOM", resume=FREE)
    eval_batch_size: int = _f(1000, "validation batch size (halved on out-of-memory)", resume=FREE)
    sync_every: int = _f(0, "host-device syncs for NaN checks/logging every N steps (0: auto)", resume=FREE)
    # --- runtime ----------------------------------------------------------------------------
    seed: int = _f(42, "random seed, 0 to 2**63-1: every random draw is a function of (seed, epoch, step)", flag=True)
    device: str = _f("auto", "auto picks CUDA when present; cpu; cuda (or cuda:N through --set)", flag=True, resume=FREE)
    amp: str = _f("auto", "mixed precision: auto (bf16 on CUDA), off, bf16 (bf16 needs no loss scaling)")
    channels_last: str = _f("auto", "memory format: auto (on for CUDA), on, off")
    compile: bool = _f(False, "torch.compile the model (start-up cost; pays off on long GPU runs)", flag=True, resume=FREE)
    num_threads: int = _f(0, "CPU threads for torch, up to 4096 (0: torch's default)", flag=True, resume=FREE)
    output_dir: str = _f(DEFAULT_OUTPUT_DIR, "where the artifacts go", flag=True, resume=FREE)
    verbose: bool = _f(False, "a per-step progress bar", flag=True, resume=FREE)
    logger: str = _f("none", "metrics for tools besides train.log and metrics.csv: none, or tensorboard (per-step loss "
                             "and lr, per-epoch metrics, in <output-dir>/tensorboard; needs tensorboardX: pip install 'cnn-finetune[tensorboard]')",
                     flag=True, resume=FREE)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_choices(self)
        _positive(self, "batch_size", "eval_batch_size", "width", "keep_best", "max_image_pixels", "budget_updates",
                  "budget_min_epochs", "budget_max_epochs", "budget_max_epochs_finetune", "budget_max_epochs_new_classes")
        _non_negative(
            self, "lr", "weight_decay", "label_smoothing", "grad_clip", "aug_rotation",
            "aug_translate", "aug_scale", "aug_noise", "aug_elastic", "min_delta", "checkpoint_every_steps",
            "checkpoint_every_seconds", "max_retries", "cooldown_min", "cooldown_max",
            "freeze_features_epochs", "bn_ghost_size", "oom_probe_steps", "sync_every", "patience",
            "num_threads", "nan_max_rollbacks",
        )
        for problem in _range_problems(self) or _memory_problems(self):
            raise ConfigError(problem)

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


def _range_problems(cfg: TrainConfig) -> list[str]:
    """Cross-field and range checks, each a message that says what would be right."""
    checks = [
        (cfg.lr == 0, "lr=0 would never change the weights; use a positive value such as 3e-3"),
        (not 0.0 < cfg.val_fraction < 1.0 and cfg.val_data is None,
         f"val_fraction={cfg.val_fraction} must be between 0 and 1 (e.g. 0.1 for 10%), or give an explicit validation folder with --val-data"),
        (not 0.0 <= cfg.label_smoothing < 1.0, f"label_smoothing={cfg.label_smoothing} must be in [0, 1), e.g. 0.1"),
        (not 0.0 <= cfg.warmup_fraction < 1.0, f"warmup_fraction={cfg.warmup_fraction} must be in [0, 1), e.g. 0.25"),
        (not 0.0 <= cfg.momentum < 1.0, f"momentum={cfg.momentum} must be in [0, 1), e.g. 0.9"),
        (not 0.0 <= cfg.calibration_fraction < 1.0,
         f"calibration_fraction={cfg.calibration_fraction} must be in [0, 1), e.g. 0.3 (0: calibrate on the whole validation split)"),
        (not 0.0 <= cfg.ema_decay < 1.0, f"ema_decay={cfg.ema_decay} must be in [0, 1), e.g. 0.999 (0: off)"),
        (not cfg.ema_warmup > 1.0, f"ema_warmup={cfg.ema_warmup} must be above 1, e.g. 10"),
        (cfg.aug_translate >= 0.5, f"aug_translate={cfg.aug_translate} would move digits out of the image; use < 0.5 (e.g. 0.1)"),
        (cfg.aug_scale >= 1.0, f"aug_scale={cfg.aug_scale} must be < 1 (0.1 means 0.9x to 1.1x)"),
        (cfg.aug_elastic > MAX_ELASTIC, f"aug_elastic={cfg.aug_elastic} pixels would tear the images apart; use 0 (off) "
                                        f"to {MAX_ELASTIC}, e.g. 34 as in Simard et al. (2003)"),
        (not MIN_ELASTIC_SIGMA <= cfg.aug_elastic_sigma <= MAX_ELASTIC_SIGMA,
         f"aug_elastic_sigma={cfg.aug_elastic_sigma} pixels is out of range; use {MIN_ELASTIC_SIGMA} to {MAX_ELASTIC_SIGMA} "
         "(4 as in Simard et al. 2003; small values give a noisy field, large ones a plain shift)"),
        (cfg.aug_rotation > 180, f"aug_rotation={cfg.aug_rotation} degrees is more than half a turn; use 0-180"),
        (cfg.cooldown_max < cfg.cooldown_min, f"cooldown_max={cfg.cooldown_max} is below cooldown_min={cfg.cooldown_min}; "
                                              "set cooldown_max >= cooldown_min (or --cooldown SECONDS for a fixed value)"),
        (cfg.nan_max_consecutive < 1, f"nan_max_consecutive={cfg.nan_max_consecutive} must be at least 1"),
        (not 0.0 < cfg.nan_lr_factor < 1.0, f"nan_lr_factor={cfg.nan_lr_factor} must be in (0, 1), e.g. 0.5"),
        (cfg.feature_lr_scale is not None and cfg.feature_lr_scale < 0,
         f"feature_lr_scale={cfg.feature_lr_scale} must be >= 0 (1.0: same as the head)"),
        (isinstance(cfg.epochs, str) and cfg.epochs != "auto",
         f"epochs={cfg.epochs!r} has the wrong type: expected int or \"auto\""),
        (isinstance(cfg.epochs, int) and cfg.epochs <= 0, f"epochs={cfg.epochs} must be a positive number (or \"auto\")"),
        (cfg.budget_max_epochs < cfg.budget_min_epochs,
         f"budget_max_epochs={cfg.budget_max_epochs} is below budget_min_epochs={cfg.budget_min_epochs}"),
        (cfg.budget_max_epochs_finetune < cfg.budget_min_epochs,
         f"budget_max_epochs_finetune={cfg.budget_max_epochs_finetune} is below budget_min_epochs={cfg.budget_min_epochs}"),
        (cfg.budget_max_epochs_new_classes < cfg.budget_min_epochs,
         f"budget_max_epochs_new_classes={cfg.budget_max_epochs_new_classes} is below budget_min_epochs={cfg.budget_min_epochs}"),
        (cfg.arch != "cnn_v2", f"arch={cfg.arch!r} is not known; the only architecture is 'cnn_v2'"),
        (not 0 <= cfg.seed <= MAX_SEED, f"seed={cfg.seed} is out of range; use a whole number from 0 to 2**63-1 ({MAX_SEED})"),
        (cfg.width > MAX_WIDTH, f"width={cfg.width} is out of range; use 1 to {MAX_WIDTH} channels (the default is 24)"),
        (cfg.num_threads > MAX_THREADS, f"num_threads={cfg.num_threads} is out of range; use 0 (torch's default) to {MAX_THREADS}"),
    ]
    return [message for failed, message in checks if failed]


def training_memory_bytes(width: int, batch_size: int, eval_batch_size: int, num_classes: int = 10) -> int:
    """About how many bytes training needs: weights, gradients and AdamW's two moments (16 bytes per
    parameter), plus the activations of one training batch or one evaluation batch, whichever is larger.

    Measured on the CPU: about 32 KiB per sample and per channel of ``width`` in training (forward
    activations kept for the backward pass, and its gradients), a quarter of that in evaluation.
    """
    params = 270 * width * width + 35 * width + (4 * width + 1) * num_classes
    return 16 * params + max(32768 * width * batch_size, 8192 * width * eval_batch_size)


def _memory_problems(cfg: TrainConfig) -> list[str]:
    """A model and batch that cannot fit in this machine's memory: refused before anything is allocated."""
    from .runtime import physical_memory

    need, have = training_memory_bytes(cfg.width, cfg.batch_size, cfg.eval_batch_size), physical_memory()
    if need <= have:
        return []
    return [f"width={cfg.width} with batch_size={cfg.batch_size} (eval_batch_size={cfg.eval_batch_size}) needs about "
            f"{need / 1e9:.3g} GB to train (weights, optimizer state and the activations of one batch), more than this "
            f"machine's {have / 1e9:.3g} GB of memory; lower batch_size, eval_batch_size or width"]


def field_help() -> dict[str, str]:
    """One-line description of each field (for --help and the docs), from the field metadata."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def resume_free_keys() -> frozenset[str]:
    """Settings that do not change the trajectory of training: they may differ on resume."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] == FREE)


MAX_CONFIG_BYTES = 1 << 20  # the full default config is about 2 KB


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON config file; errors name the file and the problem."""
    try:
        # A FIFO or device (``--config /dev/zero``) would block or fill the memory: only a regular file of a sane size.
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {path} is not a regular file (a pipe, device or folder); pass a JSON file "
                              "with --config", path=str(path))
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {info.st_size:,} bytes, more than a config can be "
                              f"({MAX_CONFIG_BYTES:,}); pass the JSON config file with --config", path=str(path))
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        column = err.start - (err.object.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(f"config file {path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at line {line}, column "
                          f"{column} cannot be decoded; save the file as UTF-8", path=str(path)) from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing file with --config or omit the flag", path=str(path)) from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror}", path=str(path)) from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", path=str(path)) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of key: value pairs, not {type(values).__name__}", path=str(path))
    return values


def packaged_base_model() -> Path | None:
    """The base model shipped in the package, when the installation has it."""
    return PACKAGED_BASE_MODEL if PACKAGED_BASE_MODEL.is_file() else None


def default_config_file() -> Path:
    """``configs/finetune.json`` of the current folder when it exists (a checkout), else the packaged default."""
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else PACKAGED_CONFIG_PATH


def build_config(file_path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the config file (if any), then command-line overrides; validated once."""
    values: dict[str, Any] = {}
    source = "command line"
    if file_path is not None:
        values.update(load_config_file(file_path))
        source = "defaults" if file_path == PACKAGED_CONFIG_PATH else str(file_path)
        cfg_from_file = TrainConfig.from_dict(dict(values), source=source)  # names the file on errors
        values = cfg_from_file.to_dict()
    values.update(overrides)
    return TrainConfig.from_dict(values, source=source if not overrides else f"{source} + command line")


# What a run did before the setting existed, where that differs from today's default.
LEGACY_DEFAULTS: dict[str, Any] = {"calibration_fraction": 0.0, "tta": "off", "bn_stats": "training", "set_aside": "off"}


def resume_mismatches(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Human-readable list of settings that differ in a way that forbids resuming."""
    now = current.to_dict()
    free = resume_free_keys()
    # A setting added after the checkpoint was written (e.g. aug_elastic) had its default's effect then,
    # or, where today's default differs from what runs did before the setting existed, that behaviour.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | LEGACY_DEFAULTS
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in free:
            continue
        if saved.get(key, defaults.get(key)) != now.get(key):
            out.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {now.get(key)!r}")
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_choices(cfg: TrainConfig) -> None:
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if name == "device" and (value.startswith("cuda:") and value[5:].isdigit()):
            continue
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(allowed)}"
                              + (" (or cuda:N)" if name == "device" else ""))


def _matches(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        expected = hints[f.name]
        union = typing.get_origin(expected) in (typing.Union, types.UnionType)
        kinds = [a for a in typing.get_args(expected) if a is not type(None)] if union else [expected]
        optional = union and type(None) in typing.get_args(expected)
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{f.name} must not be null; expected a {_type_name(kinds[0])}")
        kind = next((k for k in kinds if _matches(value, k)), None)
        if kind is None:
            raise ConfigError(
                f"{f.name}={value!r} has the wrong type: expected {' or '.join(_type_name(k) for k in kinds)}"
                + (" or null" if optional else "") + f", got {type(value).__name__}"
            )
        if kind is float:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond float range, e.g. 10**400
                raise ConfigError(f"{f.name} is an integer of {len(str(value))} digits, too large for a number; "
                                  "expected a finite number") from None
            if not math.isfinite(value):
                raise ConfigError(f"{f.name}={value} must be a finite number")
            setattr(cfg, f.name, value)
        elif kind is str:
            _check_text(f.name, value)


def _check_text(name: str, value: str) -> None:
    """Text values end up as file names or in files: no NUL, nothing that cannot be encoded for the file system."""
    try:
        os.fsencode(value)
        unusable = "\0" in value
    except UnicodeEncodeError:  # a lone surrogate that no file name bytes produce (e.g. "\ud800" from JSON)
        unusable = True
    if unusable:
        raise ConfigError(f"{name}={value!r} contains characters that no file name can hold (NUL or a lone surrogate); "
                          "remove them")


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be a positive number")


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must not be negative")
