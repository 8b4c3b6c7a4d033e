"""The save policy of a run: which checkpoint files exist, when they are written, what they hold.

``CheckpointManager`` keeps ``checkpoint_last.pth`` (the previous one becomes
``checkpoint_prev.pth``), saves it periodically (every N steps or T seconds), keeps the K best epochs
as separate files with ``best_model_finetuned.pth`` as a hard link to the best, writes
``history.json``, and tidies what a killed run left (best-epoch files the checkpoint does not know,
damaged checkpoints). How bytes reach the disk is ``checkpoint.py``'s business; the names are
``rundir.py``'s. Two promises hold for every file it writes: a file that cannot be written is written
again from the same state after a cool-down (``on_write_error``, the trainer's retry budget), and
once no retry is left stops the run (``ArtifactWriteError``, exit 1) instead of training on without
it; and no weights that are NaN or infinite are ever saved, so a rollback always finds finite weights.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from ..files.checkpoint import atomic_write_bytes, atomic_write_json, link_or_copy, load_newest_valid, save_checkpoint
from ..errors import ArtifactWriteError
from ..log import logger
from ..model.loading import all_finite
from .mechanisms import MODE_OF_METRIC
from .state_check import check_training_state
from ..files.loggers import metrics_csv
from ..files.rundir import HISTORY, METRICS, RunDir, best_epoch_name, is_best_epoch_name


class BestKeeper:
    """Keeps the K best epochs as separate files, deleting the (K+1)-th; the list survives restarts.

    Epochs are ranked by the monitored metric; equal metrics (frequent for accuracy on a small
    validation set) are ranked by a second metric (``val_loss`` when monitoring ``val_acc``), and
    then by epoch, the earlier first.
    """

    TIEBREAK = {"val_acc": ("val_loss", "min"), "val_loss": ("val_acc", "max")}

    def __init__(self, folder: Path, k: int, mode: str, tiebreak_mode: str = "min") -> None:
        self.folder = Path(folder)
        self.k = k
        self.mode = mode
        self.tiebreak_mode = tiebreak_mode
        self.entries: list[dict[str, Any]] = []  # sorted best first: {"metric", "tiebreak", "epoch", "file"}

    def file_name(self, epoch: int, metric: float, metric_name: str) -> str:
        """File name of an epoch's checkpoint: ``best_epoch012_val_acc0.9920.pth``."""
        return best_epoch_name(epoch, metric, metric_name)

    def _rank(self, metric: float, tiebreak: float | None, epoch: int) -> tuple[float, float, int]:
        t = 0.0 if tiebreak is None or math.isnan(tiebreak) else (tiebreak if self.tiebreak_mode == "min" else -tiebreak)
        return (-metric if self.mode == "max" else metric, t, epoch)

    def would_keep(self, metric: float, tiebreak: float | None = None, epoch: int = 1 << 30) -> bool:
        """True when an epoch with this metric enters the top K."""
        if self.k <= 0 or metric is None or math.isnan(metric):
            return False
        if len(self.entries) < self.k:
            return True
        last = self.entries[-1]
        return self._rank(metric, tiebreak, epoch) < self._rank(last["metric"], last.get("tiebreak"), last["epoch"])

    def add(self, epoch: int, metric: float, file: str, tiebreak: float | None = None) -> list[str]:
        """Record an entry already written to ``file``; returns the files that fell out (to delete)."""
        self.entries = [e for e in self.entries if e["epoch"] != epoch]
        self.entries.append({"metric": float(metric), "tiebreak": None if tiebreak is None else float(tiebreak),
                             "epoch": int(epoch), "file": file})
        self.entries.sort(key=lambda e: self._rank(e["metric"], e.get("tiebreak"), e["epoch"]))
        dropped = [e["file"] for e in self.entries[self.k:]]
        self.entries = self.entries[: self.k]
        return dropped

    def best(self) -> dict[str, Any] | None:
        """The best entry so far, or None."""
        return self.entries[0] if self.entries else None

    def stray_files(self) -> list[Path]:
        """Best-epoch files on disk that the list does not know (left by a run killed mid-epoch)."""
        known = {e["file"] for e in self.entries}
        return sorted(p for p in self.folder.glob("best_epoch*.pth") if is_best_epoch_name(p.name) and p.name not in known)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for the checkpoint."""
        return {"mode": self.mode, "entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the list saved by ``state_dict``."""
        self.mode = state["mode"]
        self.entries = [dict(e) for e in state["entries"]]
        if len(self.entries) > self.k:  # keep_best lowered on resume
            self.entries = self.entries[: self.k]


@dataclass
class Loaded:
    """The newest checkpoint that verifies (``state`` None: none does), and the damaged ones met before it."""

    state: dict[str, Any] | None
    path: Path | None
    problems: list[str] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)


def load_latest(run: RunDir) -> Loaded:
    """The newest checkpoint of ``run`` that verifies, and the damaged ones met before it; reads only."""
    candidates = run.resume_candidates()
    # The checksum has no key: a forged checkpoint verifies, so its fields are checked as input too.
    state, path, problems = load_newest_valid(candidates, lambda s, p: check_training_state(s, run, p))
    newer = candidates[: candidates.index(path)] if path is not None else candidates
    return Loaded(state, path, problems, [p for p in newer if p.exists()])


def add_to_best_model(run: RunDir, extra: dict[str, Any]) -> None:
    """Write ``extra`` (e.g. the calibration fitted after training) into ``best_model_finetuned.pth`` and the
    best-epoch file it is a link to, so both stay one file; each is rewritten atomically, checksummed."""
    from ..files.checkpoint import load_checkpoint

    state = {**load_checkpoint(run.best), **extra}
    twins = [p for p in run.path.iterdir() if is_best_epoch_name(p.name) and os.path.samefile(p, run.best)]
    if twins:
        save_checkpoint(state, twins[0])
        link_or_copy(twins[0], run.best)
    else:
        save_checkpoint(state, run.best)


class CheckpointManager:
    """Writes the checkpoints, best-K files and history of one run folder; reads them back."""

    def __init__(self, run: RunDir, *, monitor: str, keep_best: int, every_steps: int = 0,
                 every_seconds: float = 0.0, writer: bool = True) -> None:
        self.run = run
        # Under several processes every rank keeps the same state (best-K list, timers) and rank 0 alone,
        # the writer, touches files.
        self.writer = writer
        self.monitor = monitor
        self.tiebreak_key, tiebreak_mode = BestKeeper.TIEBREAK[monitor]
        self.keeper = BestKeeper(run.path, keep_best, MODE_OF_METRIC[monitor], tiebreak_mode)
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.last_save = time.monotonic()
        self.save_seconds = 0.0  # spent saving since the last take_save_seconds()
        # Set by the trainer while it trains: called with (file, reason, attempt) when a write fails; it cools
        # down and returns True to have the same state written again, False when no retry is left.
        self.on_write_error: Callable[[Path, str, int], bool] | None = None

    @classmethod
    def for_config(cls, run: RunDir, cfg: Any, writer: bool = True) -> "CheckpointManager":
        """The manager of ``run`` with the save settings of a ``TrainConfig``."""
        return cls(run, monitor=cfg.monitor, keep_best=cfg.keep_best, every_steps=cfg.checkpoint_every_steps,
                   every_seconds=cfg.checkpoint_every_seconds, writer=writer)

    # --- writing ---------------------------------------------------------------------------------

    def _write(self, path: Path, write: Callable[[], Any]) -> Any:
        """Run ``write``; a failure (disk full, read-only, a network file system that stops answering) is
        retried through ``on_write_error`` with the same state, still in memory, then stops the run."""
        if not self.writer:
            return None
        retries = 0
        while True:
            try:
                result = write()
                break
            except OSError as err:
                reason = err.strerror or str(err)
                if self.on_write_error is None or not self.on_write_error(path, reason, retries + 1):
                    raise ArtifactWriteError(self._stopped_message(path, reason, retries), path=str(path),
                                             reason=reason) from None
                retries += 1
        if retries:
            logger.info(f"wrote {path.name} on retry {retries}: training goes on from the state in memory, nothing lost")
        return result

    def _stopped_message(self, path: Path, reason: str, retries: int) -> str:
        tried = f" (written {retries + 1} times, with a cool-down before each retry)" if retries else ""
        return (f"cannot write {path.name} in {self.run}: {reason}. Training stopped so that it never goes on without "
                f"checkpoints{tried}; {self.run.last} still holds the last saved state. Free disk space or make the "
                "folder writable, then run the same command to continue.")

    def save_last(self, state: dict[str, Any]) -> bool:
        """Write ``checkpoint_last.pth`` (the previous one becomes ``checkpoint_prev.pth``).

        Returns False, writing nothing, when the state holds NaN/Inf weights: the older checkpoint
        stays the one to roll back to.
        """
        if not all_finite([state.get("model"), state.get("optimizer")]):
            logger.warning("the weights are NaN/Inf: not saving them; the last checkpoint keeps finite weights")
            return False
        t0 = time.perf_counter()
        self._write(self.run.last, lambda: save_checkpoint(state, self.run.last, keep_previous=self.run.prev))
        self.last_save = time.monotonic()
        self.save_seconds += time.perf_counter() - t0
        return True

    def periodic_due(self, global_step: int, by_time: bool = True) -> bool:
        """A periodic save is due after ``global_step`` steps (every N steps or, ``by_time``, T seconds)."""
        if self.every_steps and global_step % self.every_steps == 0:
            return True
        return by_time and bool(self.every_seconds) and time.monotonic() - self.last_save >= self.every_seconds

    def save_best(self, epoch: int, metrics: dict[str, float], payload: Callable[[], dict[str, Any]]) -> tuple[bool, list[str]]:
        """Write the epoch's file if it enters the top K; returns (is the new best, files that fell out).

        The files that fell out are deleted (``drop``) only after the checkpoint that no longer lists
        them is saved, so a crash in between never leaves the checkpoint naming a missing file.
        """
        metric, tiebreak = metrics[self.monitor], metrics[self.tiebreak_key]
        if not self.keeper.would_keep(metric, tiebreak, epoch):
            return False, []
        content = payload()
        if not all_finite(content.get("model")):
            logger.warning(f"epoch {epoch}: the weights are NaN/Inf; they are not kept as a best model")
            return False, []
        name = self.keeper.file_name(epoch, metric, self.monitor)
        self._write(self.run / name, lambda: save_checkpoint(content, self.run / name))
        dropped = self.keeper.add(epoch, metric, name, tiebreak)
        if self.keeper.best()["epoch"] != epoch:
            return False, dropped
        self.link_best()
        return True, dropped

    def link_best(self) -> None:
        """Make best_model_finetuned.pth the best-K file of the best epoch (a hard link: no second write)."""
        best = self.keeper.best()
        if best is not None and self.run.is_best_epoch_member(best["file"]) and (self.run / best["file"]).is_file() \
                and not (self.run / best["file"]).is_symlink():
            self._write(self.run.best, lambda: link_or_copy(self.run / best["file"], self.run.best))

    def drop(self, names: list[str]) -> None:
        """Delete best-K files that fell out of the top K."""
        for name in names if self.writer else []:
            self.run.remove_best_epoch_file(name)  # refuses any name but a best-epoch file of the folder

    def write_history(self, history: list[dict[str, Any]]) -> None:
        """Atomically rewrite ``history.json`` and ``metrics.csv`` (the same records, for spreadsheets)."""
        self._write(self.run / HISTORY, lambda: atomic_write_json(self.run / HISTORY, history))
        self._write(self.run / METRICS, lambda: atomic_write_bytes(self.run / METRICS, metrics_csv(history)))

    def take_save_seconds(self) -> float:
        """Seconds spent saving since the last call (for the epoch's record)."""
        seconds, self.save_seconds = self.save_seconds, 0.0
        return seconds

    # --- reading and tidying -----------------------------------------------------------------------

    def load_latest(self) -> Loaded:
        """The newest checkpoint that verifies; reads only."""
        return load_latest(self.run)

    def quarantine(self, damaged: list[Path]) -> None:
        """Move damaged checkpoints aside (``<name>.damaged-<time>``), so that the next save never
        rotates a damaged ``checkpoint_last.pth`` into ``checkpoint_prev.pth``."""
        for path in damaged:
            target = self.run.damaged_name(path)
            self._write(target, lambda: path.rename(target))
            logger.warning(f"moved the damaged {path.name} aside to {target.name}")

    def tidy_after_resume(self) -> None:
        """Delete best-K files an unrecorded epoch left, and point the best model at the recorded best."""
        for stray in self.keeper.stray_files() if self.writer else []:
            self.run.remove_best_epoch_file(stray.name)
        self.link_best()

    def state_dict(self) -> dict[str, Any]:
        """The best-K list, for the checkpoint."""
        return self.keeper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the best-K list."""
        self.keeper.load_state_dict(state)
