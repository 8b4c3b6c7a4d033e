"""Every exception type of the package, each with its exit code and structured fields.

The fault model separates two kinds of failure: bad input, which no retry can fix (``UserError``,
exit 2, nothing touched), and trouble during training, which the trainer retries or reports
(``TrainingFailed``, exit 1). A handled signal ends a run with ``Interrupted`` (130, 143 or 129).
Control flow reads the fields (``exit_code``, ``second``, ``path``), never the message text.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """Bad input (config, flags, data, paths): fail at once with exit code 2, never retried.

    ``path``: the file or folder at fault, when there is one.
    """

    exit_code = EXIT_BAD_INPUT
    label = "error"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ConfigError(UserError, ValueError):
    """A configuration value or file is invalid; the message says which value and how to fix it."""


class DataError(UserError):
    """A data source is missing, empty or malformed; the message names the path."""


class TrainingFailed(Exception):
    """Training could not go on (retries used up, persistent NaN, checkpoints cannot be written)."""

    exit_code = EXIT_FAILED
    label = "training failed"


class ArtifactWriteError(TrainingFailed):
    """A file of the run could not be written (disk full, read-only folder).

    ``path``: the file; ``reason``: the operating system's words (e.g. "No space left on device").
    """

    def __init__(self, message: str, *, path: str, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated, corrupt or fails its checksum (``path``: which)."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ExportUnavailable(Exception):
    """No ONNX exporter works here (a package is missing): ONNX is skipped and said so, not a failure."""


class RolledBack(Exception):
    """The trainer went back to a checkpoint (NaN rollback): the loop continues from its position."""


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the run (a ``KeyboardInterrupt``, so ``except Exception`` never swallows it).

    ``saved``: the state at the current step was saved first (the first signal during training);
    ``second``: a second signal aborted at once (the last complete checkpoint is kept).
    """

    def __init__(self, message: str, *, signal_name: str, exit_code: int, saved: bool = False,
                 second: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.signal_name = signal_name
        self.exit_code = exit_code
        self.saved = saved
        self.second = second


class NotRegularFile(OSError):
    """A path to read is a FIFO, socket, device or folder, not a regular file (``filename``: which;
    ``strerror``: what it is). An ``OSError``, so that every reader's handler already reports it."""
