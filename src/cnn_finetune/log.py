"""The package's messages go through the standard ``logging`` module, logger ``cnn_finetune``.

By default the logger prints like a command-line tool: information to standard output, warnings
(prefixed ``warning:``) and errors to standard error, nothing else added. A program that embeds the
package can silence or redirect it the usual way::

    logging.getLogger("cnn_finetune").setLevel(logging.WARNING)       # quieter
    logging.getLogger("cnn_finetune").handlers.clear()                 # own handlers only
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("cnn_finetune")


class ConsoleHandler(logging.Handler):
    """INFO to stdout, WARNING and above to stderr; the streams are looked up when a line is written,
    so redirected or captured ``sys.stdout``/``sys.stderr`` (pytest, notebooks) get the output."""

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102 (logging API)
        try:
            text = record.getMessage()
            if record.levelno == logging.WARNING:
                text = f"warning: {text}"
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the program
            self.handleError(record)


def progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A per-step tqdm progress bar on stderr (``--verbose``), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def _install_console_handler() -> None:
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, by our handler, not again by a root handler


_install_console_handler()
