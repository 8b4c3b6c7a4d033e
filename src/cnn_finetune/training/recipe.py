"""The parts of the default recipe that depend on the data and on the starting point, resolved once per run.

A config may leave four settings to the program: ``epochs`` ("auto"), ``patience``,
``feature_lr_scale`` and ``freeze_features_epochs`` (None). ``resolve`` turns them into numbers and
says why, from the size of the training set and from whether training starts from a base model:

* epochs "auto": the training length is a budget of optimizer updates, not a number of epochs tuned
  on one dataset: at least ``budget_updates`` updates, turned into whole epochs, between
  ``budget_min_epochs`` and ``budget_max_epochs`` (``budget_max_epochs_finetune`` from a base model).
  A 1,700-image set gets many more epochs than the 4,500-image built-in sample. ``--epochs N`` always
  means exactly N epochs.
* patience: 8 epochs (the guide's default) for runs up to 15 epochs, scaled with longer runs, so that
  a long run on small data does not stop early by chance.
* fine-tuning: with a base model, the feature layers learn at a fraction of the head's learning rate.

The numbers are chosen with ``bench/fewshot.py`` on several datasets and sizes (docs/PERFORMANCE.md).
The resolved config is what the trainer uses and what checkpoints and model files record.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import TrainConfig

BASE_PATIENCE = 8  # the training guide's default
PATIENCE_REFERENCE_EPOCHS = 15  # ... for a run of this length; longer runs get proportionally more
FINETUNE_FEATURE_LR_SCALE = 0.3  # feature layers' learning rate relative to the head's, with a base model
FINETUNE_FREEZE_EPOCHS = 0  # epochs on the head alone first, with a base model


@dataclass
class Resolved:
    """A config with every automatic setting turned into a number, and the reason of each choice."""

    config: TrainConfig
    fine_tuning: bool
    notes: dict[str, str] = field(default_factory=dict)


def auto_epochs(cfg: TrainConfig, steps_per_epoch: int, fine_tuning: bool = False) -> tuple[int, str]:
    """Epochs for ``epochs="auto"``: at least ``budget_updates`` updates, within the epoch floor and the
    ceiling (a lower one when fine-tuning: past it, tiny sets gained nothing in the few-shot benchmark)."""
    ceiling = cfg.budget_max_epochs_finetune if fine_tuning else cfg.budget_max_epochs
    wanted = math.ceil(cfg.budget_updates / max(1, steps_per_epoch))
    epochs = min(ceiling, max(cfg.budget_min_epochs, wanted))
    bound = " (the floor)" if epochs > wanted else (" (the ceiling)" if epochs < wanted else "")
    which = " when fine-tuning" if fine_tuning else ""
    return epochs, (f"auto: {epochs} epochs{bound} of {steps_per_epoch} steps = {epochs * steps_per_epoch} optimizer updates "
                    f"(at least {cfg.budget_updates}, between {cfg.budget_min_epochs} and {ceiling} epochs{which})")


def resolve(cfg: TrainConfig, steps_per_epoch: int, fine_tuning: bool) -> Resolved:
    """Turn the automatic settings of ``cfg`` into numbers for a run with ``steps_per_epoch`` steps."""
    notes: dict[str, str] = {}
    values: dict[str, object] = {}
    if cfg.epochs == "auto":
        values["epochs"], notes["epochs"] = auto_epochs(cfg, steps_per_epoch, fine_tuning)
    epochs = int(values.get("epochs", cfg.epochs))  # type: ignore[arg-type]
    if cfg.patience is None:
        values["patience"] = max(BASE_PATIENCE, math.ceil(BASE_PATIENCE * epochs / PATIENCE_REFERENCE_EPOCHS))
        notes["patience"] = f"auto: {values['patience']} epochs ({BASE_PATIENCE} for runs of up to " \
                            f"{PATIENCE_REFERENCE_EPOCHS} epochs, in proportion for longer ones)"
    if cfg.feature_lr_scale is None:
        values["feature_lr_scale"] = FINETUNE_FEATURE_LR_SCALE if fine_tuning else 1.0
        notes["feature_lr_scale"] = f"auto: {values['feature_lr_scale']} (" + \
            ("fine-tuning from a base model: the feature layers learn slower than the new head)" if fine_tuning
             else "training from scratch)")
    if cfg.freeze_features_epochs is None:
        values["freeze_features_epochs"] = FINETUNE_FREEZE_EPOCHS if fine_tuning else 0
    return Resolved(dataclasses.replace(cfg, **values), fine_tuning, notes)


# --- the learning-rate schedule of a run that was extended -------------------------------------------

EXTEND_LR_SCALE = 0.5  # peak learning rate of an extension, relative to the run's lr
EXTEND_WARMUP_FRACTION = 0.1  # share of the added steps spent warming up


def segment_lr(step: int, segments: list[tuple[int, int]], cfg: TrainConfig) -> float:
    """Learning rate of a global step in a run made of segments ``[(start, end), ...]`` of global steps.

    The first segment is the run as planned (``cfg.scheduler`` over its steps); each extension adds a
    segment of its own, a short warm-up then a decay to (almost) zero over the added steps. The latest
    segment that has started owns the step, so an early-stopped run extended from where it stopped
    follows the new segment. A pure function of the step: resuming needs no scheduler state.
    """
    from .mechanisms import lr_at

    index = max(i for i, (start, _) in enumerate(segments) if start <= step or i == 0)
    start, end = segments[index]
    if index == 0:
        return lr_at(step, end, cfg.lr, cfg.scheduler, cfg.warmup_fraction)
    return lr_at(step - start, end - start, cfg.lr * EXTEND_LR_SCALE, "onecycle", EXTEND_WARMUP_FRACTION)
