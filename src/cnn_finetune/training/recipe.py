"""The parts of the default recipe that depend on the data and on the starting point, resolved once per run.

A config may leave seven settings to the program: ``epochs``, ``tta``, ``bn_stats`` and ``set_aside`` ("auto"),
``patience``, ``feature_lr_scale`` and ``freeze_features_epochs`` (None). ``resolve`` turns them into numbers and
says why, from the size of the training set and from whether training starts from a base model:

* epochs "auto": the training length is a budget of optimizer updates, not a number of epochs tuned
  on one dataset: at least ``budget_updates`` updates, turned into whole epochs, between
  ``budget_min_epochs`` and ``budget_max_epochs`` (``budget_max_epochs_finetune`` from a base model,
  ``budget_max_epochs_new_classes`` from a base model whose features do not yet separate the classes).
  A 1,700-image set gets many more epochs than the 4,500-image built-in sample. ``--epochs N`` always
  means exactly N epochs.
* patience: 8 epochs (the guide's default) for runs up to 15 epochs, scaled with longer runs, so that
  a long run on small data does not stop early by chance.
* fine-tuning: with a base model, the feature layers learn at a fraction of the head's learning rate,
  chosen from how well the base model's features already separate the user's classes
  (``feature_separability``) and how many images each class has. Classes new to the base model
  (separability under 90%: letters, symbols, other scripts) get 0.7 with few images per class and 1.0
  with at least ``ADAPT_MIN_PER_CLASS``; classes the base model already separates (digits) get 0.3, or
  train the head alone (``freeze_features_epochs``: the whole run) with few images each. The
  start-up line says which and why. A resumed run keeps the factor and the freezing its start chose,
  whatever the default has become since.
* test-time views (``tta``), clean batch-norm statistics (``bn_stats``) and setting the likely wrong
  labels aside half-way (``set_aside``): on for fine-tuning classes new to the base model, where they
  gained in the few-shot benchmark, off elsewhere. A resumed run keeps its start's choice.

The numbers are chosen with ``bench/fewshot.py`` on several datasets and sizes (docs/PERFORMANCE.md).
The resolved config is what the trainer uses and what checkpoints and model files record.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..data.augment import normalize, to_unit
from .averaging import BN_IMAGES

BASE_PATIENCE = 8  # the training guide's default
PATIENCE_REFERENCE_EPOCHS = 15  # ... for a run of this length; longer runs get proportionally more
FINETUNE_FEATURE_LR_SCALE = 0.3  # feature layers' learning rate relative to the head's, with a base model
FINETUNE_FREEZE_EPOCHS = 0  # epochs on the head alone first, with a base model
# Below this separability (leave-one-out nearest-class-mean accuracy of the base model's features on
# the training split) the classes are new to the base model: MNIST digits measure 0.97-0.99, digits
# and turned digits 0.82, Kazakh Cyrillic letters 0.75-0.81. Said at start-up; it decides the factor, the
# fine-tuning ceiling of the automatic length and the test-time views.
SEPARABLE_THRESHOLD = 0.9
# Classes new to the base model AND this many training images per class: the feature layers learn at
# the head's rate (1.0): with 54 and 90 per letter it won by 0.9 and 1.1 points (3 seeds; PERFORMANCE.md 7).
ADAPT_MIN_PER_CLASS = 50
ADAPT_FEATURE_LR_SCALE = 1.0
# Classes new to the base model with fewer images each: 0.7 of the head's rate. On real letters at 10 and
# 30 per letter (as labelled, and with the source's wrong labels corrected) 1.0 beat 0.3 by 0.3-1.05 points
# on all four sets, but lost a whole seed (82.8%) on the turned digits; 0.7 is within 0.15-0.31 of 1.0 on
# the letters and level with 0.3 on the turned digits (3 seeds each, side by side; PERFORMANCE.md 7).
NEW_CLASSES_FEATURE_LR_SCALE = 0.7
# Classes the base model's features already separate this well (digits: 0.967 at 10 per class, 0.98-0.99
# at 30 and 100), with at most FROZEN_MAX_PER_CLASS training images per class (the largest size measured:
# 90): only the head trains, the feature layers keep the base model's weights and batch-norm statistics.
# Frozen features were the best setting on MNIST 10/30/100 per class (3 seeds) and the cheapest (no
# backward pass through the features: 0.63-0.71x the time of fine-tuning them at 0.3, side by side).
FROZEN_MIN_SEPARABILITY = 0.95
FROZEN_MAX_PER_CLASS = 100
FREEZE_WHOLE_RUN = 100_000  # epochs: more than any run has, so an extended run stays frozen too
PROBE_MAX_IMAGES = 2048  # the separability probe looks at most at this many training images (stratified)


@dataclass
class Resolved:
    """A config with every automatic setting turned into a number, and the reason of each choice."""

    config: TrainConfig
    fine_tuning: bool
    notes: dict[str, str] = field(default_factory=dict)


def auto_epochs(cfg: TrainConfig, steps_per_epoch: int, fine_tuning: bool = False,
                new_classes: bool = False) -> tuple[int, str]:
    """Epochs for ``epochs="auto"``: at least ``budget_updates`` updates, within the epoch floor and the
    ceiling: a lower one when fine-tuning (past it, tiny sets of digits gained nothing in the few-shot
    benchmark), between the two when fine-tuning classes new to the base model (``new_classes``: on real
    letters at 10 and 30 per letter 1.5x the fine-tuning ceiling gained 0.1-0.4 points, 3 seeds)."""
    if not fine_tuning:
        ceiling, which = cfg.budget_max_epochs, ""
    elif new_classes:
        ceiling, which = cfg.budget_max_epochs_new_classes, " when fine-tuning classes new to the base model"
    else:
        ceiling, which = cfg.budget_max_epochs_finetune, " when fine-tuning"
    wanted = math.ceil(cfg.budget_updates / max(1, steps_per_epoch))
    epochs = min(ceiling, max(cfg.budget_min_epochs, wanted))
    bound = " (the floor)" if epochs > wanted else (" (the ceiling)" if epochs < wanted else "")
    return epochs, (f"auto: {epochs} epochs{bound} of {steps_per_epoch} steps = {epochs * steps_per_epoch} optimizer updates "
                    f"(at least {cfg.budget_updates}, between {cfg.budget_min_epochs} and {ceiling} epochs{which})")


def _separates(separability: float) -> str:
    """How the start-up notes say what the separability probe measured."""
    return f"the base model's features separate the training classes with {100 * separability:.1f}% nearest-class-mean accuracy"


def auto_feature_lr_scale(separability: float | None, per_class: float | None = None) -> tuple[float, str]:
    """``feature_lr_scale`` when fine-tuning, and why, from ``separability`` (``feature_separability`` of
    the base model on the training split, None: not measured) and ``per_class`` (training images per
    class, None: not known).

    0.3 for classes the base model already separates (digits: in the 3-seed sweeps of issue 18,
    docs/PERFORMANCE.md section 7, it was within 0.3 points of the best factor on MNIST 10 to 100 per
    class, where 1.0 lost 0.3 to 1.1), and when nothing was measured. Classes new to the base model get
    ``NEW_CLASSES_FEATURE_LR_SCALE`` (0.7), or ``ADAPT_FEATURE_LR_SCALE`` (1.0) with ``ADAPT_MIN_PER_CLASS``
    images or more each: on real letters 0.3 was 0.2-0.9 points behind 0.7 at 10 and 30 per letter, and
    1.1 behind 1.0 at 100 per letter; on turned digits 0.7 was level with 0.3, where 1.0 lost 1.8."""
    why = f"auto: {FINETUNE_FEATURE_LR_SCALE} (fine-tuning from a base model: the feature layers learn slower than the new head"
    if separability is None:
        return FINETUNE_FEATURE_LR_SCALE, why + ")"
    measured = _separates(separability)
    if separability >= SEPARABLE_THRESHOLD:
        return FINETUNE_FEATURE_LR_SCALE, (f"{why}; {measured}, at least {100 * SEPARABLE_THRESHOLD:.0f}%: classes much "
                                           "like the base model's)")
    new = f"{measured}, below {100 * SEPARABLE_THRESHOLD:.0f}%: classes new to the base model"
    if per_class is not None and per_class >= ADAPT_MIN_PER_CLASS:
        return ADAPT_FEATURE_LR_SCALE, (f"auto: {ADAPT_FEATURE_LR_SCALE} (fine-tuning from a base model; {new}, and "
                                        f"{per_class:.0f} training images per class, at least {ADAPT_MIN_PER_CLASS}: "
                                        "enough for the feature layers to learn at the head's rate)")
    few = f", and {per_class:.0f} training images per class, under {ADAPT_MIN_PER_CLASS}" if per_class is not None else ""
    return NEW_CLASSES_FEATURE_LR_SCALE, (f"auto: {NEW_CLASSES_FEATURE_LR_SCALE} (fine-tuning from a base model; {new}{few}: "
                                          "the feature layers must learn the new shapes, slower than the head with "
                                          "this few images)")


def auto_freeze(separability: float | None, per_class: float | None) -> tuple[int, str] | None:
    """``freeze_features_epochs`` for a fine-tuning run whose factor is automatic, and why: the whole run
    (``FREEZE_WHOLE_RUN``) for classes the base model's features already separate (``separability`` at
    least ``FROZEN_MIN_SEPARABILITY``) with at most ``FROZEN_MAX_PER_CLASS`` training images per class;
    None: the default (no frozen epochs)."""
    if separability is None or per_class is None:
        return None
    if separability < FROZEN_MIN_SEPARABILITY or per_class > FROZEN_MAX_PER_CLASS:
        return None
    return FREEZE_WHOLE_RUN, (f"auto: the whole run (fine-tuning from a base model whose features separate the training "
                              f"classes with {100 * separability:.1f}% nearest-class-mean accuracy, at least "
                              f"{100 * FROZEN_MIN_SEPARABILITY:.0f}%, with {per_class:.0f} training images per class, at "
                              f"most {FROZEN_MAX_PER_CLASS}: only the head trains; the feature layers keep the base model's "
                              "weights, the best and fastest setting on digits in the few-shot benchmark)")


def _for_new_classes(separability: float | None, fine_tuning: bool, choice: tuple[str, str], scratch: str,
                     like: str, new: str) -> tuple[str, str]:
    """The setting ``choice`` = (for new classes, otherwise) of a run, and why: the first for fine-tuning
    runs whose classes are new to the base model (``separability`` under ``SEPARABLE_THRESHOLD``), the
    second from scratch (``scratch``: why), when nothing was measured, or for classes like the base
    model's; ``like`` and ``new`` end the reason of those two cases."""
    on, off = choice
    if not fine_tuning:
        return off, f"auto: {off} ({scratch})"
    if separability is None:
        return off, f"auto: {off} (the base model's separability of the classes was not measured)"
    measured = _separates(separability)
    if separability >= SEPARABLE_THRESHOLD:
        return off, f"auto: {off} ({measured}, at least {100 * SEPARABLE_THRESHOLD:.0f}%: classes much like the base model's{like})"
    return on, f"auto: {on} ({measured}, below {100 * SEPARABLE_THRESHOLD:.0f}%: classes new to the base model{new})"


def auto_tta(separability: float | None, fine_tuning: bool) -> tuple[str, str]:
    """``tta`` and why: on for fine-tuning runs whose classes are new to the base model (``separability``
    under ``SEPARABLE_THRESHOLD``), off otherwise. In the few-shot benchmark (3 seeds, docs/PERFORMANCE.md
    section 7) the 7 views gained 0.41 to 0.97 points on every new-script set and 0.01 to 0.11 on digits,
    and on the built-in sample (from scratch) 99.40% against 99.44% plain on seed 42, while at the end of a
    run with 10,000 test images they made the whole process 1.4x longer: 7x the prediction time is spent
    only where it buys accuracy."""
    return _for_new_classes(
        separability, fine_tuning, ("on", "off"),
        "training from scratch: the views did not win on the built-in sample, and cost 7x the prediction time",
        ", where the views gained 0.01-0.11 points in the few-shot benchmark, for 7x the prediction time",
        ", where averaging 7 views of each image gained 0.4-1.0 points in the few-shot benchmark; 7x the prediction time")


def auto_bn_stats(separability: float | None, fine_tuning: bool, ema_decay: float = 0.0) -> tuple[str, str]:
    """``bn_stats`` and why: clean (statistics recomputed from the unaugmented training images before each
    validation) for fine-tuning runs whose classes are new to the base model, training otherwise.

    In the few-shot benchmark (3 seeds side by side, docs/PERFORMANCE.md section 7) clean statistics
    gained 0.63 points on QMNIST 10, 0.58 on QMNIST 30, 0.15 on newscript30, and 0.37 to 1.44 on QMNIST
    10c/30c/60/100 (SWA over the last quarter of the steps, with the same recomputed statistics, added
    nothing over them), and lost 0.12 on
    MNIST 30, whose feature layers stay frozen with the base model's weights and statistics. With the
    weight average on (``ema_decay``), its ``ema_bn`` decides instead."""
    if ema_decay > 0:
        return "training", "auto: training (the weight average is on: its ema_bn setting decides its statistics)"
    return _for_new_classes(
        separability, fine_tuning, ("clean", "training"),
        "training from scratch: the running statistics of the training batches, as measured on the built-in sample",
        ", whose frozen or slowly trained feature layers match the statistics they trained with: clean ones lost "
        "0.12 points on digits in the few-shot benchmark",
        "; statistics recomputed from the unaugmented training images before each validation gained 0.15-1.4 "
        f"points on new scripts in the few-shot benchmark (20 of 21 runs up, 3 seeds), for one forward pass over at most {BN_IMAGES:,} "
        "training images per epoch")


def auto_set_aside(separability: float | None, fine_tuning: bool) -> tuple[str, str]:
    """``set_aside`` and why: on (half-way, the lowest-margin 5% of the training images stop counting in the
    loss) for fine-tuning runs whose classes are new to the base model, off otherwise.

    In the few-shot benchmark (3 seeds side by side, docs/PERFORMANCE.md section 7) it gained on real
    letters with wrong labels: QMNIST 30 (2% of them, the source's) +0.88 points, with 5% flipped at random
    +1.48, QMNIST 10 / 60 / 100 +0.82 / +0.35 / +0.19; where the labels are right it cost 0.12 (corrected
    letters at 30), 0.52 (at 10) and 0.58 on digits turned by 180 degrees, whose pairs of classes (a 1 and
    a turned 1) are the same picture; on digits (frozen features) it changed nothing. No rule from the run's
    margins told the clean sets apart."""
    return _for_new_classes(
        separability, fine_tuning, ("on", "off"),
        "training from scratch: every image counts, as measured on the built-in sample",
        ", whose frozen or slowly trained features left the result unchanged in the few-shot benchmark",
        "; half-way, the 5% of the training images with the lowest area under the margin (likely wrong labels, "
        "marked in label_review.csv) stop counting in the loss: it gained 0.2-1.5 points on real letters with wrong "
        "labels in the few-shot benchmark (3 seeds) and cost up to 0.6 on sets whose labels are right; "
        "set_aside=off for a set known to be clean")


def resolve(cfg: TrainConfig, steps_per_epoch: int, fine_tuning: bool, separability: float | None = None,
            per_class: float | None = None) -> Resolved:
    """Turn the automatic settings of ``cfg`` into numbers for a run with ``steps_per_epoch`` steps.

    ``separability`` (``feature_separability`` of the base model on the training split, None: not
    measured) and ``per_class`` (training images per class) decide the fine-tuning ``feature_lr_scale``
    and, when that factor is automatic, whether the feature layers are frozen for the whole run."""
    notes: dict[str, str] = {}
    values: dict[str, object] = {}
    if cfg.epochs == "auto":
        new_classes = separability is not None and separability < SEPARABLE_THRESHOLD
        values["epochs"], notes["epochs"] = auto_epochs(cfg, steps_per_epoch, fine_tuning, new_classes)
    epochs = int(values.get("epochs", cfg.epochs))  # type: ignore[arg-type]
    if cfg.patience is None:
        values["patience"] = max(BASE_PATIENCE, math.ceil(BASE_PATIENCE * epochs / PATIENCE_REFERENCE_EPOCHS))
        notes["patience"] = f"auto: {values['patience']} epochs ({BASE_PATIENCE} for runs of up to " \
                            f"{PATIENCE_REFERENCE_EPOCHS} epochs, in proportion for longer ones)"
    if cfg.feature_lr_scale is None:
        values["feature_lr_scale"], notes["feature_lr_scale"] = (auto_feature_lr_scale(separability, per_class) if fine_tuning
                                                                 else (1.0, "auto: 1.0 (training from scratch)"))
    if cfg.tta == "auto":
        values["tta"], notes["tta"] = auto_tta(separability, fine_tuning)
    if cfg.bn_stats == "auto":
        values["bn_stats"], notes["bn_stats"] = auto_bn_stats(separability, fine_tuning, cfg.ema_decay)
    if cfg.set_aside == "auto":
        values["set_aside"], notes["set_aside"] = auto_set_aside(separability, fine_tuning)
    if cfg.freeze_features_epochs is None:
        frozen = auto_freeze(separability, per_class) if fine_tuning and cfg.feature_lr_scale is None else None
        if frozen is not None:
            values["freeze_features_epochs"], notes["freeze_features_epochs"] = frozen
            notes["feature_lr_scale"] += "; no effect while the feature layers are frozen"
        else:
            values["freeze_features_epochs"] = FINETUNE_FREEZE_EPOCHS if fine_tuning else 0
    return Resolved(dataclasses.replace(cfg, **values), fine_tuning, notes)


# --- how well the base model's features already separate the user's classes ------------------------


def probe_subset(images: torch.Tensor, labels: torch.Tensor,
                 limit: int = PROBE_MAX_IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``limit`` images, the same share of every class, the first ones of each in the split's
    order: deterministic, and the probe stays a few seconds at most on large sets."""
    if len(labels) <= limit:
        return images, labels
    labels_cpu = labels.cpu()
    k = int(labels_cpu.max()) + 1
    per_class = max(2, limit // k)
    rank = torch.zeros_like(labels_cpu)
    for c in range(k):  # position of each image within its class
        idx = torch.nonzero(labels_cpu == c).flatten()
        rank[idx] = torch.arange(len(idx))
    keep = torch.nonzero(rank < per_class).flatten()
    return images[keep.to(images.device)], labels[keep.to(labels.device)]


@torch.no_grad()
def feature_separability(features: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
                         batch: int = 1024) -> float:
    """Leave-one-out nearest-class-mean accuracy of ``features`` (the base model's feature layers, in
    evaluation mode) on the training split: uint8 ``images`` (N, 1, 28, 28), ``labels`` (N,).

    Each image's penultimate feature vector (length-normalised) is compared by cosine with the mean
    of every class, its own class's mean taken without it; the share of images nearest to their own
    class is the result. About a second per thousand images on one CPU thread, and deterministic
    (no random draw, evaluation-mode batch norm). Classes with a single image count as wrong."""
    images, labels = probe_subset(images, labels)
    was_training = features.training
    features.eval()
    try:
        device = next(features.parameters(), images).device  # (a module without parameters: the images')
        feats = torch.cat([features(normalize(to_unit(images[i:i + batch].to(device)), mean, std)).float().cpu()
                           for i in range(0, len(images), batch)])
    finally:
        features.train(was_training)
    feats = F.normalize(feats, dim=1)
    labels = labels.cpu().long()
    k = int(labels.max()) + 1
    sums = torch.zeros(k, feats.shape[1]).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=k).float()
    own = (sums[labels] - feats) / (counts[labels] - 1).clamp(min=1).unsqueeze(1)  # own class, without the image
    means = sums / counts.clamp(min=1).unsqueeze(1)
    scores = F.normalize(feats, dim=1) @ F.normalize(means, dim=1).T
    scores[torch.arange(len(labels)), labels] = (feats * F.normalize(own, dim=1)).sum(1)
    scores[:, counts == 0] = -2.0
    scores[counts[labels] < 2, labels[counts[labels] < 2]] = -2.0
    return float((scores.argmax(1) == labels).float().mean())


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
