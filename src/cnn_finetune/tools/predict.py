"""Predict the classes of image files with a trained model.

Command line (``scripts/predict.py`` or ``cnn-predict``)::

    python scripts/predict.py --model models/cnn_modelo_v2_finetuned/best_model_finetuned.pth \\
        photo.jpg scans/ [--top-k 3] [--json | --csv]

Images of any size, format and colour go through the preprocessing of training
(``imageprep.load_image_file`` with the polarity stored in the model's config): 28x28 images only
get grayscale + polarity (the ``light`` path, as ``processed/`` images in training), larger or
smaller ones the full MNIST layout (crop to the strokes, fit into 20x20, centre by mass). Folders
are walked recursively for image files. A file that cannot be read is reported on its own line (an
``error`` field in JSON and CSV) and the others are still predicted.

A CSV of pixels (Kaggle layout, ``pixel0,...,pixel783`` with or without a ``label`` column, which
is ignored) gives one line per image row, named ``FILE:LINE`` with the row's line number in the
file (with a header, the first image is on line 2; Kaggle's ``ImageId`` is ``LINE - 1``). Its
pixels are used as they are, as in training: bright strokes on a dark background. A bad row gets
an error line. Exit codes: 0 when at least one image was predicted, 2 when none was or the model
cannot be used.

The probabilities are calibrated: the logits are divided by the temperature fitted on the validation
split at the end of training (stored in the model file). An image whose calibrated confidence (the
top probability) is under the model's "unknown" threshold is answered ``unknown``, with the best
guess beside it. The threshold is the calibrated confidence that keeps 99% of the correctly
classified validation images (``tools/calibration.py``); ``--min-confidence`` sets another one
(0 turns this check off). An image is also unknown when its penultimate features are far from every
class: the squared Mahalanobis distance to the nearest class mean (fitted on the training split at
the end of training) over the threshold that keeps 99% of the correctly classified validation
images; ``--max-distance`` sets another one (0 turns it off), and model files made before it have
no distance check. Unknown = EITHER check says so.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import numpy as np
import torch

from ..data.formats import csv_kind, is_csv, read_pixel_csv
from ..errors import EXIT_BAD_INPUT, EXIT_OK, DataError, UserError
from ..data.imageprep import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UnusableImage, load_image_file
from .inference import DEFAULT_MODEL, load_inference_model, model_max_pixels, model_polarity, predict_with_unknown
from ..log import printable
from ..runtime import resolve_device, run_tool, tool_parser
from ..training.signals import SignalGuard


@dataclass
class Prediction:
    """The outcome for one input file: the top classes with probabilities, or why it failed."""

    file: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability), best first
    error: str | None = None
    unknown: bool = False  # the calibrated confidence is under the threshold, or the distance over its own
    threshold: float = 0.0
    distance: float | None = None  # squared Mahalanobis distance to the nearest class mean (None: no check)
    max_distance: float | None = None

    @property
    def confidence(self) -> float | None:
        """The calibrated probability of the best class (None for an error)."""
        return self.top[0][1] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the JSON output."""
        return {"file": self.file,
                "predictions": [{"class": c, "probability": p} for c, p in self.top],
                "confidence": self.confidence, "unknown": self.unknown if self.error is None else None,
                "distance": self.distance, "error": self.error}

    @property
    def why(self) -> str:
        """Why the answer is unknown, in words ('' when it is not)."""
        if not self.unknown:
            return ""
        reasons = [f"confidence under {100 * self.threshold:.1f}%"] if (self.confidence or 0.0) < self.threshold else []
        if self.distance is not None and self.max_distance is not None and self.distance > self.max_distance:
            reasons.append(f"feature distance {self.distance:.0f} over {self.max_distance:.0f}")
        return " and ".join(reasons)


@dataclass
class Item:
    """One thing to predict: an image file, or one image row of a CSV of pixels."""

    name: str  # what the output shows: the file, or FILE:LINE for a row of a CSV
    path: Path | None = None  # an image file, preprocessed as in training
    image: np.ndarray | None = None  # a ready uint8 28x28 image (a CSV row, used as it is)
    error: str | None = None


def collect_files(inputs: Iterable[str | Path]) -> list[Item]:
    """Expand the command line's files and folders into items to predict, in a stable order.

    Folders are walked recursively (sorted, hidden entries skipped) for files with an image
    extension; files named explicitly are taken whatever their extension, so that a mistake shows
    up as an error line instead of being silently ignored. A CSV of pixels named explicitly gives
    one item per row (``FILE:LINE``). A path that does not exist is kept with its problem, so it
    gets an error line too.
    """
    found: list[Item] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        found.append(Item(str(Path(dirpath) / name), path=Path(dirpath) / name))
        elif path.is_file() and is_csv(path):
            found += csv_rows(path)
        elif path.exists():
            found.append(Item(str(path), path=path))
        else:
            found.append(Item(str(path), error="file not found"))
    return found


def csv_rows(path: Path) -> list[Item]:
    """One item per image row of a CSV of pixels (a label column, if any, is ignored), in file order;
    a bad row is an item with its reason, a file that is no CSV of pixels one item with the reason."""
    try:
        if csv_kind(path) == "labels":
            return [Item(str(path), error="a filename,label list, not a CSV of pixels; pass the images' folder instead")]
        table = read_pixel_csv(path)
    except DataError as err:
        return [Item(str(path), error=str(err))]
    rows = [(pos, Item(f"{path}:{pos}", image=image)) for pos, image in zip(table.positions, table.images)]
    rows += [(pos, Item(f"{path}:{pos}", error=reason)) for pos, reason in table.bad]
    return [item for _, item in sorted(rows, key=lambda row: row[0])]


def preprocess_file(path: Path, polarity: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image file -> uint8 28x28, exactly as training preprocesses it; raises ``UnusableImage``.

    ``light=True`` asks ``preprocess_pil`` for the light path, which it only takes for images that
    are already 28x28; every other size gets the full MNIST layout. Images over ``max_pixels`` (the
    model's training limit) are refused before they are decoded.
    """
    return load_image_file(path, polarity=polarity, light=True, max_pixels=max_pixels)


def predict_files(model: torch.nn.Module, meta: dict[str, Any], items: Sequence[Item],
                  device: torch.device | str = "cpu", top_k: int = 3, batch_size: int = 256,
                  min_confidence: float | None = None, max_distance: float | None = None) -> list[Prediction]:
    """Preprocess and classify ``items`` (from ``collect_files``); one ``Prediction`` per item, in order.

    ``min_confidence`` and ``max_distance``: the "unknown" thresholds (None: the model's; 0: that check
    off), see ``inference.predict_with_unknown``."""
    polarity, max_pixels = model_polarity(meta), model_max_pixels(meta)
    names = meta["class_names"]
    k = max(1, min(top_k, len(names)))
    results: list[Prediction] = []
    arrays: list[np.ndarray] = []
    slots: list[int] = []
    for item in items:
        results.append(Prediction(printable(item.name), error=item.error))  # a name that is not UTF-8 shown escaped
        if item.error is not None:
            continue
        try:
            arrays.append(item.image if item.image is not None else preprocess_file(item.path, polarity, max_pixels))
            slots.append(len(results) - 1)
        except UnusableImage as err:
            results[-1].error = printable(str(err))
        except OSError as err:  # e.g. a folder entry that vanished or a special file
            results[-1].error = printable(f"cannot read the file: {err.strerror or err}")
    if arrays:
        images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
        answers = predict_with_unknown(model, meta, images, device, batch_size, min_confidence=min_confidence,
                                       max_distance=max_distance)
        top_p, top_i = answers.probs.topk(k, dim=1)
        distances = answers.distance.tolist() if answers.distance is not None else [None] * len(slots)
        for j, (slot, p_row, i_row) in enumerate(zip(slots, top_p.tolist(), top_i.tolist(), strict=True)):
            r = results[slot]
            r.top = [(printable(names[i]), float(p)) for i, p in zip(i_row, p_row)]
            r.unknown, r.threshold = bool(answers.unknown[j]), answers.min_confidence
            r.distance, r.max_distance = distances[j], answers.max_distance
    return results


def write_text(results: Sequence[Prediction], out: TextIO) -> None:
    """One line per file: ``file: 7 (98.1%), 1 (1.2%), ...``, ``file: unknown (best guess 7 (31.0%), ...)``
    or ``file: error: reason``."""
    for r in results:
        if r.error is not None:
            out.write(f"{r.file}: error: {r.error}\n")
        elif r.unknown:
            out.write(f"{r.file}: unknown ({r.why}; best guess "
                      + ", ".join(f"{c} ({100 * p:.1f}%)" for c, p in r.top) + ")\n")
        else:
            out.write(f"{r.file}: " + ", ".join(f"{c} ({100 * p:.1f}%)" for c, p in r.top) + "\n")


def write_json(results: Sequence[Prediction], out: TextIO) -> None:
    """A JSON list with one object per file: ``file``, ``predictions`` [{class, probability}], ``confidence``
    (calibrated), ``unknown`` (true|false; null for an error), ``distance`` (the squared feature distance to
    the nearest class mean; null without a distance check), ``error``."""
    json.dump([r.to_dict() for r in results], out, indent=2, ensure_ascii=False)
    out.write("\n")


def write_csv(results: Sequence[Prediction], out: TextIO, top_k: int) -> None:
    """CSV with columns ``file, class_1, probability_1, ..., class_k, probability_k, unknown, distance, error``
    (``distance``: the squared feature distance to the nearest class mean; empty without a distance check)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file"] + [f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("class", "probability")]
                    + ["unknown", "distance", "error"])
    for r in results:
        cells: list[Any] = []
        for i in range(top_k):
            cells += [r.top[i][0], f"{r.top[i][1]:.6f}"] if i < len(r.top) else ["", ""]
        unknown = "" if r.error is not None else str(r.unknown).lower()
        distance = "" if r.distance is None else f"{r.distance:.4f}"
        writer.writerow([r.file] + cells + [unknown, distance, r.error or ""])


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``predict.py``."""
    p = tool_parser(
        "predict.py",
        "Predict the classes of images of any size and colour with a trained model "
        "(the preprocessing of training is applied). Folders are searched recursively.",
        "Exit codes: 0 at least one image predicted, 2 none predicted or the model cannot be used.",
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default: {DEFAULT_MODEL})")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, folders, and CSV files of pixels (one image per row, label column optional; "
                        "each row is reported as FILE:LINE)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: 3)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="write JSON to standard output")
    fmt.add_argument("--csv", action="store_true", help="write CSV to standard output")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="cpu (default: start-up is faster than the images take), cuda or auto")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="answer 'unknown' when the calibrated confidence is under P (0-1; 0: no confidence check). Default: the "
                        "model's threshold, the confidence that keeps 99%% of the correctly classified validation images")
    p.add_argument("--max-distance", type=float, metavar="D",
                   help="also answer 'unknown' when the squared Mahalanobis distance of the image's features to the "
                        "nearest class mean is over D (0: no distance check). Default: the model's threshold, the "
                        "distance that keeps 99%% of the correctly classified validation images (models trained "
                        "before it have none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``predict.py``; returns the exit code (130 on Ctrl+C, with nothing printed)."""
    with SignalGuard() as guard:
        return run_tool(build_parser(), lambda args: _run(args, guard), argv,
                        interrupted="no prediction was printed")


def _run(args: argparse.Namespace, guard: SignalGuard) -> int:
    if args.top_k <= 0:
        raise UserError(f"--top-k {args.top_k} must be at least 1")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size} must be positive, e.g. 256")
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise UserError(f"--min-confidence {args.min_confidence} must be a probability from 0 to 1, e.g. 0.5")
    if args.max_distance is not None and not (args.max_distance >= 0 and math.isfinite(args.max_distance)):
        raise UserError(f"--max-distance {args.max_distance} must be a finite distance of 0 or more (0: no distance check)")
    device = resolve_device(args.device)
    model, meta = load_inference_model(args.model, device)
    files = collect_files(args.inputs)
    if not files:
        raise UserError(f"no image files in {', '.join(args.inputs)} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    print(f"predicting {len(files)} image(s) with {printable(str(args.model))}", file=sys.stderr, flush=True)
    results = predict_files(model, meta, files, device, args.top_k, args.batch_size, args.min_confidence,
                            args.max_distance)
    k = max(1, min(args.top_k, len(meta["class_names"])))
    text = io.StringIO()
    if args.json:
        write_json(results, text)
    elif args.csv:
        write_csv(results, text, k)
    else:
        write_text(results, text)
    # Printed whole: a stop while it is written would leave half a JSON list or a CSV cut in a row.
    with guard.deferring("printing the predictions, then stopping"):
        sys.stdout.write(text.getvalue())
        sys.stdout.flush()
    if guard.stop_requested:
        raise guard.stopped(f"{guard.name} received while the predictions were printed: they are complete")
    done = sum(r.error is None for r in results)
    failed = len(results) - done
    unknown = sum(r.unknown for r in results if r.error is None)
    print(f"predicted {done} image(s)" + (f", {failed} could not be read" if failed else "")
          + (f"; {unknown} answered unknown (calibrated confidence under its threshold or feature distance over its own)"
             if unknown else ""), file=sys.stderr)
    if done == 0:
        print("error: no image could be predicted", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
