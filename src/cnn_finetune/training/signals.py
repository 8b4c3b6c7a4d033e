"""Ctrl+C, SIGTERM and SIGHUP: the handler only sets a flag; the training loop acts on it between steps.

``SignalGuard`` is installed for a whole run. Outside the training loop a signal stops the run at
once (``Interrupted``): nothing half-written can be left, since every file is written atomically.
Only an import in progress holds it back until it has finished (an exception inside a module's
initialisation can crash the interpreter; a 20 ms timer on SIGALRM looks again).
Inside ``deferring()`` (the loop) the first signal only sets a flag: the loop finishes the current
step, saves, and raises ``Interrupted`` itself. A second signal while the first is being handled
(for example during that save) raises at once: the atomic writer then removes its temporary file
and the previous checkpoint stays the valid one. SIGHUP (the terminal or SSH session closed) is
handled like SIGTERM, unless it was ignored when the run started (``nohup``): then it stays ignored.
The previous handlers are restored when the guard ends. Under ``torchrun``
a Ctrl+C reaches a worker twice, from the terminal and forwarded by the agent: the same signal again
within ``debounce`` seconds counts once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, Iterator

from ..errors import EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM, Interrupted

EXIT_CODES = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}
if hasattr(signal, "SIGHUP"):  # not on Windows
    EXIT_CODES[signal.SIGHUP] = EXIT_SIGHUP
# Started with the hangup ignored (``nohup``): the user asked the run to outlive the terminal, so it stays
# ignored. An ignored SIGINT or SIGTERM (a script's background job) is still handled: Ctrl+C or a kill must
# stop the run cleanly, never be lost.
KEPT_IF_IGNORED = frozenset(sig for sig in EXIT_CODES if sig.name == "SIGHUP")
RETRY_SECONDS = 0.02  # how often a stop held during an import looks again


def abort_message(name: str, second: bool) -> str:
    """What the user reads when a signal ended the run at once."""
    if name == "SIGINT":
        why = "by a second interrupt" if second else "by an interrupt"
        return f"aborted at once {why}; the last complete checkpoint is kept. Run the same command to continue."
    return f"terminated at once by {'a second ' if second else ''}{name}; the last complete checkpoint is kept. " \
           "Run the same command to continue."


def importing(frame: FrameType | None) -> bool:
    """True when ``frame`` runs inside an import (a module's initialisation is on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _write_stderr(text: str) -> None:
    try:
        os.write(2, text.encode())  # print() is not safe inside a signal handler
    except OSError:
        pass


class SignalGuard:
    """Context manager that turns stop signals into ``Interrupted`` or, while deferring, into a flag."""

    def __init__(self, debounce: float = 0.0) -> None:
        self.received: int | None = None
        self.debounce = debounce
        self._received_at = 0.0
        self._deferring = False
        self._deferred_note = ""
        self._previous: dict[int, Any] = {}
        self._pending: tuple[int, bool] | None = None  # a stop held until an import finishes
        self._alarm = False  # SIGALRM is ours (to look again after an import)

    @property
    def stop_requested(self) -> bool:
        """True once a stop signal arrived while deferring."""
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP."""
        return EXIT_CODES.get(self.received or signal.SIGINT, EXIT_SIGINT)

    @property
    def name(self) -> str:
        """Name of the received signal, e.g. 'SIGINT'."""
        return signal.Signals(self.received).name if self.received else ""

    def request_stop(self, signum: int) -> None:
        """Act as if ``signum`` had arrived while deferring (e.g. a stop decided by another process)."""
        if self.received is None:
            self.received = signum

    def stopped(self, message: str) -> Interrupted:
        """The exception that ends the run after the state was saved at the requested stop."""
        return Interrupted(message, signal_name=self.name, exit_code=self.exit_code, saved=True)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == self.received and time.monotonic() - self._received_at < self.debounce:
            return  # the same signal delivered twice (terminal and launcher): one request
        if not self._deferring or self.received is not None:
            second = self.received is not None
            if importing(frame) and self._retry_after_import(signum, second):
                return
            raise Interrupted(abort_message(name, second), signal_name=name, exit_code=EXIT_CODES[signum], second=second)
        self.received, self._received_at = signum, time.monotonic()
        _write_stderr(f"\n{name} received: {self._deferred_note} (send it again to abort at once)\n")

    def _retry_after_import(self, signum: int, second: bool) -> bool:
        """Hold the stop until the import in progress has finished: an exception raised inside a module's
        initialisation is not one Python recovers from (a C extension such as matplotlib's pybind11
        modules turns it into "ImportError: initialization failed", and the half-made module then crashes
        the interpreter's exit with SIGABRT). A short timer looks again; False where there is none."""
        if not self._alarm:
            return False
        self._pending = (signum, second)
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
        return True

    def _after_import(self, signum: int, frame: FrameType | None) -> None:
        if self._pending is None:
            return
        if importing(frame):
            signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
            return
        (held, second), self._pending = self._pending, None
        name = signal.Signals(held).name
        raise Interrupted(abort_message(name, second), signal_name=name, exit_code=EXIT_CODES[held], second=second)

    @contextmanager
    def deferring(self, note: str = "finishing the current step and saving a checkpoint") -> Iterator["SignalGuard"]:
        """Inside, the first signal only sets the flag that the training loop polls (``note``: what
        the user is told happens before the stop)."""
        self._deferring, self._deferred_note = True, note
        try:
            yield self
        finally:
            self._deferring = False

    def ignore_from_now(self, signum: int) -> None:
        """Ignore ``signum`` from now on, also after the guard ends (for a process whose outcome is decided)."""
        if signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)
            self._previous[signum] = signal.SIG_IGN

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                if not (sig in KEPT_IF_IGNORED and signal.getsignal(sig) is signal.SIG_IGN):
                    self._previous[sig] = signal.signal(sig, self._handle)
            # Only where nobody else uses SIGALRM (and it exists: not on Windows).
            if hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):
                self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._after_import)
                self._alarm = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._alarm, self._pending = False, None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
