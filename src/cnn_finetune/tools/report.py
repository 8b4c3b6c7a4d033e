"""``report.html``: one self-contained page to look at after a run (or an evaluation).

The page holds the training curves, the confusion matrix, per-class precision and recall, the most
confused pairs with thumbnails of the images behind them, the images with the highest loss, the top
of ``label_review.csv`` as thumbnails, the reliability diagram and the run's events (resumes,
retries, out-of-memory, rollbacks). Every picture is embedded as a ``data:`` URI and the page loads
nothing else (no script, no font, no stylesheet from the network), so it opens from the disk in any
browser, also offline, and can be mailed as one file.

The HTML comes from a Jinja2 template shipped as package data (``tools/templates/report.html.j2``)
with autoescaping on: class names and file names come from the user and are shown as text, never
read as markup (``log.printable`` first turns bytes that are not UTF-8 into visible escapes). The
file is written atomically, like every artifact.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..files.checkpoint import atomic_write_bytes
from ..log import printable

TEMPLATE = "report.html.j2"
TOP_PAIRS = 10  # most confused pairs shown
PAIR_IMAGES = 8  # thumbnails per pair
WORST = 24  # highest-loss images shown
REVIEW = 24  # label-review rows shown
DUPLICATE_FILES = 4  # file names shown per picture under two labels (all are in the JSON report)
EVENT_TYPES = ("resumed", "retry", "oom", "oom_probe", "nan_rollback", "extended")


@dataclass
class ReportInputs:
    """What a report is made of; every part but the evaluation is optional."""

    title: str
    evaluation: dict[str, Any]  # evaluate.evaluate_arrays's report (with predictions and confidences)
    images: torch.Tensor  # uint8 N x 1 x 28 x 28, the evaluated images, in the evaluation's order
    labels: torch.Tensor  # their given labels (indices into class_names)
    class_names: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    review: list[dict[str, Any]] | None = None  # label_review rows (training.label_review.review_rows)
    review_images: torch.Tensor | None = None  # the training images the review rows' "index" points into
    pictures: dict[str, Path] = field(default_factory=dict)  # "curves", "confusion", "reliability" -> PNG files
    duplicates: dict[str, Any] | None = None  # data.duplicates.find_duplicates's report (None: not checked)
    duplicate_pictures: Sequence[torch.Tensor] = ()  # one image per listed group under two labels, in its order


def png_uri(data: bytes) -> str:
    """A ``data:`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail(image: torch.Tensor) -> str:
    """A 28x28 uint8 image (1 x 28 x 28) as a PNG ``data:`` URI (shown enlarged, pixelated, by the page)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.reshape(28, 28).numpy(), mode="L").save(buf, format="PNG", optimize=True)
    return png_uri(buf.getvalue())


def confused_pairs(inputs: ReportInputs) -> list[dict[str, Any]]:
    """The most confused (true, predicted) pairs with thumbnails of their first images."""
    preds = torch.tensor(inputs.evaluation["predictions"], dtype=torch.int64)
    labels = inputs.labels.to(torch.int64).cpu()
    c = len(inputs.class_names)
    wrong = preds != labels
    counts = torch.bincount(labels[wrong] * c + preds[wrong], minlength=c * c)
    support = torch.bincount(labels, minlength=c)
    pairs = []
    for flat in torch.argsort(counts, descending=True, stable=True)[:TOP_PAIRS].tolist():
        if int(counts[flat]) == 0:
            break
        i, j = divmod(flat, c)
        which = torch.nonzero((labels == i) & (preds == j)).flatten()[:PAIR_IMAGES].tolist()
        pairs.append({"true": printable(inputs.class_names[i]), "predicted": printable(inputs.class_names[j]),
                      "count": int(counts[flat]), "share": int(counts[flat]) / max(int(support[i]), 1),
                      "thumbs": [thumbnail(inputs.images[k]) for k in which]})
    return pairs


def worst_images(inputs: ReportInputs) -> list[dict[str, Any]]:
    """The evaluated images with the highest loss (lowest calibrated probability of the given label)."""
    ev = inputs.evaluation
    probs = ev.get("label_probabilities") or []
    order = sorted(range(len(probs)), key=lambda k: (probs[k], k))[:WORST]
    names = inputs.class_names
    return [{"thumb": thumbnail(inputs.images[k]), "given": printable(names[int(inputs.labels[k])]),
             "predicted": printable(names[ev["predictions"][k]]), "confidence": ev["confidences"][k],
             "label_probability": probs[k]} for k in order]


def review_items(inputs: ReportInputs) -> list[dict[str, Any]]:
    """The top of the label review, with thumbnails when the training images are at hand."""
    out = []
    for row in (inputs.review or [])[:REVIEW]:
        thumb = thumbnail(inputs.review_images[row["index"]]) if inputs.review_images is not None and "index" in row else None
        out.append({"rank": row["rank"], "image": printable(str(row["image"])), "given": printable(str(row["given_label"])),
                    "predicted": printable(str(row["predicted_label"])), "score": row["score"], "thumb": thumb,
                    "aside": bool(row.get("set_aside"))})
    return out


def duplicate_items(inputs: ReportInputs) -> list[dict[str, Any]]:
    """The listed pictures under two or more labels: a thumbnail, the labels and (the first few of) the files."""
    groups = ((inputs.duplicates or {}).get("across_classes") or {}).get("examples") or []
    pictures = inputs.duplicate_pictures
    out = []
    for k, g in enumerate(groups):
        files = [{"image": printable(str(x["image"])), "label": printable(str(x["label"]))} for x in g["images"]]
        out.append({"thumb": thumbnail(pictures[k]) if k < len(pictures) else None,
                    "labels": ", ".join(printable(str(n)) for n in g["labels"]), "files": files[:DUPLICATE_FILES],
                    "more": max(0, len(files) - DUPLICATE_FILES)})
    return out


def run_events(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Resumes, retries, out-of-memory splits, rollbacks and extensions, with the epoch they happened in."""
    events = []
    for record in history:
        for ev in record.get("events") or []:
            detail = ", ".join(f"{k}: {printable(str(v))}" for k, v in ev.items() if k != "type")
            events.append({"epoch": record.get("epoch"), "type": printable(str(ev.get("type"))), "detail": detail})
    return events


def render(inputs: ReportInputs) -> str:
    """The page as text."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(Path(__file__).with_name("templates"))), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    ev = inputs.evaluation
    pictures = {k: png_uri(p.read_bytes()) for k, p in inputs.pictures.items() if p is not None and p.is_file()}
    per_class = [{**c, "class": printable(str(c["class"]))} for c in ev.get("per_class", [])]
    return env.get_template(TEMPLATE).render(
        title=printable(inputs.title), created=time.strftime("%Y-%m-%d %H:%M:%S"), ev=ev, per_class=per_class,
        source=printable(str((ev.get("data") or {}).get("source", ""))), pictures=pictures,
        pairs=confused_pairs(inputs), worst=worst_images(inputs), review=review_items(inputs),
        has_review=inputs.review is not None, aside=sum(bool(r.get("set_aside")) for r in inputs.review or []),
        events=run_events(inputs.history), epochs=len(inputs.history),
        duplicates=duplicate_items(inputs), dup=inputs.duplicates)


def write_report(path: Path, inputs: ReportInputs) -> Path:
    """Render ``inputs`` and write the page to ``path`` atomically; returns ``path``."""
    atomic_write_bytes(Path(path), render(inputs).encode("utf-8"))
    return Path(path)
