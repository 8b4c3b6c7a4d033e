"""Graceful stop on Ctrl+C / SIGTERM: the handler only sets a flag; the loop acts between steps.

A second signal while the first is being handled (for example during the final save) raises
``KeyboardInterrupt`` at once: the atomic writer then removes its temporary file and the previous
checkpoint stays the valid one. The previous handlers are restored when the guard ends.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from .errors import EXIT_SIGINT, EXIT_SIGTERM

EXIT_CODES = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}


class Terminated(BaseException):
    """SIGTERM that must stop the program at once (exit 143), like KeyboardInterrupt for SIGINT."""


class SignalGuard:
    """Context manager that turns SIGINT/SIGTERM into a flag the training loop polls."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def stop_requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return EXIT_CODES.get(self.received or signal.SIGINT, EXIT_SIGINT)

    @property
    def name(self) -> str:
        """Name of the received signal, e.g. 'SIGINT'."""
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            text = f"second {signal.Signals(signum).name}: aborting at once"
            raise KeyboardInterrupt(text) if signum == signal.SIGINT else Terminated(text)
        self.received = signum
        msg = f"\n{signal.Signals(signum).name} received: finishing the current step and saving a checkpoint (send it again to abort at once)\n"
        try:
            os.write(2, msg.encode())  # print() is not safe inside a signal handler
        except OSError:
            pass

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
