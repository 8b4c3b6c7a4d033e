"""Evaluate a trained model: accuracy, per-class precision/recall/F1, confusions, and the pictures.

Command line (``scripts/evaluate.py`` or ``cnn-evaluate``)::

    python scripts/evaluate.py --model models/cnn_modelo_v2_finetuned/best_model_finetuned.pth \\
        --data data/test [--output-dir DIR] [--device auto|cpu|cuda]

The data may be anything ``data_loader.load_dataset`` reads (class folders, an IDX file, a ``.npz``
(its ``x_test``/``y_test``), a CSV of pixels, a folder with ``labels.csv``, or nothing for the
built-in MNIST sample); its class names are matched to the model's by name. Data the model was
trained on (the same fingerprint as the one stored in the model file) is evaluated with a warning:
its accuracy measures memory, not generalisation. Exit codes:
0 done, 2 bad input (missing or corrupt model file, missing data, classes the model does not know).

Library use (the trainer calls these on the validation split at the end of training)::

    report = evaluate_arrays(model, meta, images_uint8, labels, device)
    write_reports(report, out_dir)   # evaluation.json + confusion_matrix.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..files.checkpoint import atomic_write_json
from ..errors import EXIT_OK, UserError
from .calibration import calibrated_probs, calibration_report, model_temperature
from .inference import (DEFAULT_MODEL, PLAIN, TTA_VIEWS, load_inference_model, model_max_pixels, model_polarity,
                        model_views, predict_logits)
from ..log import logger, printable
from ..files.rundir import CONFUSION, CURVES, EVALUATION, HISTORY, LABEL_REVIEW, RELIABILITY, REPORT
from ..runtime import resolve_device, run_tool, tool_parser
from ..training.signals import SignalGuard

TOP_CONFUSED = 10


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None when undefined (JSON has no NaN; None reads as 'not defined' there)."""
    return float(num) / float(den) if den else None


def metrics_from_confusion(matrix: torch.Tensor, class_names: Sequence[str], top_confused: int = TOP_CONFUSED) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the most confused pairs of a confusion matrix.

    ``matrix[i, j]`` counts images of true class ``i`` predicted as ``j``. Precision of a class never
    predicted and recall and F1 of a class without samples are ``None`` (undefined, not 0); a class
    with samples that is never predicted has F1 0. The macro averages are taken over the classes that have samples, an undefined precision counting as 0
    there (scikit-learn's ``zero_division=0``).
    """
    cm = matrix.to(torch.int64)
    n = int(cm.sum())
    tp = cm.diagonal()
    support = cm.sum(1)
    predicted = cm.sum(0)
    per_class = []
    for i, name in enumerate(class_names):
        p = _ratio(tp[i], predicted[i])
        r = _ratio(tp[i], support[i])
        if p is None or r is None:
            f1 = None if support[i] == 0 else 0.0  # never predicted but present: F1 is 0
        else:
            f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        per_class.append({"class": printable(str(name)), "precision": p, "recall": r, "f1": f1,
                          "support": int(support[i]), "predicted": int(predicted[i])})
    present = [c for c in per_class if c["support"] > 0]
    macro = {key: (sum(c[key] or 0.0 for c in present) / len(present) if present else None)
             for key in ("precision", "recall", "f1")}
    weighted_f1 = sum((c["f1"] or 0.0) * c["support"] for c in present) / n if n else None
    pairs = []
    off = cm.clone()
    off.fill_diagonal_(0)
    order = torch.argsort(off.flatten(), descending=True, stable=True)
    for flat in order[:top_confused].tolist():
        i, j = divmod(flat, len(class_names))
        count = int(off[i, j])
        if count == 0:
            break
        pairs.append({"true": printable(str(class_names[i])), "predicted": printable(str(class_names[j])), "count": count,
                      "share_of_true": count / int(support[i])})
    return {
        "num_samples": n,
        "accuracy": _ratio(int(tp.sum()), n),
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        "weighted_f1": weighted_f1,
        "class_names": [printable(str(c)) for c in class_names],  # for people: names shown escaped
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "most_confused": pairs,
    }


def evaluate_arrays(model: torch.nn.Module, meta: dict[str, Any], images_uint8: torch.Tensor,
                    labels: torch.Tensor, device: torch.device | str, *, batch_size: int = 512,
                    top_confused: int = TOP_CONFUSED, tta: bool | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on uint8 images ``N x 1 x 28 x 28`` with labels indexing ``meta['class_names']``.

    Returns a plain-data report (JSON-able): ``num_samples``, ``accuracy``, ``loss`` (mean
    cross-entropy, no label smoothing), macro precision/recall/F1, ``weighted_f1``, ``per_class``,
    ``confusion_matrix`` (rows: true class, columns: predicted; over all of the model's classes),
    ``most_confused`` pairs, ``predictions`` (predicted class index per image, in input order),
    ``temperature`` (the model's, ``calibration.model_temperature``), ``ece`` (15 bins, after scaling),
    ``ece_uncalibrated``, ``reliability`` (the bins), per image the calibrated ``confidences`` and
    ``label_probabilities``, and ``model`` (epoch, metrics and file of the model when ``meta`` has
    them). Inference is float32. ``tta``: test-time augmentation, the mean of the views' softmax in place
    of the logits (``tta_views`` in the report): None (default) predicts with the model file's own views
    (``inference.model_views``), True with ``inference.TTA_VIEWS``, False with the plain image alone.
    """
    class_names = list(meta["class_names"])
    labels = labels.to(torch.int64).cpu()
    if labels.dim() != 1 or labels.shape[0] != images_uint8.shape[0]:
        raise ValueError(f"{images_uint8.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
        raise ValueError(f"labels must index the model's {len(class_names)} classes; found {int(labels.min())}..{int(labels.max())}")
    views = model_views(meta) if tta is None else (TTA_VIEWS if tta else PLAIN)
    logits = predict_logits(model, meta, images_uint8, device, batch_size, views=views)
    preds = logits.argmax(1)
    calibration = calibration_report(logits, labels, model_temperature(meta))
    probs = calibrated_probs(logits, calibration["temperature"])
    c = len(class_names)
    cm = torch.bincount(labels * c + preds, minlength=c * c).reshape(c, c)
    report = metrics_from_confusion(cm, class_names, top_confused)
    report["loss"] = float(F.cross_entropy(logits, labels)) if labels.numel() else None
    report.update(calibration)
    report["predictions"] = preds.tolist()
    # Calibrated: the confidence of the prediction and the probability of the given label, per image (4 digits).
    report["confidences"] = [round(v, 4) for v in probs.max(1).values.tolist()]
    report["label_probabilities"] = [round(v, 4) for v in probs.gather(1, labels[:, None]).squeeze(1).tolist()]
    report["model"] = {k: meta[k] for k in ("path", "epoch", "metrics") if k in meta}
    if len(views) > 1:
        report["tta_views"] = [list(v) for v in views]
    return report


def write_reports(report: dict[str, Any], out_dir: Path, prefix: str = "") -> list[Path]:
    """Write ``{prefix}evaluation.json``, ``{prefix}confusion_matrix.png`` and
    ``{prefix}reliability_diagram.png`` into ``out_dir``.

    The files are written atomically; returns their paths. ``prefix`` (e.g. ``"test_"``) keeps
    reports on different data side by side in one folder.
    """
    from .plots import plot_confusion_matrix, plot_reliability

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{prefix}{EVALUATION}"
    png_path = out_dir / f"{prefix}{CONFUSION}"
    atomic_write_json(json_path, report)
    source = (report.get("data") or {}).get("source")
    title = "Confusion matrix" + (f" - {source}" if source else "")
    if len(title) > 90:
        title = title[:87] + "..."
    plot_confusion_matrix(report["confusion_matrix"], report["class_names"], png_path, title=title)
    paths = [json_path, png_path]
    if report.get("reliability"):
        paths.append(out_dir / f"{prefix}{RELIABILITY}")
        plot_reliability(report, paths[-1])
    return paths


def _pct(value: float | None) -> str:
    return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:6.2f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as text for the terminal: accuracy, per-class table, most confused pairs."""
    lines = [
        f"images:    {report['num_samples']}",
        f"accuracy:  {_pct(report['accuracy']).strip()}%"
        + (f"   (loss {report['loss']:.4f})" if report.get("loss") is not None else ""),
        f"calibration: temperature {report.get('temperature', 1.0):.3f}, ECE {_pct(report.get('ece')).strip()}% "
        f"(uncalibrated {_pct(report.get('ece_uncalibrated')).strip()}%)",
        f"macro F1:  {_pct(report['macro_f1']).strip()}%   macro precision {_pct(report['macro_precision']).strip()}%"
        f"   macro recall {_pct(report['macro_recall']).strip()}%",
        "",
    ]
    width = max([5] + [len(c["class"]) for c in report["per_class"]])
    lines.append(f"{'class':<{width}}  precision  recall      F1  support")
    for c in report["per_class"]:
        lines.append(f"{c['class']:<{width}}     {_pct(c['precision'])}  {_pct(c['recall'])}  {_pct(c['f1'])}  {c['support']:>7}")
    lines.append("")
    if report["most_confused"]:
        lines.append("most confused (true -> predicted: count, share of the true class):")
        for p in report["most_confused"]:
            lines.append(f"  {p['true']} -> {p['predicted']}: {p['count']} ({100 * p['share_of_true']:.1f}%)")
    else:
        lines.append("no confusions: every image was classified correctly")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``evaluate.py``."""
    p = tool_parser(
        "evaluate.py",
        "Evaluate a trained model on labelled data: accuracy, per-class precision/recall/F1, "
        f"the most confused classes, calibration (ECE), {EVALUATION}, {CONFUSION}, {RELIABILITY} and {REPORT}.",
        "Exit codes: 0 done, 2 bad input (model or data missing or unusable).",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default: {DEFAULT_MODEL})")
    p.add_argument("--data", help="labelled data: a folder of class folders (raw/ and processed/ too), an IDX images file, "
                                  "a .npz (its x_test/y_test; FILE.npz:train for the others), a CSV of pixels with labels, "
                                  "or a folder with labels.csv; omitted: the built-in MNIST sample (which the default "
                                  "model was trained on)")
    p.add_argument("--output-dir", type=Path, help=f"where {EVALUATION} and {CONFUSION} go (default: evaluation/ beside the model file)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto picks CUDA when present (default: auto)")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default: 512)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the preprocessed-data cache")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", action="store_true", default=None,
                     help="test-time augmentation: average the probabilities of the image and "
                     f"{len(TTA_VIEWS) - 1} copies shifted by a pixel or turned by 8 degrees ({len(TTA_VIEWS)}x the time), "
                     "whatever the model file says (default: as the model file says: its tta_views, which training "
                     "writes with tta on, as tta auto does for classes new to the base model; predict.py and the "
                     "exports use the same views)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="classify the unaugmented image alone, whatever "
                     "the model file says")
    return p


def match_classes(data_names: Sequence[str], model_names: Sequence[str], source: str) -> torch.Tensor:
    """Map the data's class indices to the model's by class name; unknown names are bad input.

    Returns ``mapping`` such that ``mapping[data_label]`` is the model's index of that class.
    """
    unknown = [c for c in data_names if c not in model_names]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        known = ", ".join(model_names[:20]) + (" ..." if len(model_names) > 20 else "")
        raise UserError(f"{source} has classes the model does not know: {shown}; the model's classes are {known}. "
                        "Rename or remove those class folders (class names must match the training data's)")
    return torch.tensor([list(model_names).index(c) for c in data_names], dtype=torch.int64)


def seen_in_training(meta: dict[str, Any], fingerprint: str) -> str | None:
    """``"training"`` when data of this fingerprint is what the model was trained on (its validation
    split included), ``"validation"`` when it is its separate ``--val-data``, else None.

    The model file stores the training data's fingerprint (``train:val`` with ``--val-data``); equal
    fingerprints mean the same images, labels and class names.
    """
    parts = str(meta.get("data_fingerprint") or "").split(":")
    if fingerprint == parts[0]:
        return "training"
    if len(parts) > 1 and fingerprint == parts[1]:
        return "validation"
    return None


def warn_if_seen(meta: dict[str, Any], ds: Any, builtin: bool) -> str | None:
    """Say which data is evaluated when it is not held out; returns ``seen_in_training``'s answer."""
    if builtin:
        logger.info("no --data: evaluating on the built-in MNIST sample (5,000 digits of the MNIST training set)")
    seen = seen_in_training(meta, ds.fingerprint())
    if seen == "training":
        logger.warning(f"{ds.source} is the data this model was trained on (the same fingerprint): the accuracy below "
                       "says how well it learnt these images, not how it does on new ones. For that, pass held-out data "
                       "with --data, e.g. the MNIST test set (t10k-images-idx3-ubyte.gz, or a mnist.npz: its x_test/y_test)")
    elif seen == "validation":
        logger.warning(f"{ds.source} is the validation data that chose this model's best epoch: the accuracy below is "
                       "optimistic; pass data the training never saw with --data")
    return seen


def write_html_report(report: dict[str, Any], images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any],
                      model_path: Path, out_dir: Path, duplicate_pictures: Sequence[torch.Tensor] = ()) -> Path:
    """``report.html`` of an evaluation: this data's confusions, worst images and reliability, with the
    training curves, events and label review of the run beside the model file where they are."""
    import csv
    import json

    from .report import ReportInputs, write_report

    run = model_path.parent
    history: list[dict[str, Any]] = []
    if (run / HISTORY).is_file():
        try:
            history = json.loads((run / HISTORY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning(f"{run / HISTORY} is unreadable; the report shows no events")
    review = None
    if (run / LABEL_REVIEW).is_file():
        with open(run / LABEL_REVIEW, encoding="utf-8", newline="") as f:
            review = [{**r, "rank": int(r["rank"]), "score": float(r["score"]) if r["score"] else None}
                      for _, r in zip(range(50), csv.DictReader(f))]
    return write_report(out_dir / REPORT, ReportInputs(
        title=f"Evaluation of {model_path.name}", evaluation=report, images=images, labels=labels,
        class_names=list(meta["class_names"]), history=history if isinstance(history, list) else [], review=review,
        pictures={"curves": run / CURVES, "confusion": out_dir / CONFUSION, "reliability": out_dir / RELIABILITY},
        duplicates=(report.get("data") or {}).get("duplicates"),
        duplicate_pictures=duplicate_pictures))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit code (130 on Ctrl+C, with no report written)."""
    with SignalGuard() as guard:
        return run_tool(build_parser(), lambda args: _run(args, guard), argv,
                        interrupted=f"no report was written (an earlier {EVALUATION} is kept)")


def _run(args: argparse.Namespace, guard: SignalGuard) -> int:
    from ..data.duplicates import describe, find_duplicates
    from ..data.loader import load_dataset

    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size} must be positive, e.g. 512")
    device = resolve_device(args.device)
    model, meta = load_inference_model(args.model, device)
    logger.info(f"model: {args.model} (epoch {meta.get('epoch', '?')}, {len(meta['class_names'])} classes)")
    ds = load_dataset(args.data, polarity=model_polarity(meta), use_cache=not args.no_cache,
                      max_pixels=model_max_pixels(meta), part="test")
    mapping = match_classes(ds.class_names, meta["class_names"], ds.source)
    labels = mapping[ds.labels]
    logger.info(f"data:  {ds.source}: {len(ds)} images, {len(ds.class_names)} classes")
    seen = warn_if_seen(meta, ds, builtin=args.data is None)
    if ds.skipped:
        logger.warning(f"skipped {len(ds.skipped)} unusable file(s), e.g. {ds.skipped[0]['path']}: {ds.skipped[0]['reason']} "
                       f"(all listed in {EVALUATION})")
    duplicate_pictures: list[torch.Tensor] = []
    duplicates = find_duplicates(ds.images, ds.labels, ds.class_names, ds.origin, duplicate_pictures)
    for line in describe(duplicates, ds.source, listed_in=EVALUATION, test=True):
        logger.warning(line)
    report = evaluate_arrays(model, meta, ds.images, labels, device, batch_size=args.batch_size, tta=args.tta)
    report["data"] = {"source": ds.source, "kind": ds.kind, "num_images": len(ds), "class_names": list(ds.class_names),
                      "skipped": list(ds.skipped), "fingerprint": ds.fingerprint(), "seen_in_training": seen,
                      "duplicates": duplicates}
    out_dir = args.output_dir if args.output_dir is not None else Path(args.model).parent / "evaluation"
    try:
        # Both reports or neither: a stop between the two would pair a new evaluation.json with an old matrix.
        with guard.deferring("writing the reports, then stopping"):
            paths = write_reports(report, out_dir)
            paths.append(write_html_report(report, ds.images, labels, meta, Path(args.model), out_dir, duplicate_pictures))
    except OSError as err:
        raise UserError(f"cannot write to {out_dir}: {err.strerror or err}; choose a writable --output-dir") from None
    if guard.stop_requested:
        raise guard.stopped(f"{guard.name} received while the reports were written: {', '.join(map(str, paths))} "
                            "are complete")
    print()
    print(printable(format_report(report)))
    print()
    print(printable("wrote " + ", ".join(str(p) for p in paths)))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
