"""What a run leaves for people and tools to read besides history.json: a log file and metrics.

* ``train.log`` in the output folder: every line the run prints, with time stamps, and the full
  traceback of each failure it recovered from; appended across resumes, with a marker at each start
  (``run_log``).
* ``metrics.csv``: one row per epoch, the fields of ``history.json`` (written with it, by the
  checkpoint manager: ``metrics_csv``).
* ``--logger tensorboard``: per-step loss and learning rate and per-epoch metrics for TensorBoard, in
  ``<output-dir>/tensorboard``; after a resume the curves continue at the step the checkpoint holds,
  and whatever a killed run logged beyond it is removed from the event files, so no step appears twice.
  A damaged record costs only itself (records are found again by their CRCs), and a wrong kind of
  path where the event files go is bad input (``check_tensorboard_folder``, before the run writes).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
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


def check_tensorboard_folder(folder: Path) -> None:
    """``UserError`` (exit 2) when ``folder`` or an event file in it is not the kind of path it must be.

    The run writes event files into ``folder`` and rewrites those already there (``trim_event_file``):
    a file named like the folder, or a directory, FIFO or dangling link named like an event file, is
    someone's, not ours. It is named and left alone, and the run refused before anything is written,
    rather than a traceback half-way through opening the run (or a hang on a FIFO).
    """
    if os.path.lexists(folder) and not folder.is_dir():
        raise UserError(f"{folder} is not a folder, but --logger tensorboard writes its event files there: move it "
                        "away, or use --logger none", path=str(folder))
    for path in sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []:
        try:
            regular = stat.S_ISREG(path.stat().st_mode)  # without opening it: a FIFO would block
        except OSError:  # a dangling link, a file that cannot be looked at
            regular = False
        if not regular:
            raise UserError(f"{path} is named like a TensorBoard event file but is not a regular file: --logger "
                            "tensorboard rewrites the event files of a resumed run; move it away, or use --logger none",
                            path=str(path))


# A TFRecord (the framing of an event file): a little-endian uint64 length, the masked CRC-32C of
# those 8 bytes, the payload (a serialised Event), the masked CRC-32C of the payload.
_HEADER = 12
_FOOTER = 4
_RESYNC_LOW_BYTES = 3  # a record found by scanning past damage is under 16 MiB long (a scalar's: ~50 bytes)


def _record_end(data: bytes, pos: int) -> int | None:
    """The end of the record at ``pos`` when both of its CRCs verify, else None."""
    from tensorboardX.record_writer import masked_crc32c

    if pos + _HEADER + _FOOTER > len(data):
        return None
    header = data[pos:pos + 8]
    (size,) = struct.unpack("<Q", header)
    end = pos + _HEADER + size + _FOOTER
    if end > len(data) or struct.unpack("<I", data[pos + 8:pos + _HEADER])[0] != masked_crc32c(header):
        return None
    payload = data[pos + _HEADER:end - _FOOTER]
    return end if struct.unpack("<I", data[end - _FOOTER:end])[0] == masked_crc32c(payload) else None


def _next_record(data: bytes, pos: int) -> int:
    """The start of the first record after ``pos`` whose CRCs verify (``len(data)``: none).

    Candidates are found with ``bytes.find`` (C speed): the high bytes of a length under 16 MiB are
    zero; only those offsets are checked with CRCs.
    """
    zeros = bytes(8 - _RESYNC_LOW_BYTES)
    while True:
        hit = data.find(zeros, pos + 1 + _RESYNC_LOW_BYTES)
        if hit < 0:
            return len(data)
        pos = hit - _RESYNC_LOW_BYTES  # the length's low bytes come before its zero bytes
        if _record_end(data, pos) is not None:
            return pos


def event_records(data: bytes) -> tuple[list[bytes], int]:
    """The records of an event file whose CRCs verify, byte for byte, and how many bytes before the
    last of them were damaged (a record cut short at the end, as a kill leaves it, is not counted).

    A damaged record (a flipped length byte, a payload that does not match its CRC) is skipped by
    scanning forward to the next record that verifies: one bad byte costs the one record it is in,
    not everything after it.
    """
    records: list[bytes] = []
    damaged = pos = 0
    while pos < len(data):
        end = _record_end(data, pos)
        if end is None:
            following = _next_record(data, pos)
            damaged += following - pos if following < len(data) else 0
            pos = following
            continue
        records.append(data[pos:end])
        pos = end
    return records, damaged


def trim_event_file(path: Path, first_step: int) -> None:
    """Rewrite an event file without the summaries at or after ``first_step`` and without records that
    are damaged (see ``event_records``) or do not decode; the records kept are kept byte for byte.

    A file that cannot be read or rewritten is left as it is, with a warning: the curves may then show
    a killed run's later steps twice, but the run is not stopped by its TensorBoard files.
    """
    from google.protobuf.message import DecodeError
    from tensorboardX.proto import event_pb2

    try:
        data = path.read_bytes()
    except OSError as err:
        logger.warning(f"{path} could not be read ({err}); its steps after the checkpoint are not removed")
        return
    records, damaged = event_records(data)
    kept: list[bytes] = []
    for record in records:
        try:
            event = event_pb2.Event.FromString(record[_HEADER:-_FOOTER])
        except DecodeError:  # its CRC verified, yet it is no Event: written by something else
            damaged += len(record)
            continue
        if not (event.HasField("summary") and event.step >= first_step):
            kept.append(record)
    if sum(map(len, kept)) == len(data):
        return
    if damaged:
        logger.warning(f"{path.name}: {damaged} damaged byte(s) of TensorBoard events skipped; the records "
                       "around them are kept")
    try:
        atomic_write_bytes(path, b"".join(kept))
    except OSError as err:
        logger.warning(f"{path} could not be rewritten ({err}); its steps after the checkpoint are not removed")
