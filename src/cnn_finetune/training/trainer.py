"""RobustTrainer: the step maths and the training loop, with one path back to a checkpoint.

Every random draw is a function of (seed, epoch, step) and the learning rate of the global step, so
a checkpoint needs only counters besides the weights and optimizer state, and resuming at any step
boundary reproduces an uninterrupted run exactly (on the CPU bit for bit). The trainer wires parts
built elsewhere (save policy: ``CheckpointManager``; signals: ``SignalGuard``; position, metrics,
early stopping, micro-batching, NaN guard, retries, timing: ``mechanisms``) and does itself: OOM ->
redo the step as 2, 4, 8... micro-batches (same result); NaN/Inf -> skip the update, a streak rolls
back and lowers the lr; any other exception -> cool down, reload, go on. Rollback and retry both go
through ``restore_latest``.
"""

from __future__ import annotations

import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .checkpoint_manager import CheckpointManager
from ..config import TrainConfig
from ..data.loader import SplitData
from ..errors import Interrupted, RolledBack, TrainingFailed, UserError
from .faults import FaultInjector
from .history import TIMING_KEYS, History, epoch_line
from ..log import logger, progress_bar
from .mechanisms import Clock, EarlyStopping, EpochMetrics, FitResult, NanGuard, Position, RetryBudget, mix_seed
from .microbatch import MicroBatcher
from .step import StepRunner
from .recipe import resolve, segment_lr
from ..model.cnn import ARCH, CNNv2, build_model, make_optimizer, unwrap
from ..files.rundir import RunDir
from ..runtime import configure_threads, versions
from .sampling import DeviceData
from .distributed import Dist, data_parallel
from .signals import SignalGuard
from . import set_aside
from .validation import Validator

__all__ = ["RobustTrainer", "FitResult", "SplitData", "TIMING_KEYS"]


class RobustTrainer:
    """Trains a CNN v2 on in-memory data and survives signals, OOM, NaN, crashes and restarts."""

    def __init__(self, cfg: TrainConfig, data: SplitData, device: torch.device, *,
                 checkpoints: CheckpointManager | None = None, init: Callable[[CNNv2], str] | None = None,
                 faults: FaultInjector | None = None, guard: SignalGuard | None = None,
                 on_epoch_end: Callable[[list[dict[str, Any]]], None] | None = None,
                 log: Callable[[str], None] | None = None, dist: Dist | None = None,
                 metrics_logger: Any = None) -> None:
        self.batches = DeviceData(data, device, cfg.batch_size, cfg.seed, cfg.balance)
        self.batch_size, self.steps_per_epoch = self.batches.batch_size, self.batches.steps_per_epoch
        # Automatic settings (epochs "auto", patience...) become numbers here unless the caller resolved them.
        self.cfg, self.data, self.device = resolve(cfg, self.steps_per_epoch, init is not None).config, data, device
        cfg = self.cfg
        self.fine_tuning = init is not None
        self.dist = dist or Dist()
        self.faults = faults or FaultInjector("")
        self.guard = guard or SignalGuard()  # not entered: only a caller that installs it gets signals
        self.log = log or logger.info
        self.on_epoch_end = on_epoch_end  # e.g. refresh the training curves; never stops training
        self.metrics_logger = metrics_logger  # e.g. TensorBoard: per-step loss and lr at sync points, epoch records
        self.checkpoints = checkpoints or CheckpointManager.for_config(RunDir(cfg.output_dir), cfg, writer=self.dist.is_main)
        configure_threads(cfg.num_threads, warn=False)  # the command line has said it already, if it was too many
        torch.manual_seed(mix_seed(cfg.seed, 0x1417))  # the initial weights are a function of the seed too
        model = build_model(len(data.class_names), width=cfg.width, bn_ghost_size=cfg.bn_ghost_size)
        self.init_note = init(model) if init is not None else "training from scratch"
        channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
        self.model: CNNv2 = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
        self.pos = Position()
        self.optimizer = make_optimizer(self.model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, feature_lr_scale=cfg.feature_lr_scale)
        self.class_weights = self.batches.class_weights
        self.segments = [(0, cfg.epochs * self.steps_per_epoch)]  # learning-rate segments: the plan, then extensions
        self.sync_every = cfg.sync_every or (1 if device.type == "cpu" else 25)
        self.early = EarlyStopping(cfg.patience, cfg.min_delta, self.checkpoints.keeper.mode,
                                   self.checkpoints.keeper.tiebreak_mode)
        self.micro = MicroBatcher(cfg.oom_probe_steps)
        self.nan = NanGuard(cfg.nan_max_consecutive, cfg.nan_lr_factor, cfg.nan_max_rollbacks)
        self.retries = RetryBudget(cfg.max_retries, cfg.cooldown_min, cfg.cooldown_max)
        self.metrics = EpochMetrics(device)
        self.clock = Clock()
        self.history = History()
        self.finished: dict[str, Any] | None = None
        self.automatic: dict[str, str] = {}  # why each automatic setting has its value (the pipeline's notes)
        self.stop_agreed = False  # several processes: every rank acts on a stop signal at the same step
        self.set_aside: set_aside.Decision | None = None  # the images set aside half-way (None: not decided yet)
        self._wire(channels_last)

    def _wire(self, channels_last: bool) -> None:
        """The step maths, validation, data parallelism and the fault layer, around the parts above."""
        cfg, device = self.cfg, self.device
        compiled = torch.compile(self.model) if cfg.compile else self.model
        ddp = data_parallel(compiled, self.dist, device, some_frozen=cfg.freeze_features_epochs > 0)
        self.steps = StepRunner(cfg, self.model, compiled, self.optimizer, self.batches, self.micro, self.metrics,
                                mean=self.data.mean, std=self.data.std, channels_last=channels_last,
                                on_event=self.history.event, log=self.log, dist=self.dist, ddp=ddp)
        self.prepare = self.steps.prepare
        self.validator = Validator(cfg.eval_batch_size, device, self.steps.prepare, self.steps.autocast, self.dist)
        self.net: nn.Module = self.faults.wrap(ddp or compiled, self.pos, self.validator)
        self.steps.net, self.average = self.net, self.steps.average  # the average (or clean copy): validated and kept when on
        self.evaluated = (self.faults.wrap(self.average.shadow, self.pos, self.validator, only=("valoom",)),
                          self.average.shadow) if self.average.enabled else (self.net, self.model)

    # --- state ------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What every saved file says about the model: architecture, weights, classes, data, recipe."""
        return {"arch": ARCH, "arch_params": self.model.arch_params(), "model": unwrap(self.model).state_dict(),
                "class_names": list(self.data.class_names), "normalization": {"mean": self.data.mean, "std": self.data.std},
                "init": self.init_note, "data_fingerprint": self.data.fingerprint, "config": self.cfg.to_dict(),
                "versions": versions()}

    def state_dict(self) -> dict[str, Any]:
        """The full training state: enough to continue bit-exactly."""
        return {
            **self._identity(), "kind": "training", "optimizer": self.optimizer.state_dict(),
            "position": {**self.pos.state_dict(), "steps_per_epoch": self.steps_per_epoch},
            "accumulators": self.metrics.state_dict(self.dist.sum_), "early_stopping": self.early.state_dict(),
            "best_keeper": self.checkpoints.state_dict(), "micro_batching": self.micro.state_dict(),
            "nan_guard": self.nan.state_dict(), **self.history.state_dict(), "finished": self.finished,
            "timing": self.clock.state_dict(), "seed": self.cfg.seed, "schedule": [list(s) for s in self.segments],
            "fine_tuning": self.fine_tuning, "world_size": self.dist.world, "automatic": dict(self.automatic),
            "label_review": self.steps.review.state_dict(self.dist.sum_), "averaged": self.average.state_dict(),
            "set_aside": self.set_aside.state_dict() if self.set_aside is not None else None}

    def load_state_dict(self, state: dict[str, Any], carry_over: bool = False) -> None:
        """Restore a checkpoint. ``carry_over``: keep what this process learnt (OOM split, NaN lr)."""
        kept_micro, kept_nan = self.micro.state_dict(), self.nan.state_dict()
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pos.load_state_dict(state["position"])
        self.metrics.load_state_dict(state["accumulators"], owner=self.dist.is_main)
        self.steps.review.load_state_dict(state.get("label_review"), owner=self.dist.is_main)
        self.average.load_state_dict(state.get("averaged"), self.model)
        self.set_aside = set_aside.restore(state.get("set_aside"), self.steps)
        self.early.load_state_dict(state["early_stopping"])
        self.checkpoints.load_state_dict(state["best_keeper"])
        self.micro.load_state_dict(state["micro_batching"])
        self.nan.load_state_dict(state["nan_guard"])
        self.history.load_state_dict(state)
        self.finished = state["finished"]
        self.init_note = state.get("init", self.init_note)
        self.clock.load_state_dict(state["timing"])
        self.fine_tuning = bool(state.get("fine_tuning", self.fine_tuning))
        self.automatic = dict(state.get("automatic", self.automatic))
        self.segments = [(int(s), int(e)) for s, e in state.get("schedule", [(0, self.cfg.epochs * self.steps_per_epoch)])]
        if carry_over:  # keep the finer split and the lower lr this process learnt (ties: the checkpoint's)
            self.micro.load_state_dict(max(self.micro.state_dict(), kept_micro, key=lambda m: m["parts"]))
            self.nan.load_state_dict(max(self.nan.state_dict(), kept_nan, key=lambda n: n["rollbacks"]))

    def note_resumed(self, source: str) -> None:
        """Record in the history that this process continued from ``source``."""
        self.history.event("resumed", **{"from": source}, epoch=self.pos.epoch + 1, step=self.pos.step,
                           global_step=self.pos.global_step)

    def model_payload(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        """What a best-model file holds: weights and everything needed to use them."""
        return {**self._identity(), "model": self.average.weights(self.model), "kind": "model", "epoch": epoch, "metrics": metrics}

    def begin(self) -> None:
        """Create the run folder and write the first checkpoint: the retry and rollback target of a fresh run."""
        self.checkpoints.run.create()
        self.save_last()

    def save_last(self, progress: bool = True) -> None:
        """Save the full state (``progress``: new progress, ending a series of failures); NaN/Inf weights roll back."""
        if not self.checkpoints.save_last(self.state_dict()):
            self._nan_rollback(0, "the weights became NaN/Inf")
        elif progress:
            self.retries.progress()

    # --- randomness and schedule: pure functions of (seed, epoch, step) ----------------------------

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample indices of an epoch, from a generator seeded by (seed, epoch)."""
        return self.batches.epoch_order(epoch)

    def lr_of_step(self, step: int) -> float:
        """Base learning rate of a global step, NaN rollbacks included."""
        return segment_lr(step, self.segments, self.cfg) * self.nan.lr_scale

    def extend_to(self, epochs: int) -> None:
        """Train to ``epochs`` instead: a learning-rate segment of its own over the added steps, from the
        end of the plan, or from where a finished run stopped; early stopping gets a fresh patience."""
        start = self.pos.global_step if self.finished else self.segments[-1][1]
        self.segments.append((start, epochs * self.steps_per_epoch))
        self.history.event("extended", from_epochs=self.cfg.epochs, to_epochs=epochs, global_step=start)
        self.cfg = replace(self.cfg, epochs=epochs)
        self.finished = None
        self.early.wait = 0

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train from the current state (fresh, or restored with ``load_state_dict``) to the end.

        Raises ``Interrupted`` on a handled signal (after saving), ``TrainingFailed`` when recovery is
        impossible, ``UserError`` for problems that no retry can fix.
        """
        self.checkpoints.on_write_error = None if self.dist.enabled else self._retry_save  # under torchrun: the group restarts
        with self.guard.deferring():
            while True:
                try:
                    result = self._run_epochs()
                    self.checkpoints.write_history(self.history)
                    return result
                except (UserError, TrainingFailed):
                    raise
                except Exception as err:  # noqa: BLE001 - the fault model: retry anything else
                    if self.dist.enabled:  # a retry cannot mend a broken collective: torchrun restarts the group
                        raise
                    if type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):  # fails the same way every time
                        raise UserError(f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                                        "run without --compile") from None
                    self._recover(err)

    def _run_epochs(self) -> FitResult:
        while self.pos.epoch < self.cfg.epochs:
            try:
                self._train_epoch()
                stop, reason = self._end_epoch()
            except RolledBack:
                continue  # the position changed: go on from the checkpoint's
            if stop:
                return self._finish("early_stopped", f"early stopping after epoch {self.pos.epoch}: {reason}", reason)
            self._check_stop()
        done = f"all {self.cfg.epochs} epochs done"
        return self._finish("completed", f"completed {self.cfg.epochs} epochs", done)

    def _finish(self, status: str, message: str, detail: str) -> FitResult:
        self.finished = {"reason": status, "epoch": self.pos.epoch, "detail": detail}
        self.save_last()
        if self.dist.enabled:  # checked after every epoch: say so once
            message += f"; all {self.dist.world} processes hold identical weights (sha256 {self.dist.weights_digest(self.model)[0][:16]})"
        return FitResult(status, message, self.checkpoints.keeper.best())

    def _train_epoch(self) -> None:
        """The steps of the current epoch from the current position; raises ``RolledBack`` on a rollback."""
        pos = self.pos
        if self.set_aside is None and pos.step == 0 and pos.epoch >= set_aside.switch_epoch(self.cfg.epochs):
            self.set_aside = set_aside.at_switch(self.cfg.set_aside, self.steps, self.dist.sum_, pos.epoch, self.history, self.log)
        self.model.train_mode(frozen_features=pos.epoch < self.cfg.freeze_features_epochs)
        order = self.epoch_order(pos.epoch)
        self.clock.start_epoch()
        self._check_stop()
        bar = progress_bar(self.cfg.verbose, self.steps_per_epoch, pos.step, f"epoch {pos.epoch + 1}/{self.cfg.epochs}")
        self.clock.start_training()
        try:
            while pos.step < self.steps_per_epoch:
                idx = self.batches.step_indices(order, pos.step)
                self.faults.before_step(pos.global_step, self.steps.share_size(len(idx)))
                self.steps.run(idx, pos.epoch, pos.step, pos.global_step, self.lr_of_step(pos.global_step))
                pos.advance()
                self._sync()
                if self.metrics_logger is not None and pos.global_step % self.sync_every == 0:  # a sync point: cheap
                    self.metrics_logger.log_step(pos.global_step, float(self.steps.last_loss), self.lr_of_step(pos.global_step - 1))
                if bar is not None:
                    bar.update(1)
                end_of_epoch = pos.step == self.steps_per_epoch
                periodic = self._coordinate() and not end_of_epoch
                self.faults.after_step(pos.global_step - 1, save_due=end_of_epoch or periodic)
                if periodic:
                    self.save_last()
                self._check_stop()
        finally:
            if bar is not None:
                bar.close()
        self.clock.stop_training()
        self._sync(force=True)

    def _sync(self, force: bool = False) -> None:
        """Host-side check at sync points: a streak of non-finite steps rolls back."""
        if force or self.pos.global_step % self.sync_every == 0:
            streak = self.metrics.max_streak()
            if self.nan.needs_rollback(streak):
                self._nan_rollback(streak)

    def _end_epoch(self) -> tuple[bool, str]:
        """Validate, update early stopping and the best files, record history, save the checkpoint."""
        epoch_no = self.pos.epoch + 1
        train_loss, train_acc, seen, skipped = self.metrics.summary(self.dist.sum_)
        if self.dist.enabled and len(set(digests := self.dist.weights_digest(self.model))) > 1:
            raise TrainingFailed(f"the {self.dist.world} processes hold different weights after epoch {epoch_no} "
                                 f"({', '.join(d[:12] for d in digests)}): they are out of step; the run stops")
        self.average.recompute_bn(self.batches.x_train, self.batch_size, self.prepare, self.model)
        val_loss, val_acc, _ = self.validator(*self.evaluated, self.batches.x_val, self.batches.y_val)
        metrics = {"val_acc": val_acc, "val_loss": val_loss}
        stop, reason = self.early.update(metrics[self.cfg.monitor], epoch_no, metrics[self.checkpoints.tiebreak_key])
        all_metrics = {**metrics, "train_loss": train_loss, "train_acc": train_acc}
        is_best, dropped = self.checkpoints.save_best(epoch_no, all_metrics, lambda: self.model_payload(epoch_no, all_metrics))
        record = {
            "epoch": epoch_no, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "lr": self.lr_of_step(self.pos.global_step - 1), "nan_skipped": skipped, "best": is_best,
            "seconds": round(self.clock.epoch_seconds(), 3), "images_per_s": round(seen / max(self.clock.train_before, 1e-9), 1),
            "save_seconds": round(self.checkpoints.save_seconds, 4)}
        self.history.close_epoch(record)
        self.log(epoch_line(record, self.cfg.epochs))
        if self.metrics_logger is not None:
            self.metrics_logger.log_epoch(self.pos.global_step, record)
        if skipped:
            self.log(f"warning: {skipped} update(s) skipped in epoch {epoch_no} because the loss or gradient was NaN/Inf")
        # Next epoch's position first, so the checkpoint written now resumes after this epoch.
        self.pos.next_epoch()
        self.clock.new_epoch()
        self.metrics.reset()
        self.checkpoints.write_history(self.history)
        self.save_last()
        self.checkpoints.drop(dropped)
        self.history[-1]["save_seconds"] = round(self.checkpoints.take_save_seconds(), 4)  # with the end-of-epoch save
        if self.on_epoch_end is not None:
            try:
                self.on_epoch_end(self.history)
            except Exception as err:  # noqa: BLE001 - a report must never stop training
                logger.warning(f"end-of-epoch report failed: {type(err).__name__}: {err}")
        return stop, reason

    def _coordinate(self) -> bool:
        """Whether a periodic save is due after this step. Under several processes the ranks agree, every
        ``sync_every`` steps, on a stop signal any of them received and on a save rank 0's clock finds due;
        in between only the step count (the same on every rank) decides."""
        gs = self.pos.global_step
        if not self.dist.enabled:
            return self.checkpoints.periodic_due(gs)
        if gs % self.sync_every:
            return self.checkpoints.periodic_due(gs, by_time=False)
        signum, due = self.dist.max_ints([self.guard.received or 0, int(self.checkpoints.periodic_due(gs))])
        if signum:
            self.guard.request_stop(signum)
            self.stop_agreed = True
        return bool(due)

    def _check_stop(self) -> None:
        if self.guard.stop_requested and (self.stop_agreed or not self.dist.enabled):
            self.save_last()
            self.checkpoints.write_history(self.history)
            pos = self.pos
            raise self.guard.stopped(f"{self.guard.name}: stopped at epoch {pos.epoch + 1}, step {pos.step} of {self.steps_per_epoch} "
                                     f"(global step {pos.global_step}); state saved to {self.checkpoints.run.last}. "
                                     "Run the same command to continue.")

    # --- recovery: one way back to a checkpoint ------------------------------------------------------

    def restore_latest(self, reason: str, **details: Any) -> Path:
        """Reload the newest valid checkpoint, keeping what this process learnt (OOM split, NaN lr);
        record the event ``reason`` with ``details`` and save at once, so a crash does not lose it."""
        # Rank 0 reads and verifies; every rank continues from what it read.
        loaded = self.dist.broadcast_object(self.checkpoints.load_latest() if self.dist.is_main else None)
        for problem in loaded.problems:
            logger.warning(problem)
        if loaded.state is None:
            raise TrainingFailed(f"{reason.replace('_', ' ')} impossible: no valid checkpoint (" + "; ".join(loaded.problems) + ")")
        self.checkpoints.quarantine(loaded.damaged)
        self.load_state_dict(loaded.state, carry_over=True)
        self.checkpoints.tidy_after_resume()  # best-K files of an epoch the checkpoint never recorded
        # A checkpoint saved inside a NaN streak (read every sync_every steps): count afresh, or it rolls back again.
        self.metrics.clear_streak()
        self.history.event(reason, global_step=self.pos.global_step, **details, **{"from": loaded.path.name})
        self.save_last(progress=False)
        return loaded.path

    def _nan_rollback(self, streak: int, cause: str | None = None) -> None:
        scale = self.nan.start_rollback(streak, self.cfg.lr, cause)  # kept over the checkpoint's by restore_latest's carry-over
        path = self.restore_latest("nan_rollback", lr_scale=scale, rollback=self.nan.rollbacks)
        self.log(f"{cause or f'{streak} non-finite steps in a row'}: rolled back to {path.name} (epoch {self.pos.epoch + 1}, step "
                 f"{self.pos.step}) and lowered the learning rate x{self.cfg.nan_lr_factor} (rollback "
                 f"{self.nan.rollbacks}/{self.nan.max_rollbacks})")
        raise RolledBack()

    def _recover(self, err: Exception) -> None:
        """Log, cool down, reload the newest valid checkpoint; raise when the retry budget is spent."""
        pos = self.pos
        where = f"epoch {pos.epoch + 1}, step {pos.step}, global step {pos.global_step}"
        logger.error(f"error during training at {where}:\n{traceback.format_exc()}")
        self.retries.record(where, err)
        self.log(f"recovering (retry {len(self.retries.failures)}/{self.cfg.max_retries})")
        self._cooldown()
        path = self.restore_latest("retry", error=f"{type(err).__name__}: {err}"[:300], attempt=len(self.retries.failures))
        self.log(f"resumed from {path.name} at epoch {pos.epoch + 1}, step {pos.step}")

    def _retry_save(self, path: Path, reason: str, attempt: int) -> bool:
        """A write failed (disk full, read-only, network drive): cool down; the same state is then written again."""
        if not self.retries.take(f"writing {path.name} at global step {self.pos.global_step}", OSError(reason)):
            return False
        self.history.event("save_retry", file=path.name, error=reason, attempt=attempt, global_step=self.pos.global_step)
        self.log(f"cannot write {path.name}: {reason}; trying the save again from the state in memory "
                 f"(retry {len(self.retries.failures)}/{self.cfg.max_retries})")
        self._cooldown()
        return True

    def _cooldown(self) -> None:
        if not self.retries.cool_down(lambda: self.guard.stop_requested, self.log):
            raise Interrupted(f"{self.guard.name} during the cool-down: exiting; {self.checkpoints.run.last} holds the "
                              "last saved state. Run the same command to continue.",
                              signal_name=self.guard.name, exit_code=self.guard.exit_code)
