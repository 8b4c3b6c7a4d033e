"""Fault injection for tests: ``TRAIN_FAULTS=oom@12,error@30,nan@45,kill@60``.

Steps are global optimizer steps counted from the start of training (0-based), as stored in the
checkpoint. Each fault fires at most once per process, so a restarted run gets past it. Kinds:

* ``oom@N``: at step N, every forward pass whose micro-batch holds more than half of the batch
  raises ``torch.OutOfMemoryError`` (as CUDA would), so the step is redone as micro-batches;
* ``oomall@N``: at step N every forward pass raises it, whatever its size (nothing fits);
* ``valoom@E``: in the validation after epoch E (1-based), while the evaluation batch is over half of
  ``eval_batch_size`` raise ``torch.OutOfMemoryError``;
* ``error@N``: a ``RuntimeError`` at the start of step N (a generic crash: retried);
* ``nan@N``: the loss of step N becomes NaN (the update is skipped);
* ``shape@N``: the model gets inputs with a wrong channel count at step N (a programming error;
  at the resume step it is caught by the start-up check and fails with exit code 2);
* ``kill@N``: after step N the process sends itself SIGKILL; if a checkpoint save is due there, it
  dies half-way through writing ``checkpoint_last.pth``;
* ``sigint@N`` / ``sigterm@N`` / ``sighup@N``: the process sends itself the signal after step N (the
  real handler runs), for tests that need interruption at an exact step;
* ``sigint2@N``: SIGINT after step N, and a second SIGINT half-way through the save it causes.

``kind@A-B`` covers steps A to B; ``kind@N:rR`` strikes only the process of rank R (under torchrun). The trainer meets the injector in three places only: the model it
trains is wrapped by ``wrap`` (out-of-memory, wrong shapes, NaN, validation out-of-memory), and
``before_step``/``after_step`` bracket each step (crashes, signals, kills). Under ``torchrun`` faults
are injected only in the first attempt (``TORCHELASTIC_RESTART_COUNT`` = 0) so that the restarted
worker gets past them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.nn as nn

from ..files import checkpoint
from ..errors import UserError
from ..files.rundir import LAST

KINDS = ("oom", "oomall", "valoom", "error", "nan", "shape", "kill", "sigint", "sigterm", "sighup", "sigint2")


class _Position(Protocol):
    epoch: int
    global_step: int


class _Validator(Protocol):
    batch_size: int
    configured: int


class _Steps:
    """The planned steps of one kind, a set kept as ranges: ``nan@3-100000000000`` must not build a set
    of 10^11 numbers. Membership, truth and equality with a set of steps work as for that set."""

    def __init__(self) -> None:
        self.ranges: list[range] = []

    def append(self, steps: range) -> None:
        """Plan the steps of ``steps`` too."""
        self.ranges.append(steps)

    def __contains__(self, step: object) -> bool:
        return any(step in r for r in self.ranges)

    def __bool__(self) -> bool:
        return any(self.ranges)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({s for r in self.ranges for s in r}))  # expands: for small plans only (tests, repr)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        return self._count() == len(other) and all(s in self for s in other)  # without expanding the ranges

    def _count(self) -> int:
        """How many distinct steps are planned (overlapping ranges counted once)."""
        count, end = 0, None
        for start, stop in sorted((r.start, r.stop) for r in self.ranges if len(r)):
            start = start if end is None else max(start, end)
            count += max(0, stop - start)
            end = stop if end is None else max(end, stop)
        return count


class FaultInjector:
    """Parsed ``TRAIN_FAULTS``; the trainer asks it at fixed points of each step."""

    def __init__(self, spec: str = "", rank: int = 0) -> None:
        self.planned: dict[str, _Steps] = {k: _Steps() for k in KINDS}
        self.fired: set[tuple[str, int]] = set()
        self.batch = 0  # samples of the current step (set by before_step)
        for item in filter(None, (s.strip() for s in spec.split(","))):
            item, _, on_rank = item.partition(":r")  # "oom@12:r1": only the process of rank 1
            if on_rank and (not on_rank.isdigit() or int(on_rank) != rank):
                if not on_rank.isdigit():
                    raise UserError(f"TRAIN_FAULTS: {item}:r{on_rank!r} needs a rank number after ':r', e.g. {item}:r1")
                continue
            kind, sep, where = item.partition("@")
            if not sep or kind not in KINDS:
                raise UserError(f"TRAIN_FAULTS: {item!r} is not understood; use KIND@STEP with KIND one of {', '.join(KINDS)}, e.g. oom@12,kill@60")
            try:
                lo, _, hi = where.partition("-")
                steps = range(int(lo), int(hi or lo) + 1)
            except ValueError:
                raise UserError(f"TRAIN_FAULTS: {item!r} needs a step number (e.g. {kind}@12 or {kind}@12-15)") from None
            self.planned[kind].append(steps)

    @classmethod
    def from_env(cls, rank: int = 0) -> "FaultInjector":
        """The injector described by the environment (empty when TRAIN_FAULTS is unset) for process ``rank``."""
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
            return cls("")
        return cls(os.environ.get("TRAIN_FAULTS", ""), rank)

    def __bool__(self) -> bool:
        return any(self.planned.values())

    def _take(self, kind: str, step: int) -> bool:
        if step in self.planned[kind] and (kind, step) not in self.fired:
            self.fired.add((kind, step))
            return True
        return False

    def wrap(self, model: nn.Module, position: _Position, validator: _Validator | None = None,
             only: tuple[str, ...] = KINDS) -> nn.Module:
        """``model`` with the planned faults of ``only`` injected into its forward passes (itself when none).

        ``position``: the trainer's (``epoch``, ``global_step``); ``validator``: its ``batch_size`` and
        ``configured`` batch size, for the validation out-of-memory fault."""
        if not any(self.planned[k] for k in only):
            return model
        return _FaultyModel(model, self, position, validator, only)

    def before_step(self, step: int, batch: int = 0) -> None:
        """Raise the injected crash of this step, if any; ``batch``: the step's number of samples."""
        self.batch = batch
        if self._take("error", step):
            raise RuntimeError(f"injected fault: error at step {step}")

    def mangle_input(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """A wrong channel count where a ``shape`` fault is planned (the model must reject it)."""
        if self._take("shape", step):
            return torch.cat([x, x], dim=1)
        return x

    def on_forward(self, step: int, micro_batch: int, batch: int) -> None:
        """Simulate CUDA running out of memory for micro-batches over half the batch."""
        if step in self.planned["oomall"] or (
            step in self.planned["oom"] and ("oom-done", step) not in self.fired and micro_batch > batch / 2
        ):
            self.fired.add(("oom", step))
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected fault at step {step}, micro-batch of {micro_batch})")

    def on_eval_forward(self, epoch: int, eval_batch: int, configured: int) -> None:
        """Simulate an out-of-memory error in validation for large evaluation batches.

        Once the trainer has lowered its evaluation batch to half, the fault no longer strikes."""
        if epoch in self.planned["valoom"] and eval_batch > configured / 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected fault in validation of epoch {epoch}, batch {eval_batch})")

    def poison(self, step: int, output: torch.Tensor) -> torch.Tensor:
        """The network's output, or NaN where a fault is planned (the step's loss becomes NaN)."""
        if self._take("nan", step):
            return output * float("nan")
        return output

    def after_step(self, step: int, save_due: bool) -> None:
        """Send the planned signal; a kill with a save due waits to strike inside the save."""
        if ("oom", step) in self.fired:
            self.fired.add(("oom-done", step))  # the step got through: do not strike it again
        for kind in ("sigint", "sigterm", "sighup"):
            if self._take(kind, step):
                os.kill(os.getpid(), getattr(signal, kind.upper()))  # no SIGHUP on Windows: only planned ones fail
        if self._take("sigint2", step):
            self._strike_mid_save(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        if self._take("kill", step):
            if save_due:
                self._strike_mid_save(signal.SIGKILL)
            else:
                os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def _strike_mid_save(sig: int) -> None:
        def hook(target: Path) -> None:
            if target.name == LAST:
                checkpoint.set_write_hook(None)
                os.kill(os.getpid(), sig)

        checkpoint.set_write_hook(hook)


class _FaultyModel(nn.Module):
    """The trained model with injected faults in its forward pass: the trainer's code stays free of them."""

    def __init__(self, inner: nn.Module, faults: FaultInjector, position: _Position, validator: _Validator | None,
                 only: tuple[str, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.faults, self.position, self.validator, self.only = faults, position, validator, only

    def forward(self, x: torch.Tensor) -> Any:  # noqa: D102 (nn.Module API)
        f, step = self.faults, self.position.global_step
        if not torch.is_grad_enabled():  # validation (the trainer evaluates under no_grad)
            if "valoom" in self.only and self.validator is not None:
                f.on_eval_forward(self.position.epoch + 1, self.validator.batch_size, self.validator.configured)
            return self.inner(x)
        if "oom" in self.only or "oomall" in self.only:
            f.on_forward(step, x.shape[0], f.batch or x.shape[0])
        if "shape" in self.only:
            x = f.mangle_input(step, x)
        out = self.inner(x)
        return f.poison(step, out) if "nan" in self.only else out
