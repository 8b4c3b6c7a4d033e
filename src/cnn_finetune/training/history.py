"""The record of a run: one entry per epoch (``history.json``) and the events of the epoch in progress.

Events (resumed, retry, oom, oom_probe, nan_rollback) are collected while an epoch runs and attached
to its record when it ends; both lists travel in the checkpoint, so a resumed run's history is the
uninterrupted run's, apart from timings and events (``TIMING_KEYS``).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

TIMING_KEYS = ("seconds", "images_per_s", "save_seconds", "events")  # fields that differ between identical runs


class History(list):
    """The epoch records (the list itself) and ``events``, those of the epoch in progress."""

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(records)
        self.events: list[dict[str, Any]] = []

    def event(self, kind: str, **fields: Any) -> None:
        """Record that ``kind`` happened in the current epoch."""
        self.events.append({"type": kind, **fields})

    def close_epoch(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append the record of the epoch that just ended, with its events; returns it."""
        record["events"] = list(self.events)
        self.append(record)
        self.events = []
        return record

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state for the checkpoint: ``history`` and ``events``."""
        return {"history": copy.deepcopy(list(self)), "events": copy.deepcopy(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self[:] = copy.deepcopy(state["history"])
        self.events = copy.deepcopy(state["events"])


def epoch_line(r: dict[str, Any], epochs: int) -> str:
    """One log line per epoch."""
    mark = "  *best*" if r["best"] else ""
    return (f"epoch {r['epoch']:>3}/{epochs}  train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:6.2f}%  "
            f"val loss {r['val_loss']:.4f} acc {100 * r['val_acc']:6.2f}%  lr {r['lr']:.2e}  "
            f"{r['seconds']:.1f}s  {r['images_per_s']:.0f} img/s{mark}")
