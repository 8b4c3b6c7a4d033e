"""Training images whose labels look wrong stop counting in the loss half-way through a run.

The run already keeps every training image's area under the margin (``label_review``: the mean, over
the times it was trained on, of its given label's logit minus the largest other logit). At the start of
epoch ``ceil(SET_ASIDE_AT x epochs) + 1`` the images with the lowest score, at most ``SET_ASIDE_MAX`` of
the split, get weight 0 in the loss for the rest of the run: the same sampling, the same steps, the same
batch denominator, so nothing else about the run changes. They stay in the label review (with a mark),
and nothing on disk is moved, deleted or relabelled.

Which images, and whether any, is training state: the decision is made once, from totals that are part
of the checkpoint, and the chosen indices are saved with it, so a resumed or extended run sets aside
the same images as an uninterrupted one (bit for bit on the CPU).

``set_aside`` "auto" is resolved when the run starts (``recipe.auto_set_aside``): on when fine-tuning classes
new to the base model, where it gained in the few-shot benchmark, off otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..files.rundir import LABEL_REVIEW

SET_ASIDE_AT = 0.5  # the share of the planned epochs after which the decision is made
SET_ASIDE_MAX = 0.05  # at most this share of the training split is set aside


@dataclass
class Decision:
    """What was set aside at the switch, and why (said in the log, the history and the checkpoint)."""

    epoch: int  # the epochs completed when it was decided
    images: torch.Tensor  # int64 indices into the training split (empty: none)
    note: str

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return {"epoch": self.epoch, "images": self.images.clone().cpu(), "note": self.note}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> "Decision | None":
        """The decision a checkpoint holds (None: not yet made, or a checkpoint from before this existed)."""
        if not state:
            return None
        return cls(int(state["epoch"]), torch.as_tensor(state["images"], dtype=torch.int64), str(state["note"]))


def switch_epoch(epochs: int) -> int:
    """Epochs completed when the decision is made: half of the planned ones, rounded up."""
    return math.ceil(SET_ASIDE_AT * epochs)


def lowest(scores: torch.Tensor, share: float = SET_ASIDE_MAX) -> torch.Tensor:
    """Indices of the ``share`` of images with the lowest score (ties by index), images never trained on excluded."""
    n = int(math.floor(share * scores.numel()))
    scores = scores.cpu()
    order = torch.sort(scores, stable=True).indices  # NaN sorts last; stable: ties by index
    order = order[torch.isfinite(scores[order])][:n]
    return torch.sort(order).values.to(torch.int64)


def decide(mode: str, scores: torch.Tensor, epoch: int) -> Decision:
    """The images set aside for the rest of the run from the margin scores: the lowest ``SET_ASIDE_MAX``
    with ``mode`` "on", none with "off" ("auto" is resolved when the run starts: ``recipe.auto_set_aside``)."""
    if mode == "off":
        return Decision(epoch, torch.zeros(0, dtype=torch.int64), "off")
    if mode != "on":
        raise ValueError(f"set_aside {mode!r} should have been resolved to on or off when the run started")
    chosen = lowest(scores)
    return Decision(epoch, chosen, f"the {chosen.numel()} lowest-margin training images ({SET_ASIDE_MAX:.0%} of them)")


def at_switch(mode: str, steps: Any, sum_: Callable[[torch.Tensor], torch.Tensor], epoch: int, history: Any,
              log: Callable[[str], None]) -> Decision:
    """Decide (``decide``) from the step runner ``steps``' margin scores, summed over the ranks by ``sum_`` (a
    collective: every rank calls this at the same epoch), and apply it; with "on" the history gets the event
    and the log a line."""
    # "off" needs no scores: every rank skips the collective alike (the mode is the run's, the same on all).
    scores = torch.zeros(0) if mode == "off" else steps.review.scores(steps.review.state_dict(sum_))
    decision = decide(mode, scores, epoch)
    steps.set_aside(decision.images)
    if mode == "on":
        history.event("set_aside", epoch=epoch + 1, images=int(decision.images.numel()), note=decision.note)
        log(f"set_aside: {decision.note} stop counting in the loss from epoch {epoch + 1} on (marked in {LABEL_REVIEW})")
    return decision


def restore(state: dict[str, Any] | None, steps: Any) -> Decision | None:
    """The decision a checkpoint holds, applied to the step runner ``steps`` (none yet: every image counts)."""
    decision = Decision.from_state(state)
    steps.set_aside(decision.images if decision is not None else torch.zeros(0, dtype=torch.int64))
    return decision
