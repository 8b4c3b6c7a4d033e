"""What a run leaves for people and tools to read besides history.json: a log file and metrics.

* ``train.log`` in the output folder: every line the run prints, with time stamps, and the full
  traceback of each failure it recovered from; appended across resumes, with a marker at each start
  (``run_log``).
* ``metrics.csv``: one row per epoch, the fields of ``history.json`` (written with it, by the
  checkpoint manager: ``metrics_csv``).
* ``--logger tensorboard``: per-step loss and learning rate and per-epoch metrics for TensorBoard, in
  ``<output-dir>/tensorboard``; after a resume the curves continue at the step the checkpoint holds,
  and whatever a killed run logged beyond it is removed from the event files, so no step appears twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .checkpoint import atomic_write_bytes
from ..errors import UserError
from ..log import logger

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
    """``UserError`` (exit 2) naming the fix when the event-file writer (tensorboardX) is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        raise UserError("--logger tensorboard needs the tensorboardX package (it writes TensorBoard's event files): "
                        "pip install 'cnn-finetune[tensorboard]' (or pip install tensorboardX), or use --logger none")


class TensorBoardLogger:
    """Scalars for TensorBoard: ``train/loss`` and ``train/lr`` per step, the epoch's metrics per epoch.

    Written with tensorboardX, the event-file writer without TensorBoard's server (about 1 MB instead
    of 60: the viewer, ``pip install tensorboard``, can live anywhere). A run starting at
    ``first_step`` first removes, from the event files already in ``folder``, every scalar at or after
    that step: what a killed run logged past its checkpoint is redone by this run, and each step must
    appear once in any reader, not only in TensorBoard (which would also honour ``purge_step``).
    """

    def __init__(self, folder: Path, first_step: int) -> None:
        require_tensorboard()
        from tensorboardX import SummaryWriter

        for path in sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []:
            trim_event_file(path, first_step)
        self.writer = SummaryWriter(logdir=str(folder), purge_step=first_step)

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


def trim_event_file(path: Path, first_step: int) -> None:
    """Rewrite an event file without the summaries at or after ``first_step`` and without a record cut
    short by a kill; records are kept byte for byte (a TFRecord: length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    kept: list[bytes] = []
    pos = 0
    while pos + 12 <= len(data):
        (size,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + size + 4
        if end > len(data):
            break
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + size])
        if not (event.HasField("summary") and event.step >= first_step):
            kept.append(data[pos:end])
        pos = end
    if sum(map(len, kept)) != len(data):
        atomic_write_bytes(path, b"".join(kept))
