"""The run folder (``models/cnn_modelo_v2_finetuned/`` by default) as one object.

``RunDir`` owns every artifact name, the lock that keeps two runs out of one folder, moving an
earlier run aside (``--no-resume``), telling our files from a user's, removing the temporary files a
killed run left, and the list of checkpoints a run may resume from. No other module writes a file
name of the run folder out.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..log import logger, printable

LAST = "checkpoint_last.pth"
PREV = "checkpoint_prev.pth"
BEST = "best_model_finetuned.pth"
HISTORY = "history.json"
CONFIG = "config_finetuned.json"
DATA_REPORT = "data_report.json"
CURVES = "training_curves.png"
EVALUATION = "evaluation.json"
CONFUSION = "confusion_matrix.png"
RELIABILITY = "reliability_diagram.png"  # calibrated confidence against accuracy (evaluation.json's bins)
LABEL_REVIEW = "label_review.csv"  # training images ranked by the area under the margin: likely wrong labels first
REPORT = "report.html"  # one self-contained page: curves, confusions, worst images, label review, events
MODEL_CARD = "model_card.md"
LOG = "train.log"
METRICS = "metrics.csv"
TENSORBOARD = "tensorboard"  # a folder: TensorBoard's event files (--logger tensorboard)
EXPORT = "export"  # a folder: export.py's default output beside the model file
# Written into any folder by file managers: they neither make a folder someone's nor stop it being a run's.
OS_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
LOCK = ".lock"
TMP_MARK = ".tmp-"  # atomic writes go through "<name>.tmp-<pid>"
# The four files of the original training guide, in its order.
GUIDE_ARTIFACTS = (BEST, LAST, HISTORY, CONFIG)
# Written before the first checkpoint: a folder holding only these may be reused by a new run.
BEFORE_FIRST_CHECKPOINT = frozenset({CONFIG, DATA_REPORT, LOCK, LOG})
BEST_EPOCH_PATTERN = re.compile(r"^best_epoch\d{3,}_.*\.pth$")
DAMAGED_PATTERN = re.compile(r"^checkpoint_(last|prev)\.pth\.damaged-[0-9-]+$")
_TEMPORARY = re.compile(r"^(?P<target>.+)" + re.escape(TMP_MARK) + r"(?P<pid>\d+)$")


def temporary_name(target: Path) -> Path:
    """The temporary file an atomic write of ``target`` goes through (this process's own)."""
    return target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}")


def temporary_pid(name: str, target: str) -> int | None:
    """The process id in ``name`` when it is a ``temporary_name`` of ``target``, else None."""
    match = _TEMPORARY.match(name)
    return int(match.group("pid")) if match and match.group("target") == target else None


def best_epoch_name(epoch: int, metric: float, monitor: str) -> str:
    """File name of a best-K epoch: ``best_epoch012_val_acc0.9920.pth``."""
    return f"best_epoch{epoch:03d}_{monitor}{metric:.4f}.pth"


def is_best_epoch_name(name: str) -> bool:
    """True for the names ``best_epoch_name`` makes."""
    return bool(BEST_EPOCH_PATTERN.match(name))


def is_our_name(name: str) -> bool:
    """True for a file name this program writes into a run folder."""
    ours = {LAST, PREV, BEST, HISTORY, CONFIG, DATA_REPORT, CURVES, MODEL_CARD, LOCK, EVALUATION, CONFUSION, LOG, METRICS,
            TENSORBOARD, EXPORT,
            RELIABILITY, LABEL_REVIEW, REPORT,
            f"test_{EVALUATION}", f"test_{CONFUSION}", f"test_{RELIABILITY}"}
    return name in ours or is_best_epoch_name(name) or bool(DAMAGED_PATTERN.match(name))


class RunDir:
    """One run folder: artifact paths, lock, move-aside, leftovers and resume candidates."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def last(self) -> Path:
        """``checkpoint_last.pth``: the newest full training state."""
        return self.path / LAST

    @property
    def prev(self) -> Path:
        """``checkpoint_prev.pth``: the one before it (the fallback)."""
        return self.path / PREV

    @property
    def best(self) -> Path:
        """``best_model_finetuned.pth``: the model of the best epoch."""
        return self.path / BEST

    def resume_candidates(self) -> list[Path]:
        """Checkpoints a run may continue from, newest first."""
        return [self.last, self.prev]

    def has_files(self) -> bool:
        """True when the folder exists and holds anything."""
        return self.path.is_dir() and any(self.path.iterdir())

    def foreign_files(self) -> list[str]:
        """Files a new run must not overwrite when there is no checkpoint: everything but what a run
        writes before its first checkpoint and our own temporary files."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in BEFORE_FIRST_CHECKPOINT and not self._is_our_temporary(p.name))

    @staticmethod
    def is_best_epoch_member(name: str) -> bool:
        """True for a best-epoch file name that stays directly inside the folder: no folder part, no
        '..', not absolute, no NUL (a name read from a checkpoint is untrusted input)."""
        return (is_best_epoch_name(name) and "/" not in name and "\\" not in name and "\0" not in name
                and Path(name).name == name and not Path(name).is_absolute())

    def remove_best_epoch_file(self, name: str) -> bool:
        """Delete the best-epoch file ``name`` of this folder (a link is removed, never what it points to).

        Anything but a best-epoch file directly inside the folder is refused with ``ValueError``: this
        is the only way a run deletes a best-K file, so no name can make it delete elsewhere.
        """
        if not self.is_best_epoch_member(name):
            raise ValueError(f"{name!r} is not a best-epoch file of {self.path}")
        path = self.path / name
        if not (path.is_file() or path.is_symlink()):
            return False
        path.unlink()
        return True

    def not_ours(self) -> list[str]:
        """Entries of the folder that this program does not write (class folders, a user's files, ...).

        A folder that holds any is not the folder of an earlier run: a run never moves it aside and,
        without a checkpoint, never writes into it.
        """
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if not (is_our_name(p.name) or self._is_our_temporary(p.name) or p.name in OS_CLUTTER))

    def overlap(self, other: str | os.PathLike[str]) -> str | None:
        """``"inside"`` when this folder is ``other`` or lies inside it, ``"contains"`` when ``other`` lies
        inside this folder, else None (links resolved; a path that cannot be resolved overlaps nothing)."""
        try:
            mine, theirs = self.path.resolve(), Path(other).resolve()
        except (OSError, ValueError, RuntimeError):
            return None
        if mine == theirs or mine.is_relative_to(theirs):
            return "inside"
        return "contains" if theirs.is_relative_to(mine) else None

    def best_epoch_files(self) -> list[Path]:
        """Best-K files on disk."""
        return sorted(p for p in self.path.glob("best_epoch*.pth") if is_best_epoch_name(p.name)) if self.path.is_dir() else []

    @staticmethod
    def _is_our_temporary(name: str) -> bool:
        match = _TEMPORARY.match(name)
        return bool(match) and is_our_name(match.group("target"))

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of our own artifacts left by a process killed while writing.

        Only names of the exact form ``<artifact>.tmp-<pid>`` are removed, so a user's file that happens
        to contain ``.tmp-`` is never touched.
        """
        removed = []
        if self.path.is_dir():
            for p in self.path.iterdir():
                if self._is_our_temporary(p.name) and p.is_file():
                    try:
                        p.unlink()
                        removed.append(p)
                    except OSError:
                        pass
        return removed

    def create(self) -> None:
        """Create the folder; a folder that cannot be created is bad input (exit 2)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot write to the output folder {self.path}: {err.strerror or err}; "
                            "choose a writable --output-dir", path=str(self.path)) from None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on ``<folder>/.lock`` while the block runs.

        Two runs writing the same folder would overwrite each other's checkpoints: the second one is
        refused (exit 2). The lock is the operating system's (``flock`` on Linux and macOS,
        ``LockFileEx`` on Windows, through ``filelock``), so a run killed with ``kill -9`` or a power
        cut leaves no stale lock behind. Where the file system has no locks at all (some network
        file systems), the run goes on with a warning.
        """
        import filelock

        # Read-only: an open write handle would keep the folder's file system from being remounted
        # read-only, and neither flock nor LockFileEx needs one.
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write to the output folder {self.path}: {err.strerror or err}; "
                            "choose a writable --output-dir", path=str(self.path)) from None
        held = False
        try:
            try:
                held = filelock.lock_descriptor(fd, blocking=False)
                busy = not held
            except OSError as err:  # e.g. ENOSYS: no locks on this file system
                logger.warning(f"cannot lock {self.path / LOCK} ({err.strerror or err}); make sure no other run "
                               "uses this output folder at the same time")
                busy = False
            if busy:
                raise UserError(f"another training run is using {self.path} (it holds {self.path / LOCK}); wait for it "
                                "to finish, or choose another --output-dir", path=str(self.path))
            yield
        finally:
            if held:  # Windows may keep a lock a moment past the close unless it is released first
                filelock.unlock_descriptor(fd)
            os.close(fd)

    def damaged_name(self, path: Path) -> Path:
        """Where a damaged checkpoint is moved aside: ``<name>.damaged-<time>`` (never deleted)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = path.with_name(f"{path.name}.damaged-{stamp}")
        n = 1
        while target.exists():
            target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
            n += 1
        return target

    def move_aside(self) -> Path | None:
        """Rename a non-empty folder to ``<name>.old-<timestamp>`` (under its lock); returns the new path."""
        if not self.has_files():
            return None
        if self.not_ours():  # checked in the plan already; never move a folder that is not a run's
            raise UserError(not_a_run_message(self, self.not_ours()), path=str(self.path))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.old-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
            n += 1
        # Windows refuses to rename a folder that holds an open file, such as the lock itself: there the
        # folder is renamed right after the lock has shown that no run is using it.
        rename_under_lock = os.name != "nt"
        try:
            with self.lock():  # never move a folder that a running training writes to
                if rename_under_lock:
                    self.path.rename(target)
            if not rename_under_lock:
                self.path.rename(target)
        except OSError as err:
            raise UserError(f"--no-resume cannot move the earlier run in {self.path} aside: {err.strerror or err}",
                            path=str(self.path)) from None
        return target


def not_a_run_message(run: RunDir, names: list[str]) -> str:
    """Why --no-resume refuses a folder that holds files this program did not write."""
    shown = ", ".join(printable(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"--no-resume moves aside only the folder of an earlier run, and {run} holds files that are not this "
            f"program's ({shown}); nothing was moved. Choose an empty or new --output-dir (or move those files out)")
