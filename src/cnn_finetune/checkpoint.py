"""Crash-safe files: atomic writes, checksummed checkpoints, and the best-K keeper.

Every file is written to a temporary name in the same folder, flushed, fsync'ed and renamed over
the target, then the folder is fsync'ed: a reader sees the old file or the new one, never half of
one, even after a power cut. Checkpoints carry a SHA-256 of their contents and are read only with
``torch.load(weights_only=True)``, so a damaged file is detected and loading never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import operator
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError

FORMAT = "cnn_finetune/1"
TMP_MARK = ".tmp-"

# A hook the fault injector sets to kill the process half-way through writing a file.
_write_hook: Callable[[Path], None] | None = None


def set_write_hook(hook: Callable[[Path], None] | None) -> None:
    """Install a function called half-way through each atomic write, with its target (fault injection)."""
    global _write_hook
    _write_hook = hook


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            if _write_hook is None:
                fh.write(data)
            else:
                half = len(data) // 2
                fh.write(data[:half])
                fh.flush()
                os.fsync(fh.fileno())
                _write_hook(path)  # the fault injector may kill the process here, mid-write
                fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/Inf written as null: JSON has no such values)."""
    text = json.dumps(_json_safe(obj), indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_torch_save(obj: Any, path: Path) -> int:
    """``torch.save`` through ``atomic_write_bytes``; returns the size in bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(Path(path), data)
    return len(data)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left by a process killed while writing; returns what was removed."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if TMP_MARK in p.name and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


# ------------------------------------------------------------------------------------------------
# Checksums


def content_digest(obj: Any) -> str:
    """SHA-256 over a nested structure of tensors and plain data, independent of pickling details."""
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def _digest_into(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest_into(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest_into(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: Path | None = None) -> int:
    """Save a checksummed checkpoint atomically; the file it replaces becomes ``keep_previous``.

    The previous file is hard-linked to its new name before the rename, so at every instant
    ``path`` holds a complete checkpoint (old or new) and ``keep_previous`` the one before.
    """
    payload = {"format": FORMAT, "state": state}
    payload["sha256"] = content_digest(payload["state"])
    if keep_previous is not None and path.exists():
        link_or_copy(path, keep_previous)
    return atomic_torch_save(payload, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a second name of ``src``: a hard link, or a fsync'ed copy on file
    systems without hard links. Costs no second write where links work."""
    tmp = dst.with_name(f"{dst.name}{TMP_MARK}{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(tmp, src.read_bytes())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint; raises CheckpointError saying why it cannot be used."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} cannot be loaded ({type(err).__name__}: {first_line}); it is truncated, corrupt or not a checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state" not in payload:
        raise CheckpointError(f"{path} is not a checkpoint of this program (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})")
    if content_digest(payload["state"]) != payload.get("sha256"):
        raise CheckpointError(f"{path} fails its checksum: its contents were damaged after it was written")
    return payload["state"]


def load_newest_valid(paths: list[Path]) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
    """The first checkpoint in ``paths`` that verifies, with the problems met on the way."""
    problems = []
    for p in paths:
        if not p.exists():
            continue
        try:
            return load_checkpoint(p), p, problems
        except CheckpointError as err:
            problems.append(str(err))
    return None, None, problems


# ------------------------------------------------------------------------------------------------
# Metric comparison shared by early stopping and the best-K keeper

MODE_OF_METRIC = {"val_acc": "max", "val_loss": "min"}
_BETTER = {"max": operator.gt, "min": operator.lt}


def is_better(new: float, old: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """``new`` improves on ``old`` by more than ``min_delta``; NaN is never better, anything beats None/NaN."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return True
    delta = min_delta if mode == "max" else -min_delta
    return _BETTER[mode](new - delta, old)


class BestKeeper:
    """Keeps the K best epochs as separate files, deleting the (K+1)-th; the list survives restarts.

    Epochs are ranked by the monitored metric; equal metrics (frequent for accuracy on a small
    validation set) are ranked by a second metric (``val_loss`` when monitoring ``val_acc``), and
    then by epoch, the earlier first.
    """

    PATTERN = re.compile(r"^best_epoch(\d{3,})_.*\.pth$")
    TIEBREAK = {"val_acc": ("val_loss", "min"), "val_loss": ("val_acc", "max")}

    def __init__(self, folder: Path, k: int, mode: str, tiebreak_mode: str = "min") -> None:
        self.folder = Path(folder)
        self.k = k
        self.mode = mode
        self.tiebreak_mode = tiebreak_mode
        self.entries: list[dict[str, Any]] = []  # sorted best first: {"metric", "tiebreak", "epoch", "file"}

    def file_name(self, epoch: int, metric: float, metric_name: str) -> str:
        """File name of an epoch's checkpoint: ``best_epoch012_val_acc0.9920.pth``."""
        return f"best_epoch{epoch:03d}_{metric_name}{metric:.4f}.pth"

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
        return [p for p in self.folder.glob("best_epoch*.pth") if self.PATTERN.match(p.name) and p.name not in known]

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for the checkpoint."""
        return {"mode": self.mode, "entries": [dict(e) for e in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the list saved by ``state_dict``."""
        self.mode = state["mode"]
        self.entries = [dict(e) for e in state["entries"]]
        if len(self.entries) > self.k:  # keep_best lowered on resume
            self.entries = self.entries[: self.k]
