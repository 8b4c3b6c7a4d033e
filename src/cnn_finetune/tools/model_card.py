"""``model_card.md``: what a person needs to know about a trained model, in one readable page.

Built from plain data only (the config, ``data_report.json``, ``history.json`` and evaluation
reports), so it can be written at the end of training or regenerated later from the files of a run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..files.checkpoint import atomic_write_bytes
from ..log import printable
from .plots import best_record
from ..files.rundir import BEST as BEST_MODEL
from ..files.rundir import CONFIG, CONFUSION, CURVES, DATA_REPORT, HISTORY, MODEL_CARD
SKIPPED_SHOWN = 20  # skipped files listed in the card; all of them are in data_report.json
CONFUSED_SHOWN = 5

# Hyper-parameters shown in the recipe, in this order; the rest are in config_finetuned.json.
RECIPE_KEYS = (
    "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "scheduler", "warmup_fraction",
    "label_smoothing", "grad_clip", "width", "bn_ghost_size", "base_model", "freeze_features_epochs",
    "feature_lr_scale", "aug_rotation", "aug_translate", "aug_scale", "aug_noise", "balance", "polarity",
    "val_fraction", "seed", "monitor", "patience", "min_delta", "amp",
)


def _cell(value: Any) -> str:
    """A value for a Markdown table cell (pipes escaped so that class names cannot break the table)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * float(value):.2f}%"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _data_section(data_report: dict[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    train = data_report.get("train_source") or {}
    val = data_report.get("val_source")
    split = data_report.get("split") or {}
    for label, src in (("Training data", train), ("Validation data", val)):
        if not src:
            continue
        lines.append(f"- **{label}:** `{src.get('source', '?')}` ({src.get('kind', '?')}): "
                     f"{src.get('num_images', '?')} images in {len(src.get('class_names') or [])} classes")
    if val is None and split:
        lines.append(f"- **Validation:** a stratified split of the training data: {split.get('val', '?')} images "
                     f"(fraction {split.get('val_fraction')}, seed {split.get('seed')}); training on {split.get('train', '?')}")
    norm = data_report.get("normalization") or {}
    if norm:
        lines.append(f"- **Normalisation:** mean {_num(norm.get('mean'), 6)}, std {_num(norm.get('std'), 6)} "
                     "(pixels scaled to [0, 1], training split)")
    if data_report.get("fingerprint"):
        lines.append(f"- **Data fingerprint:** `{str(data_report['fingerprint'])[:16]}...` (SHA-256 of pixels, labels and class names)")
    lines.append("")

    totals = train.get("class_counts") or {}
    train_counts = data_report.get("train_class_counts") or {}
    val_counts = (val or {}).get("class_counts") if val else {c: totals.get(c, 0) - train_counts.get(c, 0) for c in totals}
    if totals:
        lines.append("Images per class:")
        lines.append("")
        rows = [[c, totals.get(c, 0), train_counts.get(c, "?"), (val_counts or {}).get(c, "?")] for c in totals]
        lines += _table(["class", "in the source", "training", "validation"], rows)
        lines.append("")

    for label, src in (("training", train), ("validation", val)):
        if not src:
            continue
        skipped = src.get("skipped") or []
        if skipped:
            lines.append(f"**{len(skipped)} unusable file(s) skipped** in the {label} data"
                         + (f" (first {SKIPPED_SHOWN} shown; all in `{DATA_REPORT}`)" if len(skipped) > SKIPPED_SHOWN else "") + ":")
            lines.append("")
            lines += [f"- `{s.get('path')}`: {s.get('reason')}" for s in skipped[:SKIPPED_SHOWN]]
            lines.append("")
        if src.get("dropped_classes"):
            lines.append(f"Class folders without any usable image (dropped) in the {label} data: "
                         + ", ".join(f"`{c}`" for c in src["dropped_classes"]))
            lines.append("")
        if src.get("ignored_files"):
            lines.append(f"{src['ignored_files']} file(s) without an image extension were ignored in the {label} data.")
            lines.append("")
    if not any((s or {}).get("skipped") for s in (train, val)):
        lines.append("No file was skipped as unusable.")
        lines.append("")
    return lines + _duplicates_lines(data_report.get("duplicates"))


def _duplicates_lines(found: dict[str, Any] | None) -> list[str]:
    """Copies of one image under two labels, and test images that are copies of training images."""
    if not found:  # a run from before the check
        return []
    across = found.get("across_classes") or {}
    within = found.get("within_class") or {}
    lines = []
    if across.get("groups"):
        shown = across.get("examples") or []
        lines.append(f"**{across['images']} images are {across['groups']} picture(s) under two or more labels** (the same "
                     f"pixels after preprocessing: a label or copying error, or classes that look alike at 28x28)"
                     + (f" (first {len(shown)} shown; all counted in `{DATA_REPORT}`)" if len(shown) < across["groups"] else "") + ":")
        lines.append("")
        lines += ["- " + " = ".join(f"`{x['image']}` ({x['label']})" for x in g["images"]) for g in shown]
        lines.append("")
    else:
        lines.append("No image appears under two labels.")
        lines.append("")
    if within.get("extra_copies"):
        lines.append(f"{within['extra_copies']} extra copies of {within['groups']} image(s) under the same label.")
        lines.append("")
    test = found.get("test_copies")
    if test and test.get("images"):
        lines.append(f"**{test['images']} test image(s) are copies of training or validation images**"
                     + (f", {test['other_label']} of them under another label there" if test.get("other_label") else "")
                     + ": the test accuracy partly measures memory.")
        lines.append("")
    inside = found.get("test_across_classes") or {}
    if inside.get("groups"):
        lines.append(f"**The test data holds {inside['images']} images that are {inside['groups']} picture(s) under two or more "
                     f"labels**: at least {inside['unavoidable_errors']} test errors whatever the model predicts.")
        lines.append("")
    return lines


def _recipe_section(cfg: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    lines = ["## Recipe", ""]
    rows = [[k, "none" if cfg[k] is None else cfg[k]] for k in RECIPE_KEYS if k in cfg and k != "base_model"]
    if "init" in resolved:  # what the weights really started from (the base model or scratch)
        rows.insert(0, ["initial weights", resolved["init"]])
    elif "base_model" in cfg:
        rows.append(["base_model (used when the file existed)", "none" if cfg["base_model"] is None else cfg["base_model"]])
    for k in ("device", "batch_size", "steps_per_epoch"):
        if k in resolved and (k != "batch_size" or resolved[k] != cfg.get("batch_size")):
            rows.append([f"{k} (resolved)", resolved[k]])
    lines += _table(["setting", "value"], rows)
    lines += ["", f"Every setting is in `{CONFIG}`.", ""]
    return lines


def _training_section(history: Sequence[dict[str, Any]], cfg: dict[str, Any], out_dir: Path,
                      kept_epoch: int | None = None) -> list[str]:
    monitor = str(cfg.get("monitor", "val_acc"))
    lines = ["## Training", ""]
    if not history:
        return lines + ["No epoch was completed.", ""]
    best = best_record(history, monitor)
    seconds = sum(float(r.get("seconds") or 0.0) for r in history)
    planned = cfg.get("epochs")
    lines.append(f"- **Epochs run:** {len(history)}" + (f" of {planned} planned" if planned else "")
                 + (" (stopped by early stopping)" if planned and len(history) < int(planned) else ""))
    if best is not None:
        lines.append(f"- **Best epoch:** {best.get('epoch')} ({monitor}): validation accuracy {_pct(best.get('val_acc'))}, "
                     f"validation loss {_num(best.get('val_loss'))}, training accuracy {_pct(best.get('train_acc'))} "
                     f"(on augmented images)." + (f" Its weights are in `{BEST_MODEL}`."
                                                  if kept_epoch in (None, best.get("epoch")) else ""))
    last = history[-1]
    lines.append(f"- **Last epoch:** {last.get('epoch')}: validation accuracy {_pct(last.get('val_acc'))}, "
                 f"validation loss {_num(last.get('val_loss'))}" + (
                     f". `{BEST_MODEL}` holds these final weights: the best epoch is not significantly better on the "
                     f"validation images (`model_selection`)" if best is not None and kept_epoch == last.get("epoch")
                     and kept_epoch != best.get("epoch") else ""))
    lines.append(f"- **Training time:** {seconds / 60:.1f} min in total")
    counts: dict[str, int] = {}
    for r in history:
        for e in r.get("events") or []:
            kind = str(e.get("type", "event")) if isinstance(e, dict) else "event"
            counts[kind] = counts.get(kind, 0) + 1
    nan_steps = sum(int(r.get("nan_skipped") or 0) for r in history)
    if counts or nan_steps:
        parts = [f"{k} x{v}" for k, v in sorted(counts.items())] + ([f"{nan_steps} NaN/Inf step(s) skipped"] if nan_steps else [])
        lines.append("- **Events:** " + ", ".join(parts) + f" (details per epoch in `{HISTORY}`)")
    else:
        lines.append("- **Events:** none: no interruption, retry, out-of-memory or NaN")
    lines.append("")
    if (out_dir / CURVES).exists():
        lines += [f"![training curves]({CURVES})", ""]
    return lines


def _evaluation_section(title: str, report: dict[str, Any], out_dir: Path, png_name: str) -> list[str]:
    lines = [f"## {title}", ""]
    source = (report.get("data") or {}).get("source")
    lines.append(f"- **Images:** {report.get('num_samples')}" + (f" from `{source}`" if source else ""))
    loss = report.get("loss")
    lines.append(f"- **Accuracy:** {_pct(report.get('accuracy'))}" + (f" (loss {_num(loss)})" if loss is not None else ""))
    views = report.get("tta_views") or []
    lines.append(f"- **Predicted with:** the mean of {len(views)} views' probabilities (test-time augmentation: the image, "
                 "shifted and turned; `tta_views` in the model file), as every tool predicts" if len(views) > 1 else
                 "- **Predicted with:** the image alone (no test-time augmentation)")
    lines.append(f"- **Macro F1:** {_pct(report.get('macro_f1'))}; macro precision {_pct(report.get('macro_precision'))}, "
                 f"macro recall {_pct(report.get('macro_recall'))}; weighted F1 {_pct(report.get('weighted_f1'))}")
    lines.append("")
    rows = [[c["class"], _pct(c.get("precision")), _pct(c.get("recall")), _pct(c.get("f1")), c.get("support")]
            for c in report.get("per_class") or []]
    if rows:
        lines += _table(["class", "precision", "recall", "F1", "images"], rows)
        lines.append("")
    confused = (report.get("most_confused") or [])[:CONFUSED_SHOWN]
    if confused:
        lines.append("Most confused (true -> predicted):")
        lines.append("")
        lines += [f"- {p['true']} -> {p['predicted']}: {p['count']} image(s), {_pct(p.get('share_of_true'))} of class {p['true']}"
                  for p in confused]
        lines.append("")
    if (out_dir / png_name).exists():
        lines += [f"![{title.lower()} confusion matrix]({png_name})", ""]
    return lines


def _usage_section(out_dir: Path, cfg: dict[str, Any]) -> list[str]:
    model = (out_dir / BEST_MODEL).as_posix()
    polarity = cfg.get("polarity", "auto")
    return [
        "## How to use the model",
        "",
        "Predict images of any size and colour (the preprocessing of training is applied; folders are searched recursively):",
        "",
        "```bash",
        f"python scripts/predict.py --model {model} photo.jpg my_scans/ --top-k 3",
        f"python scripts/evaluate.py --model {model} --data labelled_folder/   # accuracy, confusion matrix",
        f"python scripts/export.py --model {model}                             # TorchScript + ONNX",
        "```",
        "",
        "From Python:",
        "",
        "```python",
        "from pathlib import Path",
        "import torch",
        "from cnn_finetune.model.cnn import load_model_file",
        "from cnn_finetune.data.imageprep import load_image_file",
        "from cnn_finetune.tools.inference import predict_proba",
        "",
        f'model, meta = load_model_file("{model}")  # eval mode; meta: class_names, normalization, config, ...',
        f'pixels = load_image_file(Path("digit.png"), polarity=meta["config"]["polarity"], light=True)  # "{polarity}": uint8 28x28',
        "probs = predict_proba(model, meta, torch.from_numpy(pixels)[None, None])  # shape 1 x classes",
        'print(meta["class_names"][int(probs.argmax())], float(probs.max()))',
        "```",
        "",
        "The network expects `(pixel / 255 - mean) / std` of 28x28 grayscale images with bright strokes on a dark "
        "background, laid out like MNIST (strokes fitted into 20x20, centred by mass); `predict_proba` and the "
        "scripts do this. `load_model_file` verifies the file's checksum before loading it.",
        "",
    ]


def write_model_card(out_dir: Path, *, config: dict[str, Any], data_report: dict[str, Any], history: list[dict[str, Any]],
                     evaluation: dict[str, Any] | None, test_evaluation: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/model_card.md`` atomically and return its path.

    ``config``: the resolved config (``TrainConfig.to_dict()``) or the whole ``config_finetuned.json``
    (then its ``resolved`` and ``versions`` are used too). ``data_report``: the content of
    ``data_report.json``. ``history``: the records of ``history.json``. ``evaluation``: the report of
    ``evaluate.evaluate_arrays`` on the validation split (None: left out); ``test_evaluation``: one on a
    test set. Pictures (``training_curves.png``, ``confusion_matrix.png``,
    ``test_confusion_matrix.png``) are linked when they exist in ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.get("config") if isinstance(config.get("config"), dict) else config
    resolved = (config.get("resolved") or {}) if cfg is not config else {}
    versions = (config.get("versions") or {}) if cfg is not config else {}
    classes = (data_report.get("train_source") or {}).get("class_names") or config.get("class_names") or []
    best = best_record(history, str(cfg.get("monitor", "val_acc")))

    lines = [f"# Model card: CNN v2, {len(classes)} classes", ""]
    summary = [f"A CNN v2 (width {cfg.get('width', '?')}) classifying 28x28 grayscale images into {len(classes)} classes"]
    if classes:
        shown = ", ".join(str(c) for c in classes[:20]) + (", ..." if len(classes) > 20 else "")
        summary.append(f" ({shown})")
    summary.append(".")
    if best is not None:
        summary.append(f" Best epoch {best.get('epoch')}: validation accuracy {_pct(best.get('val_acc'))}.")
    if test_evaluation is not None:
        summary.append(f" Test accuracy {_pct(test_evaluation.get('accuracy'))} on {test_evaluation.get('num_samples')} images.")
    lines += ["".join(summary), ""]
    lines += _data_section(data_report)
    lines += _recipe_section(cfg, resolved)
    lines += _training_section(history, cfg, out_dir, (evaluation.get("model") or {}).get("epoch") if evaluation else None)
    if evaluation is not None:
        lines += _evaluation_section("Validation", evaluation, out_dir, CONFUSION)
    if test_evaluation is not None:
        lines += _evaluation_section("Test", test_evaluation, out_dir, f"test_{CONFUSION}")
    lines += _usage_section(out_dir, cfg)
    if versions:
        lines += ["## Software", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    lines += [
        "## Limitations",
        "",
        "- Validation images come from the same source as the training images unless a separate validation "
        "folder was given: accuracy on images from elsewhere (other scanners, pens, writers) may be lower.",
        "- The model always answers with one of its classes, also for images that show none of them; a low top "
        "probability is a hint, not a guarantee.",
        "",
    ]
    path = out_dir / MODEL_CARD
    atomic_write_bytes(path, printable("\n".join(lines)).encode("utf-8"))
    return path
