"""Pictures of a run: training curves (after every epoch) and confusion matrices (after evaluation).

Matplotlib is used through its object API only (``Figure`` + ``FigureCanvasAgg``): no pyplot, so no
global figure registry that leaks memory when the trainer redraws the curves every epoch, no GUI
backend that needs a display, and nothing that changes other code's matplotlib state. Matplotlib is
imported inside the functions, so importing this module (and the trainer) stays cheap. PNG files are
rendered in memory and written with ``atomic_write_bytes``: a reader never sees half a picture.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Sequence

from ..files.checkpoint import atomic_write_bytes
from ..log import printable
from ..training.mechanisms import MODE_OF_METRIC, is_better

# How each kind of history event is drawn: (colour, marker, legend text). Unknown kinds get OTHER.
EVENT_STYLE: dict[str, tuple[str, str, str]] = {
    "resumed": ("tab:purple", ">", "resumed"),
    "retry": ("tab:red", "X", "retry after error"),
    "oom": ("tab:brown", "s", "out of memory"),
    "nan_rollback": ("magenta", "v", "NaN rollback"),
    "nan_skipped": ("tab:olive", "*", "NaN steps skipped"),
}
OTHER_EVENT = ("tab:gray", "d", "other event")
TRAIN_COLOUR, VAL_COLOUR, BEST_COLOUR = "tab:blue", "tab:orange", "tab:green"


def _num(value: Any) -> float:
    """A history value as a float; JSON null (how NaN is stored) and missing values become NaN."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def best_record(history: Sequence[dict[str, Any]], monitor: str = "val_acc") -> dict[str, Any] | None:
    """The record of the best epoch: the last one the trainer flagged ``best``, else the best ``monitor``.

    The trainer sets ``best`` only when an epoch becomes the new best, so the last flagged record is
    the epoch whose weights are in ``best_model_finetuned.pth``. Histories without the flag (older
    files, hand-made ones) fall back to comparing the metric, earliest epoch winning ties, as the
    trainer does; NaN never wins.
    """
    flagged = [r for r in history if r.get("best")]
    if flagged:
        return flagged[-1]
    mode = MODE_OF_METRIC.get(monitor, "max")
    best: dict[str, Any] | None = None
    for record in history:
        value = _num(record.get(monitor))
        if is_better(value, _num(best.get(monitor)) if best else None, mode):
            best = record
    return best


class CurveRefresher:
    """Redraws the training curves after an epoch, unless that would take more than ``share`` of the time.

    A redraw costs about 0.15 s on a laptop CPU. After epochs of several seconds every epoch is
    drawn; with very short epochs (a GPU, a small dataset) the picture is refreshed every few epochs
    instead, so that drawing never slows training by more than ``share`` (2%). The final picture is
    always drawn at the end of training.
    """

    def __init__(self, path: Path, monitor: str = "val_acc", share: float = 0.02) -> None:
        self.path = Path(path)
        self.monitor = monitor
        self.share = share
        self._cost: float | None = None  # seconds the last redraw took
        self._done_at = 0.0  # when it ended

    def __call__(self, history: list[dict[str, Any]]) -> bool:
        """Redraw if it is due; returns whether it did."""
        now = time.monotonic()
        if self._cost is not None and now - self._done_at < self._cost / self.share:
            return False
        plot_training_curves(history, self.path, self.monitor)
        self._done_at = time.monotonic()
        self._cost = self._done_at - now
        return True


def _event_points(history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, int]]]:
    """``{event type: [(epoch, count), ...]}``; skipped NaN steps count as an event of their own."""
    points: dict[str, dict[float, int]] = {}
    for record in history:
        epoch = _num(record.get("epoch"))
        kinds = [str(e.get("type", "event")) for e in record.get("events") or [] if isinstance(e, dict)]
        kinds += ["nan_skipped"] * (1 if (record.get("nan_skipped") or 0) > 0 else 0)
        for kind in kinds:
            per_epoch = points.setdefault(kind, {})
            per_epoch[epoch] = per_epoch.get(epoch, 0) + 1
    return {k: sorted(v.items()) for k, v in points.items()}


def render_png(fig: Any, dpi: int) -> bytes:
    """Render a matplotlib ``Figure`` with the Agg canvas into PNG bytes (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to the figure
    buf = io.BytesIO()
    # No creation-time metadata: the same history gives the same bytes.
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def plot_training_curves(history: list[dict[str, Any]], path: Path, monitor: str = "val_acc") -> None:
    """Draw loss and accuracy (train and validation) per epoch into the PNG file ``path``.

    The best epoch (see ``best_record``) is marked with a green line and star; events recorded in the
    history (resumed, retry, oom, nan_rollback, skipped NaN steps...) are marked at their epoch, with
    a count when one happened several times. Values stored as null (NaN) leave a gap. An empty
    history writes nothing. Cheap enough to call after every epoch (about 0.1-0.3 s, plus about
    0.3 s for importing matplotlib once per process).
    """
    if not history:
        return
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    epochs = [_num(r.get("epoch", i + 1)) for i, r in enumerate(history)]
    few = len(history) <= 40  # markers show single epochs; on long runs they only add clutter
    fig = Figure(figsize=(11, 4.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    panels = (
        (ax_loss, "loss", 1.0, "loss (cross-entropy)"),
        (ax_acc, "acc", 100.0, "accuracy (%)"),
    )
    for ax, key, scale, ylabel in panels:
        for split, colour, label in (("train", TRAIN_COLOUR, "train"), ("val", VAL_COLOUR, "validation")):
            values = [_num(r.get(f"{split}_{key}")) * scale for r in history]
            ax.plot(epochs, values, color=colour, label=label, lw=1.6,
                    marker="o" if few else None, ms=3.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:  # one point: give the axis some width so the point is not on the frame
        for ax in (ax_loss, ax_acc):
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)

    handles: list[Any] = [
        Line2D([], [], color=TRAIN_COLOUR, lw=1.6, label="train"),
        Line2D([], [], color=VAL_COLOUR, lw=1.6, label="validation"),
    ]
    title = f"{len(history)} epoch{'s' if len(history) != 1 else ''}"
    best_label = _mark_best(panels, history, monitor, handles)
    if best_label:
        title += f"; {best_label}"
    _mark_events((ax_loss, ax_acc), history, handles)

    ax_loss.set_title("loss", fontsize=11)
    ax_acc.set_title("accuracy", fontsize=11)
    fig.suptitle(f"Training curves: {title}", fontsize=11)
    ncol = min(len(handles), 4)
    rows = math.ceil(len(handles) / ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8.5, frameon=False)
    # Fixed margins instead of a layout engine: cheaper, and the layout does not jump between epochs.
    fig.subplots_adjust(left=0.065, right=0.985, top=0.87, bottom=0.2 + 0.045 * (rows - 1), wspace=0.22)
    atomic_write_bytes(Path(path), render_png(fig, dpi=100))


def _mark_best(panels: Sequence[tuple[Any, str, float, str]], history: list[dict[str, Any]], monitor: str,
               handles: list[Any]) -> str:
    """A green line and star at the best epoch on every panel; returns its legend text ('' when none)."""
    from matplotlib.lines import Line2D

    best = best_record(history, monitor)
    if best is None:
        return ""
    b_epoch = _num(best.get("epoch"))
    metric = _num(best.get(monitor))
    if math.isnan(metric):
        text = "n/a"
    else:
        text = f"{100 * metric:.2f}%" if monitor.endswith("acc") else f"{metric:.4f}"
    for ax, key, scale, _ in panels:
        ax.axvline(b_epoch, color=BEST_COLOUR, ls="--", lw=1.2, alpha=0.9)
        # The star sits on the monitored curve (validation), where the decision was made.
        ax.plot([b_epoch], [_num(best.get(f"val_{key}")) * scale], marker="*", ms=14,
                color=BEST_COLOUR, mec="black", mew=0.6, zorder=5)
    best_label = f"best epoch {int(b_epoch)} ({monitor} {text})"
    handles.append(Line2D([], [], color=BEST_COLOUR, ls="--", marker="*", ms=10, mec="black", mew=0.6, label=best_label))
    return best_label


def _mark_events(axes: Sequence[Any], history: list[dict[str, Any]], handles: list[Any]) -> None:
    """A dotted line and a marker at each epoch with events (resumed, retry, oom, ...), with counts."""
    from matplotlib.lines import Line2D

    events = _event_points(history)
    if events:  # headroom for the strip of event markers, so they do not sit on the curves
        for ax in axes:
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.12 * (hi - lo))
    for kind, points in events.items():
        colour, marker, label = EVENT_STYLE.get(kind, OTHER_EVENT)
        if kind not in EVENT_STYLE:
            label = kind.replace("_", " ")
        total = sum(c for _, c in points)
        for ax in axes:
            for x, count in points:
                ax.axvline(x, color=colour, ls=":", lw=1.2, alpha=0.8)
                # Marker in a strip along the top of the axes (x in data, y in axes coordinates),
                # so events never hide the curves and stay visible whatever the y range.
                ax.plot([x], [0.96], marker=marker, color=colour, ms=8, mec="black", mew=0.4,
                        transform=ax.get_xaxis_transform(), clip_on=False, zorder=6)
                if count > 1:
                    ax.annotate(f"x{count}", (x, 0.96), xycoords=ax.get_xaxis_transform(), xytext=(5, -3),
                                textcoords="offset points", fontsize=7, color=colour)
        handles.append(Line2D([], [], color=colour, ls=":", marker=marker, ms=7, mec="black", mew=0.4,
                              label=f"{label} ({total})"))


def confusion_figure_geometry(num_classes: int) -> dict[str, float]:
    """Sizes that keep a confusion matrix readable from 2 to a few hundred classes.

    Cells shrink with the number of classes down to a floor (past which the figure grows instead),
    the font follows the cell size, and cell annotations are drawn only where a number fits.
    """
    n = max(1, num_classes)
    cell = min(0.62, max(0.24, 7.0 / n))  # inches per cell
    cell = min(cell, 36.0 / n)  # beyond ~150 classes keep the picture below ~40 inches
    tick_pt = min(11.0, max(5.0, cell * 72 * 0.55))
    annotate = cell * 72 >= 20 and n <= 30  # a two-digit number needs ~20 pt of cell
    annot_pt = min(10.0, cell * 72 * 0.36)
    side = n * cell
    # Titles and axis labels grow with the picture so that they stay legible when it is viewed scaled down.
    title_pt = min(20.0, max(12.0, side * 0.9))
    return {"cell": cell, "side": side, "tick_pt": tick_pt, "annotate": float(annotate), "annot_pt": annot_pt,
            "title_pt": title_pt, "label_pt": title_pt - 1}


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path,
                          title: str = "Confusion matrix") -> None:
    """Write a row-normalised confusion matrix (rows: true class, columns: predicted) as a PNG.

    Each row shows where the images of one true class went, as a share of that class; rows of classes
    without samples are grey. A square-root colour scale makes small confusions visible next to a
    bright diagonal. Figure size, fonts and cell annotations scale with the number of classes. Class
    names are drawn as plain text (a name like ``$^$`` is not read as math markup).
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    class_names = [printable(str(c)) for c in class_names]  # drawable text, also for undecodable folder names
    counts = np.asarray(matrix, dtype=np.float64)
    n = counts.shape[0]
    if counts.shape != (n, n) or n != len(class_names):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {len(class_names)} class names")
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / support[:, None]  # rows without samples become NaN: drawn grey
    geo = confusion_figure_geometry(n)
    long_label = max((len(str(c)) for c in class_names), default=1)
    label_in = geo["tick_pt"] / 72 * 0.62 * (long_label + (8 if n <= 30 else 0)) + 0.6
    fig = Figure(figsize=(geo["side"] + label_in + 1.8, geo["side"] + label_in + 1.0), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["Blues"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                      interpolation="nearest", aspect="equal")
    _confusion_labels(ax, class_names, support, geo, long_label)
    if geo["annotate"]:
        _annotate_cells(ax, share, counts, geo)
    total = counts.sum()
    accuracy = f"{100 * np.trace(counts) / total:.2f}%" if total else "n/a"
    notes = ["numbers: % of the true class"] if geo["annotate"] else []
    if (support == 0).any():
        notes.append("grey rows: no images of that class")
    fig.suptitle(f"{printable(title)}\n{int(total)} images, accuracy {accuracy}" + ("; " if notes else "") + "; ".join(notes),
                 fontsize=geo["title_pt"], parse_math=False)
    bar = fig.colorbar(image, ax=ax, fraction=0.035 if n > 30 else 0.046, pad=0.04 if n > 30 else 0.02, shrink=0.6 if n > 30 else 1.0)
    bar.set_ticks([0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0])
    bar.set_ticklabels(["0%", "1%", "5%", "10%", "25%", "50%", "75%", "100%"])
    bar.ax.tick_params(labelsize=geo["label_pt"] - 2)
    bar.set_label("share of the true class (row), square-root scale", fontsize=geo["label_pt"] - 1)
    atomic_write_bytes(Path(path), render_png(fig, dpi=100))


def _confusion_labels(ax: Any, class_names: Sequence[str], support: Any, geo: dict[str, float], long_label: int) -> None:
    """Class names on both axes (plain text), with the number of images per true class on small matrices."""
    import numpy as np

    n = len(class_names)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([str(c) for c in class_names], fontsize=geo["tick_pt"], parse_math=False,
                       rotation=0 if long_label * geo["tick_pt"] * 0.62 <= geo["cell"] * 72 else 90)
    ylabels = [f"{c} (n={int(s)})" if n <= 30 else str(c) for c, s in zip(class_names, support)]
    ax.set_yticklabels(ylabels, fontsize=geo["tick_pt"], parse_math=False)
    ax.set_xlabel("predicted class", fontsize=geo["label_pt"])
    ax.set_ylabel("true class", fontsize=geo["label_pt"])
    ax.tick_params(length=2)
    if n > 30:
        # On a large matrix the labels are far from most cells: repeat them on all four sides, and
        # faint grid lines help follow a row or column across.
        ax.tick_params(top=True, labeltop=True, right=True, labelright=True)
        ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
        ax.grid(which="minor", color="white", lw=0.3)
        ax.tick_params(which="minor", length=0)


def _annotate_cells(ax: Any, share: Any, counts: Any, geo: dict[str, float]) -> None:
    """The share of each non-empty cell, in percent."""
    import numpy as np

    n = share.shape[0]
    for i in range(n):
        for j in range(n):
            value = share[i, j]
            if not np.isfinite(value) or counts[i, j] == 0:
                continue  # blank zero cells: the eye goes to the confusions that exist
            text = f"{100 * value:.0f}" if value >= 0.005 else "<1"
            ax.text(j, i, text, ha="center", va="center", fontsize=geo["annot_pt"],
                    color="white" if value > 0.3 else "black")


def plot_reliability(report: dict[str, Any], path: Path) -> None:
    """The reliability diagram of an evaluation report: accuracy against calibrated confidence per bin
    (``report["reliability"]``), the diagonal of perfect calibration, and the share of images per bin."""
    import numpy as np
    from matplotlib.figure import Figure

    bins = report["reliability"]
    lo = np.array([b["lo"] for b in bins])
    width = bins[0]["hi"] - bins[0]["lo"]
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    counts = np.array([b["count"] for b in bins], dtype=np.float64)
    fig = Figure(figsize=(5.2, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(lo, np.nan_to_num(acc), width=width, align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
    top.bar(lo, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=width, align="edge", color="#dd8452",
            alpha=0.5, edgecolor="white", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    ece, raw = report.get("ece"), report.get("ece_uncalibrated")
    top.set_title(f"Reliability (temperature {report.get('temperature', 1.0):.3f})\nECE "
                  + (f"{100 * ece:.2f}%" if ece is not None else "n/a")
                  + (f", uncalibrated {100 * raw:.2f}%" if raw is not None else ""), fontsize=10)
    bottom.bar(lo, counts / max(counts.sum(), 1), width=width, align="edge", color="#8c8c8c", edgecolor="white")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("calibrated confidence")
    bottom.set_ylabel("share of images")
    atomic_write_bytes(Path(path), render_png(fig, dpi=90))
