"""The package's messages go through the standard ``logging`` module, logger ``cnn_finetune``.

By default the logger prints like a command-line tool: information to standard output, warnings
(prefixed ``warning:``) and errors to standard error, nothing else added. File names that are not
valid UTF-8 are shown escaped (``printable``), so a message about them can always be printed. A program that embeds the
package can silence or redirect it the usual way::

    logging.getLogger("cnn_finetune").setLevel(logging.WARNING)       # quieter
    logging.getLogger("cnn_finetune").handlers.clear()                 # own handlers only
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

logger = logging.getLogger("cnn_finetune")

_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` that can be printed and written as UTF-8, for people to read (reports, JSON, logs).

    Python keeps the bytes of a file name that are not valid UTF-8 as lone surrogates
    (``os.fsdecode``), which round-trip to the same file but cannot be encoded as UTF-8: each such
    byte is shown as ``\\xNN`` (the name ``b"cl\\xffass"`` reads ``cl\\xffass``); any other lone
    surrogate as ``\\uNNNN``. Text without them is returned unchanged.
    """
    return _SURROGATE.sub(_escape_surrogate, text) if _SURROGATE.search(text) else text


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


class ConsoleHandler(logging.Handler):
    """INFO to stdout, WARNING and above to stderr; the streams are looked up when a line is written,
    so redirected or captured ``sys.stdout``/``sys.stderr`` (pytest, notebooks) get the output."""

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102 (logging API)
        try:
            text = printable(record.getMessage())
            if record.levelno == logging.WARNING:
                text = f"warning: {text}"
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the program
            self.handleError(record)


class _PrintableRecords(logging.Filter):
    """Escape a record's undecodable bytes once, at the logger, so that every handler gets text it can
    encode: a notebook's or an embedding program's own handler, pytest's log capture (whose reports
    xdist sends as UTF-8), a UTF-8 log file."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 (logging API)
        message = record.getMessage()
        if _SURROGATE.search(message):
            record.msg, record.args = printable(message), None
        return True


def progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A per-step tqdm progress bar on stderr (``--verbose``), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _install_console_handler() -> None:
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    if not any(isinstance(f, _PrintableRecords) for f in logger.filters):
        logger.addFilter(_PrintableRecords())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, by our handler, not again by a root handler


_install_console_handler()
