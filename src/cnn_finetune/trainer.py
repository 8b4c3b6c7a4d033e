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
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import AugmentParams, augment_batch, normalize
from .checkpoint_manager import CheckpointManager
from .config import TrainConfig
from .data_loader import SplitData
from .errors import Interrupted, RolledBack, TrainingFailed, UserError
from .faults import FaultInjector
from .history import TIMING_KEYS, History, epoch_line
from .log import logger, progress_bar
from .mechanisms import Clock, EarlyStopping, EpochMetrics, MicroBatcher, NanGuard, Position, RetryBudget, lr_at, mix_seed
from .model import ARCH, CNNv2, build_model, deferred_bn_stats, grad_norm, make_optimizer, split_for_micro_batches, unwrap
from .rundir import RunDir
from .runtime import configure_threads, versions
from .sampling import DeviceData
from .signals import SignalGuard
from .validation import Validator

__all__ = ["RobustTrainer", "FitResult", "SplitData", "TIMING_KEYS"]


@dataclass
class FitResult:
    """How ``fit`` ended."""

    status: str  # "completed" or "early_stopped"
    message: str
    best: dict[str, Any] | None = None


class RobustTrainer:
    """Trains a CNN v2 on in-memory data and survives signals, OOM, NaN, crashes and restarts."""

    def __init__(self, cfg: TrainConfig, data: SplitData, device: torch.device, *,
                 checkpoints: CheckpointManager | None = None, init: Callable[[CNNv2], str] | None = None,
                 faults: FaultInjector | None = None, guard: SignalGuard | None = None,
                 on_epoch_end: Callable[[list[dict[str, Any]]], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.faults = faults or FaultInjector("")
        self.guard = guard or SignalGuard()  # not entered: only a caller that installs it gets signals
        self.log = log or logger.info
        self.on_epoch_end = on_epoch_end  # e.g. refresh the training curves; never stops training
        self.checkpoints = checkpoints or CheckpointManager.for_config(RunDir(cfg.output_dir), cfg)
        configure_threads(cfg.num_threads)
        torch.manual_seed(mix_seed(cfg.seed, 0x1417))  # the initial weights are a function of the seed too
        model = build_model(len(data.class_names), width=cfg.width, bn_ghost_size=cfg.bn_ghost_size)
        self.init_note = init(model) if init is not None else "training from scratch"
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
        self.model: CNNv2 = model.to(device, memory_format=torch.channels_last) if self.channels_last else model.to(device)
        self.amp_dtype = torch.bfloat16 if (cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")) else None
        self.validator = Validator(cfg.eval_batch_size, device, self.prepare, self._autocast)
        self.pos = Position()
        self.net: nn.Module = self.faults.wrap(torch.compile(self.model) if cfg.compile else self.model, self.pos,
                                               self.validator)
        self.optimizer = make_optimizer(self.model, name=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, feature_lr_scale=cfg.feature_lr_scale)
        self.augment = AugmentParams(cfg.aug_rotation, cfg.aug_translate, cfg.aug_scale, cfg.aug_noise)
        self.batches = DeviceData(data, device, cfg.batch_size, cfg.seed, cfg.balance)
        self.batch_size, self.steps_per_epoch = self.batches.batch_size, self.batches.steps_per_epoch
        self.class_weights = self.batches.class_weights
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.generator = torch.Generator(device=device)
        self.sync_every = cfg.sync_every or (1 if device.type == "cpu" else 25)
        self.early = EarlyStopping(cfg.patience, cfg.min_delta, self.checkpoints.keeper.mode)
        self.micro = MicroBatcher(cfg.oom_probe_steps)
        self.nan = NanGuard(cfg.nan_max_consecutive, cfg.nan_lr_factor, cfg.nan_max_rollbacks)
        self.retries = RetryBudget(cfg.max_retries, cfg.cooldown_min, cfg.cooldown_max)
        self.metrics = EpochMetrics(device)
        self.clock = Clock()
        self.history = History()
        self.finished: dict[str, Any] | None = None

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
            "accumulators": self.metrics.state_dict(), "early_stopping": self.early.state_dict(),
            "best_keeper": self.checkpoints.state_dict(), "micro_batching": self.micro.state_dict(),
            "nan_guard": self.nan.state_dict(), **self.history.state_dict(), "finished": self.finished,
            "timing": self.clock.state_dict(), "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict[str, Any], carry_over: bool = False) -> None:
        """Restore a checkpoint. ``carry_over``: keep what this process learnt (OOM split, NaN lr)."""
        kept_micro, kept_nan = self.micro.state_dict(), self.nan.state_dict()
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pos.load_state_dict(state["position"])
        self.metrics.load_state_dict(state["accumulators"])
        self.early.load_state_dict(state["early_stopping"])
        self.checkpoints.load_state_dict(state["best_keeper"])
        self.micro.load_state_dict(state["micro_batching"])
        self.nan.load_state_dict(state["nan_guard"])
        self.history.load_state_dict(state)
        self.finished = state["finished"]
        self.init_note = state.get("init", self.init_note)
        self.clock.load_state_dict(state["timing"])
        if carry_over:
            if kept_micro["parts"] > self.micro.parts:
                self.micro.load_state_dict(kept_micro)
            if kept_nan["rollbacks"] > self.nan.rollbacks:
                self.nan.load_state_dict(kept_nan)

    def note_resumed(self, source: str) -> None:
        """Record in the history that this process continued from ``source``."""
        self.history.event("resumed", **{"from": source}, epoch=self.pos.epoch + 1, step=self.pos.step,
                           global_step=self.pos.global_step)

    def model_payload(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        """What a best-model file holds: weights and everything needed to use them."""
        return {**self._identity(), "kind": "model", "epoch": epoch, "metrics": metrics}

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
        cfg = self.cfg
        return lr_at(step, self.total_steps, cfg.lr, cfg.scheduler, cfg.warmup_fraction) * self.nan.lr_scale

    # --- one step ----------------------------------------------------------------------------------

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the network's input: normalised, in the model's memory format."""
        x = normalize(x, self.data.mean, self.data.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self) -> Any:
        """bf16 autocast where configured (CUDA by default), else nothing."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def _train_step(self, idx: torch.Tensor) -> None:
        """Forward, backward and update for one batch; OOM redoes the same step as micro-batches."""
        s = mix_seed(self.cfg.seed, self.pos.epoch, self.pos.step)
        self.generator.manual_seed(s)
        torch.manual_seed(s)  # any other random draw (e.g. dropout) is a function of the step too
        xb = self.prepare(augment_batch(self.batches.x_train[idx], self.augment, self.generator))
        yb = self.batches.y_train[idx]
        batch = yb.shape[0]
        # The loss is normalised by the whole batch, so micro-batches add up to the same gradient.
        # (A Python float, not a device tensor: copying it to a GPU would synchronise every step.)
        denom = self.class_weights[yb].sum() if self.class_weights is not None else float(batch)
        lr = self.lr_of_step(self.pos.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        while True:
            try:
                loss_sum, correct = self._forward_backward(xb, yb, denom)
                break
            except torch.OutOfMemoryError as err:
                self._split_after_oom(err, batch)
        norm = grad_norm(self.model, self.cfg.grad_clip)
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(norm))
        self.optimizer.found_inf = bad.to(torch.float32)  # fused optimizers skip the update on device
        self.optimizer.step()
        self.metrics.add(loss_sum, correct, batch, denom, bad)
        if self.micro.on_success():
            self.history.event("oom_probe", global_step=self.pos.global_step, micro_batches=self.micro.parts)

    def _forward_backward(self, xb: torch.Tensor, yb: torch.Tensor, denom: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the batch, accumulated over the current number of micro-batches."""
        sizes = split_for_micro_batches(self.model, yb.shape[0], self.micro.parts)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        with deferred_bn_stats(self.model):
            for xs, ys in zip(xb.split(sizes), yb.split(sizes)):
                with self._autocast():
                    logits = self.net(xs)
                part = F.cross_entropy(logits.float(), ys, weight=self.class_weights, reduction="none",
                                       label_smoothing=self.cfg.label_smoothing).sum()
                (part / denom).backward()
                loss_sum = loss_sum + part.detach()
                correct += (logits.detach().argmax(1) == ys).sum()
        return loss_sum, correct

    def _split_after_oom(self, err: BaseException, batch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        sizes = self.micro.split_after_oom(
            lambda parts: split_for_micro_batches(self.model, batch, parts),
            f"the model does not fit on {self.device}; free GPU memory, use --device cpu, or lower --width ({err})")
        self.history.event("oom", global_step=self.pos.global_step, micro_batches=len(sizes))
        self.log(f"CUDA out of memory at step {self.pos.global_step}: redoing it as {len(sizes)} micro-batches of "
                 f"{max(sizes)} (same effective batch {batch})")

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train from the current state (fresh, or restored with ``load_state_dict``) to the end.

        Raises ``Interrupted`` on a handled signal (after saving), ``TrainingFailed`` when recovery is
        impossible, ``UserError`` for problems that no retry can fix.
        """
        with self.guard.deferring():
            while True:
                try:
                    result = self._run_epochs()
                    self.checkpoints.write_history(self.history)
                    return result
                except (UserError, TrainingFailed):
                    raise
                except Exception as err:  # noqa: BLE001 - the fault model: retry anything else
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
        return FitResult(status, message, self.checkpoints.keeper.best())

    def _train_epoch(self) -> None:
        """The steps of the current epoch from the current position; raises ``RolledBack`` on a rollback."""
        pos = self.pos
        self.model.train_mode(frozen_features=pos.epoch < self.cfg.freeze_features_epochs)
        order = self.epoch_order(pos.epoch)
        self.clock.start_epoch()
        self._check_stop()
        bar = progress_bar(self.cfg.verbose, self.steps_per_epoch, pos.step, f"epoch {pos.epoch + 1}/{self.cfg.epochs}")
        self.clock.start_training()
        try:
            while pos.step < self.steps_per_epoch:
                idx = self.batches.step_indices(order, pos.step)
                self.faults.before_step(pos.global_step, len(idx))
                self._train_step(idx)
                pos.advance()
                self._sync()
                if bar is not None:
                    bar.update(1)
                end_of_epoch = pos.step == self.steps_per_epoch
                periodic = not end_of_epoch and self.checkpoints.periodic_due(pos.global_step)
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
        train_loss, train_acc, seen, skipped = self.metrics.summary()
        val_loss, val_acc, _ = self.validator(self.net, self.model, self.batches.x_val, self.batches.y_val)
        metrics = {"val_acc": val_acc, "val_loss": val_loss}
        stop, reason = self.early.update(metrics[self.cfg.monitor], epoch_no)
        all_metrics = {**metrics, "train_loss": train_loss, "train_acc": train_acc}
        is_best, dropped = self.checkpoints.save_best(epoch_no, all_metrics, lambda: self.model_payload(epoch_no, all_metrics))
        record = {
            "epoch": epoch_no, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "lr": self.lr_of_step(self.pos.global_step - 1), "nan_skipped": skipped, "best": is_best,
            "seconds": round(self.clock.epoch_seconds(), 3),
            "images_per_s": round(seen / max(self.clock.train_before, 1e-9), 1),
            "save_seconds": round(self.checkpoints.save_seconds, 4),
        }
        self.history.close_epoch(record)
        self.log(epoch_line(record, self.cfg.epochs))
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

    def _check_stop(self) -> None:
        if self.guard.stop_requested:
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
        loaded = self.checkpoints.load_latest()
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

    def _cooldown(self) -> None:
        if not self.retries.cool_down(lambda: self.guard.stop_requested, self.log):
            raise Interrupted(f"{self.guard.name} during the cool-down: exiting; {self.checkpoints.run.last} holds the "
                              "last saved state. Run the same command to continue.",
                              signal_name=self.guard.name, exit_code=self.guard.exit_code)
