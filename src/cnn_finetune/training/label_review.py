"""Which training labels look wrong: the area under the margin (Pleiss et al. 2020), from the run itself.

For every training image the run keeps the sum, over the times it was trained on, of its *margin*:
the logit of its given label minus the largest other logit. An image whose label the network keeps
disagreeing with has a low (negative) average margin, the "area under the margin"; correctly
labelled hard images still climb above zero as training goes on. The score comes free from the
run: the margins are taken from the logits the training step has already computed (the augmented
forward pass of the step, in training mode), accumulated on the device with ``index_add_``; nothing
is read back to the host per step. It is training state: it lives in the checkpoint, so resuming or
extending a run gives the same sums as an uninterrupted run (bit for bit on the CPU).

Under several processes each rank adds the margins of its own share of the batch; the checkpoint
holds the totals (summed over the ranks when saved, given back to rank 0 alone on resume), as
``mechanisms.EpochMetrics`` does.

The review list itself (``label_review.csv``, ``write_review``) is written at the end of a run, with
the final model's preferred label and loss beside the score, and whether the run set the image aside
(``set_aside.py``): a queue for a person; nothing on disk is deleted or relabelled.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..files.checkpoint import atomic_write_bytes
from ..log import printable

COLUMNS = ("rank", "image", "given_label", "predicted_label", "score", "final_loss", "times_seen", "set_aside")


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Given-label logit minus the largest other logit, per row (float32, on the logits' device)."""
    z = logits.detach().float()
    given = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], float("-inf")).amax(1)
    return given - others


class MarginTracker:
    """Per-training-image running sums of the margin and how many times each image was trained on."""

    def __init__(self, num_images: int, device: torch.device | str) -> None:
        self.sums = torch.zeros(num_images, dtype=torch.float32, device=device)
        self.counts = torch.zeros(num_images, dtype=torch.int32, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def observe(self, idx: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the margins of the samples ``idx`` of a micro-batch until the step is known to count."""
        self._pending.append((idx, margins(logits, labels)))

    def discard(self) -> None:
        """Forget the margins of a step that is redone (after an out-of-memory error)."""
        self._pending.clear()

    def commit(self, good: torch.Tensor) -> None:
        """Add the step's margins; ``good`` (a 0-d bool tensor on the device) False: a skipped step adds nothing."""
        for idx, m in self._pending:
            ok = good & torch.isfinite(m)
            self.sums.index_add_(0, idx, torch.where(ok, m, 0.0))
            self.counts.index_add_(0, idx, ok.to(torch.int32))
        self._pending.clear()

    def state_dict(self, sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, torch.Tensor]:
        """CPU copies of the totals; ``sum_`` adds the ranks' shares up (a collective: every rank calls it)."""
        return {"margin_sum": sum_(self.sums.clone()).cpu(), "times_seen": sum_(self.counts.clone()).cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, owner: bool = True) -> None:
        """Restore ``state_dict``'s totals (``owner`` False: a rank that starts its share at 0). A checkpoint
        of an older version, or of other data size, has none: the sums start at 0 then."""
        self._pending.clear()
        self.sums.zero_()
        self.counts.zero_()
        if owner and state is not None and state["margin_sum"].shape == self.sums.shape:
            self.sums.copy_(state["margin_sum"])
            self.counts.copy_(state["times_seen"])

    def scores(self, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The area under the margin of every image: its mean margin (NaN for an image never trained on)."""
        s = state or self.state_dict()
        seen = s["times_seen"].to(torch.float64)
        return torch.where(seen > 0, s["margin_sum"].to(torch.float64) / seen.clamp_min(1), float("nan"))


def review_rows(state: dict[str, torch.Tensor], origin: Sequence[str], labels: torch.Tensor, predicted: torch.Tensor,
                losses: torch.Tensor, class_names: Sequence[str],
                set_aside: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """The review list, most suspect first: lowest area under the margin, ties by the higher final loss.

    ``predicted`` and ``losses``: the final model's prediction and loss on each (unaugmented) image.
    Images never trained on (possible with ``--balance sampler``) come last. ``set_aside``: the indices
    of the images that stopped counting in the loss half-way (``set_aside.py``), marked in the list.
    """
    aside = set(set_aside.tolist()) if set_aside is not None else set()
    seen = state["times_seen"].to(torch.float64)
    score = (state["margin_sum"].to(torch.float64) / seen.clamp_min(1)).tolist()
    never = (seen == 0).tolist()
    order = sorted(range(len(score)), key=lambda i: (never[i], score[i], -float(losses[i]), i))
    rows = []
    for rank, i in enumerate(order, 1):
        rows.append({"rank": rank, "image": origin[i], "index": i, "given_label": class_names[int(labels[i])],
                     "predicted_label": class_names[int(predicted[i])],
                     "score": None if never[i] else score[i], "final_loss": float(losses[i]),
                     "times_seen": int(seen[i]), "set_aside": i in aside})
    return rows


def write_review(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``label_review.csv`` (atomically): one row per training image, most suspect first.

    Names are written as ``log.printable`` shows them (bytes that are not UTF-8 escaped), so the file
    is valid UTF-8 whatever the user's file names hold.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        score = "" if r["score"] is None or math.isnan(r["score"]) else f"{r['score']:.6f}"
        writer.writerow([r["rank"], printable(str(r["image"])), printable(str(r["given_label"])),
                         printable(str(r["predicted_label"])), score, f"{r['final_loss']:.6f}", r["times_seen"],
                         "yes" if r.get("set_aside") else ""])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
