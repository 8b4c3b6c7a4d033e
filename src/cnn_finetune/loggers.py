"""What a run leaves for people and tools to read besides history.json: a log file and metrics.

* ``train.log`` in the output folder: every line the run prints, with time stamps, and the full
  traceback of each failure it recovered from; appended across resumes, with a marker at each start
  (``run_log``).
* ``metrics.csv``: one row per epoch, the fields of ``history.json`` (written with it, by the
  checkpoint manager: ``metrics_csv``).
* ``--logger tensorboard``: per-step loss and learning rate and per-epoch metrics for TensorBoard, in
  ``<output-dir>/tensorboard``; after a resume the curves continue at the step the checkpoint holds,
  and whatever a killed run logged beyond it is dropped (``purge_step``), so no step appears twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError
from .log import logger

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


class EarlyLines(logging.Handler):
    """Keeps the lines a run logs before its output folder may be written, for ``run_log`` to write first."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102 (logging API)
        self.records.append(record)


class AppendingLog(logging.Handler):
    """Appends each line to a file opened only while the line is written.

    A handle kept open would hold the output folder's file system busy for the whole run (it could not
    be remounted read-only, and Windows could not move the folder), and a run is never stopped by its
    log: a line that cannot be written (disk full) is dropped, while the next checkpoint save reports it.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path = path
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def write(self, text: str) -> None:
        """Append ``text`` as it is; an ``OSError`` drops it (see the class docstring)."""
        try:
            with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(text)
        except OSError:
            pass

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102 (logging API)
        self.write(self.format(record) + "\n")


@contextmanager
def run_log(path: Path, what: str, earlier: EarlyLines | None = None) -> Iterator[None]:
    """Append everything the package logs to ``path`` while the block runs, after a start marker and
    the lines ``earlier`` kept (they were logged before the folder could be written)."""
    handler = AppendingLog(path)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    handler.write(f"\n===== {stamp} {what} (process {os.getpid()}) =====\n")
    for record in earlier.records if earlier is not None else []:
        handler.emit(record)
    logger.addHandler(handler)
    try:
        yield
    except BaseException as err:  # the end of the run, whatever it was: in the file too
        handler.emit(logging.makeLogRecord({"msg": f"run ended: {type(err).__name__}: {err}", "levelno": logging.ERROR,
                                            "levelname": "ERROR"}))
        raise
    finally:
        logger.removeHandler(handler)


def metrics_csv(history: list[dict[str, Any]]) -> bytes:
    """The epoch records as CSV: one row per epoch, the keys of the records as columns (events as JSON)."""
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()})
    return buf.getvalue().encode("utf-8")


def require_tensorboard() -> None:
    """``UserError`` (exit 2) naming the fix when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("--logger tensorboard needs the tensorboard package: pip install 'cnn-finetune[tensorboard]' "
                        "(or pip install tensorboard), or use --logger none")


class TensorBoardLogger:
    """Scalars for TensorBoard: ``train/loss`` and ``train/lr`` per step, the epoch's metrics per epoch."""

    def __init__(self, folder: Path, purge_step: int) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote at or after this step are dropped by TensorBoard.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        """One epoch's record (at the global step that ends it)."""
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(f"epoch/{key}", record[key], step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
