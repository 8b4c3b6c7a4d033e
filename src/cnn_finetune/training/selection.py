"""Which weights of a finished run become ``best_model_finetuned.pth`` (``model_selection``).

The best-validation epoch is chosen on the validation split; on the few hundred images our users bring
that split has a few dozen images (3 per class at 30 per class), and its best epoch is mostly the one
that happened to get two or three more of them right, in the middle of the run, at a high learning
rate. The final weights, at the end of the schedule's annealing, mostly test as well or better
(docs/PERFORMANCE.md, section 7: 7 sets, 3 seeds on three of them and 1-2 on the others): above the best
epoch's on the mean of 6 of the 7 sets (+0.1 on digits, +0.6 on the turned digits, +0.8 on 10 letters per
class) and 0.03 below on the seventh; on 30 letters per class the sign depends on the thread count (+0.08
with 2 threads, -0.37 with 1).

So with ``auto`` (the default) the final weights are kept unless the best epoch is right on
*significantly* more validation images than they are: a one-sided exact McNemar (sign) test on the
images where the two disagree, at ``SIGNIFICANCE``. The images kept apart for the temperature take no
part (they stay unseen by every choice). With a large validation split a real gap is detected and the
best epoch kept, as before; ``best`` always keeps it, ``last`` always takes the final weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..files.checkpoint import link_or_copy, load_checkpoint, save_checkpoint
from ..files.rundir import RunDir
from ..log import logger
from .checkpoint_manager import add_to_best_model, load_latest

SIGNIFICANCE = 0.05  # the best epoch is kept when the final weights' deficit is this unlikely by chance
MODEL_KEYS = ("model", "epoch", "metrics", "calibration", "selection")  # what is the epoch's own, not the run's


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: the chance of at least ``wins`` wins in ``wins + losses`` fair coin tosses
    (McNemar's exact test on the images only one of two models gets right)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


@dataclass
class Selection:
    """The choice between the best-validation epoch and the final one, and its evidence."""

    rule: str  # auto, best or last
    best_epoch: int
    final_epoch: int
    images: int  # validation images compared (the calibration part left out)
    best_only: int  # images only the best epoch gets right
    final_only: int  # images only the final weights get right
    p_value: float
    kept_epoch: int

    def record(self) -> dict[str, Any]:
        """What ``best_model_finetuned.pth`` and the reports say about it."""
        return {"rule": self.rule, "kept_epoch": self.kept_epoch, "best_validation_epoch": self.best_epoch,
                "final_epoch": self.final_epoch, "validation_images": self.images, "only_best_right": self.best_only,
                "only_final_right": self.final_only, "p_value": round(self.p_value, 6), "significance": SIGNIFICANCE}

    def note(self) -> str:
        """One line for the log: which weights and why."""
        evidence = (f"on {self.images} validation images epoch {self.best_epoch} alone gets {self.best_only} right, "
                    f"the final epoch {self.final_epoch} alone {self.final_only}")
        if self.rule != "auto":
            return f"model_selection: {self.rule}: epoch {self.kept_epoch} ({evidence})"
        verdict = (f"p = {self.p_value:.3f}, under {SIGNIFICANCE}: the best epoch is kept" if self.kept_epoch == self.best_epoch
                   else f"p = {self.p_value:.3f}, not under {SIGNIFICANCE}: no significant gain, the final weights are kept")
        return f"model_selection: auto: epoch {self.kept_epoch} ({evidence}; {verdict})"


def select_model(run: RunDir, rule: str, right: Callable[[dict[str, Any]], torch.Tensor]) -> Selection | None:
    """Make ``best_model_finetuned.pth`` the weights ``rule`` picks from a finished run (see the module
    docstring); returns the choice, or None when there is nothing to choose (the best epoch is the final
    one, the run is not finished, or ``rule`` is ``best`` with nothing to record). ``right(state)``: which of
    the selection images the model of a model file's ``state`` gets right (a bool tensor; the caller runs the
    inference, as the tools do it).

    Idempotent: the inputs are the best-epoch file the run's checkpoint names and the checkpoint's final
    weights, so redoing it (reports redrawn after a crash) gives the same file.
    """
    if rule == "best":
        return None  # best_model_finetuned.pth already is the best epoch's file
    state = load_latest(run).state
    entries = ((state or {}).get("best_keeper") or {}).get("entries") or []
    if state is None or not state.get("finished") or not entries or not state.get("history"):
        return None
    best_entry, final = entries[0], state["history"][-1]
    final_epoch = int(final["epoch"])
    if int(best_entry["epoch"]) == final_epoch or not (run / best_entry["file"]).is_file():
        return None
    best_state = load_checkpoint(run / best_entry["file"])
    averaged = state.get("averaged")
    final_state = {**{k: v for k, v in best_state.items() if k not in MODEL_KEYS},
                   "model": averaged["model"] if averaged else state["model"], "epoch": final_epoch,
                   "metrics": {k: final[k] for k in ("val_acc", "val_loss", "train_loss", "train_acc") if k in final}}
    best_right, final_right = right(best_state), right(final_state)
    best_only = int((best_right & ~final_right).sum())
    final_only = int((final_right & ~best_right).sum())
    p = sign_test_p(best_only, final_only)
    keep_best = rule == "auto" and p < SIGNIFICANCE
    choice = Selection(rule, int(best_entry["epoch"]), final_epoch, len(best_right), best_only, final_only, p,
                       int(best_entry["epoch"]) if keep_best else final_epoch)
    # The kept weights' best-epoch file when they have one (the final epoch may be in the top K too):
    # best_model_finetuned.pth stays a hard link to it, as during training; else a file of its own.
    twin = next((e["file"] for e in entries if int(e["epoch"]) == choice.kept_epoch and (run / e["file"]).is_file()), None)
    if twin is not None:
        link_or_copy(run / twin, run.best)
        add_to_best_model(run, {"selection": choice.record()})
    else:
        save_checkpoint({**final_state, "selection": choice.record()}, run.best)
    logger.info(choice.note())
    return choice
