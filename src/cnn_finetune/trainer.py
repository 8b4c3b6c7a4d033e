"""RobustTrainer: the training loop and every robustness mechanism.

Determinism is the backbone of recovery: the sample order of an epoch is drawn from a generator
seeded by (seed, epoch), and each step's augmentation and any other random draw from (seed, epoch,
step). The learning rate is a pure function of the global step. A checkpoint therefore needs only
counters besides the weights and optimizer state, and resuming at any step boundary reproduces an
uninterrupted run exactly (on the CPU bit for bit).

Faults and what happens (see also the README):
  * SIGINT/SIGTERM: finish the step, save, exit 130/143 (``Interrupted``).
  * CUDA out of memory: redo the same step as 2, 4, 8... micro-batches (same result).
  * non-finite loss/gradient: skip the update; several in a row roll back and lower the lr.
  * any other exception: cool down, reload the newest valid checkpoint, go on (``max_retries``).
  * a checkpoint that cannot be written: stop at once (``TrainingFailed``), the old one stays valid.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from .augment import AugmentParams, augment_batch, normalize, to_unit
from .checkpoint import (
    MODE_OF_METRIC,
    BestKeeper,
    atomic_write_json,
    link_or_copy,
    load_newest_valid,
    remove_stale_temporaries,
    save_checkpoint,
    set_write_hook,
)
from .config import TrainConfig
from .errors import EXIT_OK, TrainingFailed, UserError
from .faults import FaultInjector
from .mechanisms import EarlyStopping, MicroBatcher, NanGuard, lr_at, mix_seed
from .model import ARCH, CNNv2, build_model, deferred_bn_stats, split_for_micro_batches, unwrap
from .signals import SignalGuard

LAST = "checkpoint_last.pth"
PREV = "checkpoint_prev.pth"
BEST = "best_model_finetuned.pth"
HISTORY = "history.json"
TIMING_KEYS = ("seconds", "images_per_s", "save_seconds", "events")  # differ between identical runs


@dataclass
class SplitData:
    """Training and validation tensors (uint8 images on any device) with what travels with the model."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    class_names: list[str]
    mean: float
    std: float
    fingerprint: str


@dataclass
class FitResult:
    """How ``fit`` ended."""

    status: str  # "completed", "early_stopped", "already_finished", "interrupted"
    exit_code: int
    message: str
    best: dict[str, Any] | None = None


class Interrupted(Exception):
    """A stop signal was handled: the state is saved, the process should exit with ``exit_code``."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ArtifactWriteError(TrainingFailed):
    """An artifact could not be written (disk full, read-only folder): stop, never go on without it."""


def versions() -> dict[str, str]:
    """Versions of the software that produced a run."""
    import numpy
    import PIL

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {"python": sys.version.split()[0], "torch": str(torch.__version__), "numpy": str(numpy.__version__),
            "pillow": str(PIL.__version__), "cnn_finetune": __version__}


class RobustTrainer:
    """Trains a CNN v2 on in-memory data and survives signals, OOM, NaN, crashes and restarts."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: SplitData,
        device: torch.device,
        *,
        base_weights: Callable[[CNNv2], str] | None = None,
        faults: FaultInjector | None = None,
        log: Callable[[str], None] = print,
        verbose: bool = False,
        on_epoch_end: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device
        self.out = Path(cfg.output_dir)
        self.faults = faults or FaultInjector("")
        self.log = log
        self.verbose = verbose
        self.on_epoch_end = on_epoch_end  # e.g. refresh the training curves; never stops training
        self.mode = MODE_OF_METRIC[cfg.monitor]
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)

        torch.manual_seed(mix_seed(cfg.seed, 0x1417))  # the initial weights are a function of the seed too
        model = build_model(len(data.class_names), width=cfg.width, bn_ghost_size=cfg.bn_ghost_size)
        self.init_note = base_weights(model) if base_weights is not None else "training from scratch"
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: CNNv2 = model
        self.net: nn.Module = torch.compile(model) if cfg.compile else model
        self.amp_dtype = torch.bfloat16 if (cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")) else None
        self.optimizer = self._make_optimizer()
        self.augment = AugmentParams(cfg.aug_rotation, cfg.aug_translate, cfg.aug_scale, cfg.aug_noise)

        # Data lives on the training device as uint8: a batch is an index gather.
        self.x_train = data.train_images.to(device)
        self.y_train = data.train_labels.to(device)
        self.x_val = data.val_images.to(device)
        self.y_val = data.val_labels.to(device)
        n = len(self.y_train)
        self.batch_size = min(cfg.batch_size, n)
        self.steps_per_epoch = math.ceil(n / self.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.class_weights: torch.Tensor | None = None
        self.sample_weights: torch.Tensor | None = None
        if cfg.balance != "none":
            from .data_loader import class_weights

            w = class_weights(data.train_labels, len(data.class_names))
            if cfg.balance == "weighted_loss":
                self.class_weights = w.to(device)
            else:
                self.sample_weights = w[data.train_labels].to(torch.float64)
        self.generator = torch.Generator(device=device)
        self.sync_every = cfg.sync_every or (1 if device.type == "cpu" else 25)
        self.eval_batch = cfg.eval_batch_size

        # Mechanisms with state.
        self.early = EarlyStopping(cfg.patience, cfg.min_delta, self.mode)
        self.tiebreak_key, tiebreak_mode = BestKeeper.TIEBREAK[cfg.monitor]
        self.keeper = BestKeeper(self.out, cfg.keep_best, self.mode, tiebreak_mode)
        self.micro = MicroBatcher(cfg.oom_probe_steps)
        self.nan = NanGuard(cfg.nan_max_consecutive, cfg.nan_lr_factor, cfg.nan_max_rollbacks)
        self.failures: list[str] = []  # this process's retry budget; not restored from checkpoints
        self.consecutive_failures = 0  # failures since the last checkpoint that saved progress

        # Position and per-epoch accumulators (device tensors: no sync per step).
        self.epoch = 0
        self.step = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # events of the current epoch, attached to its record
        self.finished: dict[str, Any] | None = None
        # Wall time of the current epoch before this process took over it (timing only).
        self.epoch_elapsed = 0.0
        self.train_elapsed = 0.0
        self._epoch_t0 = time.monotonic()  # when this process started (or resumed) the current epoch
        self._train_t0: float | None = None  # start of the running stretch of training steps
        self._reset_accumulators()
        self._last_save_time = time.monotonic()
        self._save_seconds = 0.0
        self.guard: SignalGuard | None = None

    # -------------------------------------------------------------------------------------------
    # Construction helpers

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups: list[dict[str, Any]] = []
        for part, scale in ((self.model.features, cfg.feature_lr_scale), (self.model.head, 1.0)):
            decay = [p for p in part.parameters() if p.ndim > 1]
            no_decay = [p for p in part.parameters() if p.ndim <= 1]  # norms and biases
            groups.append({"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": scale})
            groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": scale})
        # Fused kernels accept a device-side "found_inf" flag: a non-finite step is skipped
        # without a host-device synchronisation.
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), fused=True)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=True)

    def _reset_accumulators(self) -> None:
        z = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        self.acc = {"loss_sum": z(torch.float64), "correct": z(torch.int64), "seen": z(torch.int64),
                    "nonfinite": z(torch.int64), "streak": z(torch.int64), "max_streak": z(torch.int64)}

    # -------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict[str, Any]:
        """The full training state: enough to continue bit-exactly."""
        return {
            "kind": "training",
            "arch": ARCH,
            "arch_params": self.model.arch_params(),
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": {"epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                         "steps_per_epoch": self.steps_per_epoch},
            "accumulators": {k: v.detach().clone() for k, v in self.acc.items()},
            "early_stopping": self.early.state_dict(),
            "best_keeper": self.keeper.state_dict(),
            "micro_batching": self.micro.state_dict(),
            "nan_guard": self.nan.state_dict(),
            "history": copy.deepcopy(self.history),
            "events": copy.deepcopy(self.events),
            "finished": self.finished,
            "timing": {"epoch_elapsed": self._epoch_seconds(), "train_elapsed": self._train_seconds()},
            "seed": self.cfg.seed,
            "init": self.init_note,
            "config": self.cfg.to_dict(),
            "data_fingerprint": self.data.fingerprint,
            "class_names": list(self.data.class_names),
            "normalization": {"mean": self.data.mean, "std": self.data.std},
            "versions": versions(),
        }

    def load_state_dict(self, state: dict[str, Any], carry_over: bool = False) -> None:
        """Restore a checkpoint. ``carry_over``: keep what this process learnt (OOM split, NaN lr)."""
        kept_micro, kept_nan = self.micro.state_dict(), self.nan.state_dict()
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        pos = state["position"]
        if pos["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(f"checkpoint has {pos['steps_per_epoch']} steps per epoch, this run {self.steps_per_epoch}; the data or batch size differ (use --no-resume)")
        self.epoch, self.step, self.global_step = pos["epoch"], pos["step"], pos["global_step"]
        self.acc = {k: v.to(self.device) for k, v in state["accumulators"].items()}
        self.early.load_state_dict(state["early_stopping"])
        self.keeper.load_state_dict(state["best_keeper"])
        self.micro.load_state_dict(state["micro_batching"])
        self.nan.load_state_dict(state["nan_guard"])
        self.history = copy.deepcopy(state["history"])
        self.events = copy.deepcopy(state["events"])
        self.finished = state["finished"]
        self.init_note = state.get("init", self.init_note)
        self.epoch_elapsed = float(state["timing"]["epoch_elapsed"])
        self.train_elapsed = float(state["timing"]["train_elapsed"])
        self._epoch_t0, self._train_t0 = time.monotonic(), None
        if carry_over:
            if kept_micro["parts"] > self.micro.parts:
                self.micro.load_state_dict(kept_micro)
            if kept_nan["rollbacks"] > self.nan.rollbacks:
                self.nan.load_state_dict(kept_nan)

    def _epoch_seconds(self) -> float:
        return self.epoch_elapsed + (time.monotonic() - self._epoch_t0)

    def _train_seconds(self) -> float:
        return self.train_elapsed + (time.monotonic() - self._train_t0 if self._train_t0 is not None else 0.0)

    def checkpoint_paths(self) -> list[Path]:
        """Resume candidates, newest first."""
        return [self.out / LAST, self.out / PREV]

    # -------------------------------------------------------------------------------------------
    # Randomness and schedule: pure functions of (seed, epoch, step)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample indices of an epoch, from a generator seeded by (seed, epoch)."""
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, 0xE90C))
        n = len(self.data.train_labels)
        if self.sample_weights is not None:
            order = torch.multinomial(self.sample_weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        return order.to(self.device)

    def _seed_step(self, epoch: int, step: int) -> None:
        s = mix_seed(self.cfg.seed, epoch, step)
        self.generator.manual_seed(s)
        torch.manual_seed(s)  # any other random draw (e.g. dropout) is a function of the step too

    def current_lr(self) -> float:
        """Base learning rate of the current global step, NaN rollbacks included."""
        return lr_at(self.global_step, self.total_steps, self.cfg.lr, self.cfg.scheduler, self.cfg.warmup_fraction) * self.nan.lr_scale

    def _set_epoch_mode(self, epoch: int) -> None:
        frozen = epoch < self.cfg.freeze_features_epochs
        self.model.features.requires_grad_(not frozen)
        self.model.train()
        if frozen:
            self.model.features.eval()  # frozen features keep their batch-norm statistics too

    # -------------------------------------------------------------------------------------------
    # One step

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the network's input: normalised, in the model's memory format."""
        x = normalize(x, self.data.mean, self.data.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self) -> Any:
        """bf16 autocast where configured (CUDA by default), else nothing."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def _loss_terms(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=self.class_weights, reduction="none",
                               label_smoothing=self.cfg.label_smoothing)

    def _train_step(self, idx: torch.Tensor) -> None:
        """Forward, backward and update for one batch; OOM redoes the same step as micro-batches."""
        self._seed_step(self.epoch, self.step)
        xb = self._prepare(augment_batch(self.x_train[idx], self.augment, self.generator))
        yb = self.y_train[idx]
        batch = yb.shape[0]
        # The loss is normalised by the whole batch, so micro-batches add up to the same gradient.
        # (A Python float, not a device tensor: copying it to a GPU would synchronise every step.)
        denom = self.class_weights[yb].sum() if self.class_weights is not None else float(batch)
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        while True:
            sizes = split_for_micro_batches(self.model, batch, self.micro.parts)
            try:
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
                correct = torch.zeros((), device=self.device, dtype=torch.int64)
                with deferred_bn_stats(self.model):
                    for xs, ys in zip(xb.split(sizes), yb.split(sizes)):
                        self.faults.on_forward(self.global_step, xs.shape[0], batch)
                        with self._autocast():
                            logits = self.net(self.faults.mangle_input(self.global_step, xs))
                        part = self._loss_terms(logits, ys).sum()
                        part = self.faults.poison_loss(self.global_step, part)
                        (part / denom).backward()
                        loss_sum = loss_sum + part.detach()
                        correct += (logits.detach().argmax(1) == ys).sum()
                break
            except torch.OutOfMemoryError as err:
                self._recover_from_oom(err, batch, len(sizes))
        grad_norm = self._grad_norm()
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = bad.to(torch.float32)  # fused optimizers skip the update on device
        self.optimizer.step()
        acc = self.acc
        good = ~bad
        acc["loss_sum"] += torch.where(good, loss_sum.double() / denom * batch, 0.0)
        acc["correct"] += torch.where(good, correct, 0)
        acc["seen"] += torch.where(good, batch, 0)
        acc["nonfinite"] += bad.long()
        acc["streak"] = (acc["streak"] + 1) * bad.long()
        acc["max_streak"] = torch.maximum(acc["max_streak"], acc["streak"])
        if self.micro.on_success():
            self.events.append({"type": "oom_probe", "global_step": self.global_step, "micro_batches": self.micro.parts})

    def _grad_norm(self) -> torch.Tensor:
        """Total gradient norm (clipped to ``grad_clip`` when set), computed on the device."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: no rescaling pass
        if total_norm is None:
            return torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True)
        return total_norm([p.grad for p in params], foreach=True)

    def _recover_from_oom(self, err: BaseException, batch: int, parts_now: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        parts = self.micro.on_oom()
        sizes = split_for_micro_batches(self.model, batch, parts)
        if len(sizes) <= parts_now:
            smallest = min(split_for_micro_batches(self.model, batch, parts_now))
            raise TrainingFailed(
                f"out of memory even with micro-batches of {smallest} sample(s) (one batch-norm group): "
                f"the model does not fit on {self.device}; free GPU memory, use --device cpu, or lower --width ({err})"
            ) from None
        self.events.append({"type": "oom", "global_step": self.global_step, "micro_batches": len(sizes)})
        self.log(f"CUDA out of memory at step {self.global_step}: redoing it as {len(sizes)} micro-batches of {max(sizes)} (same effective batch {batch})")

    # -------------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0) -> tuple[float, float, torch.Tensor]:
        """Mean loss, accuracy and predictions on uint8 images (OOM: smaller evaluation batches)."""
        was_training = self.model.training
        self.model.eval()
        try:
            while True:
                try:
                    loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                    preds = []
                    for i in range(0, len(labels), self.eval_batch):
                        self.faults.on_eval_forward(epoch, self.eval_batch, self.cfg.eval_batch_size)
                        x = self._prepare(to_unit(images[i:i + self.eval_batch]))
                        with self._autocast():
                            logits = self.net(x)
                        loss_sum += F.cross_entropy(logits.float(), labels[i:i + self.eval_batch], reduction="sum").double()
                        preds.append(logits.argmax(1))
                    break
                except torch.OutOfMemoryError:
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if self.eval_batch == 1:
                        raise TrainingFailed("out of memory while validating one image at a time") from None
                    self.eval_batch = max(1, self.eval_batch // 2)
                    self.log(f"CUDA out of memory in validation: evaluation batch lowered to {self.eval_batch} (training batch unchanged)")
            self.faults.after_validation(epoch)
            pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=self.device)
            n = max(1, len(labels))
            return float(loss_sum) / n, float((pred == labels).sum()) / n, pred
        finally:
            self.model.train(was_training)

    # -------------------------------------------------------------------------------------------
    # Files

    def _write(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except OSError as err:
            last = self.out / LAST
            raise ArtifactWriteError(
                f"cannot write {what} in {self.out}: {err.strerror or err}. Training stopped so that it never goes on "
                f"without checkpoints; {last} still holds the last saved state. Free disk space or make the folder "
                f"writable, then run the same command to continue."
            ) from None

    def save_last(self, progress: bool = True) -> None:
        """Write ``checkpoint_last.pth`` (the previous one becomes ``checkpoint_prev.pth``).

        ``progress``: the save records new training progress, which ends a series of failures.
        """
        t0 = time.perf_counter()
        self._write(LAST, lambda: save_checkpoint(self.state_dict(), self.out / LAST, keep_previous=self.out / PREV))
        self._last_save_time = time.monotonic()
        self._save_seconds += time.perf_counter() - t0
        if progress:
            self.consecutive_failures = 0

    def model_payload(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        """What a best-model file holds: weights and everything needed to use them."""
        return {
            "kind": "model",
            "arch": ARCH,
            "arch_params": self.model.arch_params(),
            "model": unwrap(self.model).state_dict(),
            "class_names": list(self.data.class_names),
            "normalization": {"mean": self.data.mean, "std": self.data.std},
            "epoch": epoch,
            "metrics": metrics,
            "init": self.init_note,
            "data_fingerprint": self.data.fingerprint,
            "config": self.cfg.to_dict(),
            "versions": versions(),
        }

    def write_history(self) -> None:
        """Atomically rewrite ``history.json`` from the in-memory records."""
        self._write(HISTORY, lambda: atomic_write_json(self.out / HISTORY, self.history))

    def _update_best(self, epoch: int, metrics: dict[str, float]) -> tuple[bool, list[str]]:
        """Write the epoch's file if it enters the top K; returns (is the new best, files that fell out).

        The files that fell out are deleted by the caller only after the checkpoint that no longer
        lists them is saved, so a crash in between never leaves the checkpoint naming a missing file.
        """
        metric, tiebreak = metrics[self.cfg.monitor], metrics[self.tiebreak_key]
        if not self.keeper.would_keep(metric, tiebreak, epoch):
            return False, []
        name = self.keeper.file_name(epoch, metric, self.cfg.monitor)
        payload = self.model_payload(epoch, metrics)
        self._write(name, lambda: save_checkpoint(payload, self.out / name))
        dropped = self.keeper.add(epoch, metric, name, tiebreak)
        if self.keeper.best()["epoch"] != epoch:
            return False, dropped
        self._link_best()
        return True, dropped

    def _link_best(self) -> None:
        """Make best_model_finetuned.pth the best-K file of the best epoch (a hard link: no second write)."""
        best = self.keeper.best()
        if best is not None and (self.out / best["file"]).exists():
            self._write(BEST, lambda: link_or_copy(self.out / best["file"], self.out / BEST))

    # -------------------------------------------------------------------------------------------
    # The loop

    def _sync(self, force: bool = False) -> None:
        """Host-side checks at sync points: NaN streaks (rollback) and the progress bar."""
        if not force and self.global_step % self.sync_every:
            return
        streak = int(self.acc["max_streak"])
        if self.nan.needs_rollback(streak):
            self._nan_rollback(streak)

    def _nan_rollback(self, streak: int) -> None:
        if not self.nan.can_roll_back():
            raise TrainingFailed(
                f"the loss stayed NaN/Inf ({streak} steps in a row) after {self.nan.rollbacks} rollbacks that lowered the "
                f"learning rate to {self.cfg.lr * self.nan.lr_scale:.3g}; check the data for broken images and lower --lr"
            )
        state, path, problems = load_newest_valid(self.checkpoint_paths())
        if state is None:
            raise TrainingFailed("NaN rollback impossible: no valid checkpoint (" + "; ".join(problems) + ")")
        self.load_state_dict(state, carry_over=True)
        # The checkpoint may have been saved during this very streak (on a GPU the streak is read only
        # every sync_every steps): start counting afresh, or every later check would roll back again.
        self.acc["streak"].zero_()
        self.acc["max_streak"].zero_()
        scale = self.nan.roll_back()
        self.events.append({"type": "nan_rollback", "global_step": self.global_step, "lr_scale": scale,
                            "rollback": self.nan.rollbacks})
        self.log(f"{streak} non-finite steps in a row: rolled back to {path.name} (epoch {self.epoch + 1}, step {self.step}) and lowered the learning rate x{self.cfg.nan_lr_factor} (rollback {self.nan.rollbacks}/{self.nan.max_rollbacks})")
        self._save_after_recovery()
        self._rolled_back = True

    def _save_after_recovery(self) -> None:
        # Persist the lowered learning rate / recovery event at once, so a crash does not lose it.
        self.save_last(progress=False)

    def _check_stop(self) -> None:
        if self.guard is not None and self.guard.stop_requested:
            self.save_last()
            self.write_history()
            raise Interrupted(
                self.guard.exit_code,
                f"{self.guard.name}: stopped at epoch {self.epoch + 1}, step {self.step} of {self.steps_per_epoch} "
                f"(global step {self.global_step}); state saved to {self.out / LAST}. Run the same command to continue.",
            )

    def _periodic_save_due(self) -> bool:
        every = self.cfg.checkpoint_every_steps
        if every and self.global_step % every == 0:
            return True
        secs = self.cfg.checkpoint_every_seconds
        return bool(secs) and time.monotonic() - self._last_save_time >= secs

    def _run_epochs(self) -> FitResult:
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            self._set_epoch_mode(self.epoch)
            order = self.epoch_order(self.epoch)
            self._epoch_t0 = time.monotonic()
            self._check_stop()
            bar = None
            if self.verbose:
                from tqdm import tqdm

                bar = tqdm(total=self.steps_per_epoch, initial=self.step, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                           leave=False, file=sys.stderr, dynamic_ncols=True)
            self._rolled_back = False
            self._train_t0 = time.monotonic()
            while self.step < self.steps_per_epoch:
                self.faults.before_step(self.global_step)
                idx = order[self.step * self.batch_size:(self.step + 1) * self.batch_size]
                self._train_step(idx)
                self.step += 1
                self.global_step += 1
                self._sync()
                if self._rolled_back:  # position changed: restart the epoch loop from the checkpoint
                    break
                if bar is not None:
                    bar.update(1)
                    if self.global_step % self.sync_every == 0:
                        bar.set_postfix(loss=f"{float(self.acc['loss_sum']) / max(1, int(self.acc['seen'])):.4f}")
                end_of_epoch = self.step == self.steps_per_epoch
                periodic = not end_of_epoch and self._periodic_save_due()
                self.faults.after_step(self.global_step - 1, save_due=end_of_epoch or periodic)
                if periodic:
                    self.save_last()
                self._check_stop()
            if bar is not None:
                bar.close()
            if self._rolled_back:
                continue
            self.train_elapsed = self._train_seconds()
            self._train_t0 = None
            self._sync(force=True)
            if self._rolled_back:
                continue
            stop, reason = self._end_epoch()
            if stop:
                self.finished = {"reason": "early_stopped", "epoch": self.epoch, "detail": reason}
                self.save_last()
                return FitResult("early_stopped", EXIT_OK, f"early stopping after epoch {self.epoch}: {reason}", self.keeper.best())
            self._check_stop()
        self.finished = {"reason": "completed", "epoch": self.epoch, "detail": f"all {cfg.epochs} epochs done"}
        self.save_last()
        return FitResult("completed", EXIT_OK, f"completed {cfg.epochs} epochs", self.keeper.best())

    def _end_epoch(self) -> tuple[bool, str]:
        """Validate, update early stopping and the best files, record history, save the checkpoint."""
        epoch_no = self.epoch + 1
        seen = int(self.acc["seen"])
        train_loss = float(self.acc["loss_sum"]) / seen if seen else float("nan")
        train_acc = int(self.acc["correct"]) / seen if seen else float("nan")
        skipped = int(self.acc["nonfinite"])
        val_loss, val_acc, _ = self.evaluate(self.x_val, self.y_val, epoch=epoch_no)
        metrics = {"val_acc": val_acc, "val_loss": val_loss}
        stop, reason = self.early.update(metrics[self.cfg.monitor], epoch_no)
        is_best, dropped = self._update_best(epoch_no, {**metrics, "train_loss": train_loss, "train_acc": train_acc})
        elapsed = self._epoch_seconds()
        train_time = max(self.train_elapsed, 1e-9)
        record = {
            "epoch": epoch_no,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr_at(self.global_step - 1, self.total_steps, self.cfg.lr, self.cfg.scheduler, self.cfg.warmup_fraction) * self.nan.lr_scale,
            "nan_skipped": skipped,
            "best": is_best,
            "seconds": round(elapsed, 3),
            "images_per_s": round(seen / train_time, 1),
            "save_seconds": round(self._save_seconds, 4),
            "events": list(self.events),
        }
        self.history.append(record)
        self.log(self._epoch_line(record))
        if skipped:
            self.log(f"warning: {skipped} update(s) skipped in epoch {epoch_no} because the loss or gradient was NaN/Inf")
        # Next epoch's position first, so the checkpoint written now resumes after this epoch.
        self.epoch += 1
        self.step = 0
        self.events = []
        self.epoch_elapsed = 0.0
        self.train_elapsed = 0.0
        self._epoch_t0 = time.monotonic()
        self._save_seconds = 0.0
        self._reset_accumulators()
        self.write_history()
        self.save_last()
        for name in dropped:
            (self.out / name).unlink(missing_ok=True)
        self.history[-1]["save_seconds"] = round(self._save_seconds, 4)  # includes the end-of-epoch save
        self._save_seconds = 0.0
        if self.on_epoch_end is not None:
            try:
                self.on_epoch_end(self.history)
            except Exception as err:  # a report must never stop training
                self.log(f"warning: end-of-epoch report failed: {type(err).__name__}: {err}")
        return stop, reason

    def _epoch_line(self, r: dict[str, Any]) -> str:
        mark = "  *best*" if r["best"] else ""
        return (f"epoch {r['epoch']:>3}/{self.cfg.epochs}  train loss {r['train_loss']:.4f} acc {100 * r['train_acc']:6.2f}%  "
                f"val loss {r['val_loss']:.4f} acc {100 * r['val_acc']:6.2f}%  lr {r['lr']:.2e}  "
                f"{r['seconds']:.1f}s  {r['images_per_s']:.0f} img/s{mark}")

    def _preflight(self) -> None:
        """One tiny forward/backward on a copy of the model: programming errors fail at once (exit 2)."""
        probe = copy.deepcopy(self.model)
        probe.train()
        n = min(4, len(self.y_train))
        try:
            x = self._prepare(to_unit(self.x_train[:n]))
            loss = F.cross_entropy(probe(self.faults.mangle_input(self.global_step, x)).float(), self.y_train[:n])
            loss.backward()
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            raise UserError(f"the model cannot train on this data ({type(err).__name__}: {err}); this is not fixed by retrying") from None
        finally:
            del probe

    def _cooldown(self) -> None:
        lo, hi = self.cfg.cooldown_min, self.cfg.cooldown_max
        seconds = min(300.0, random.uniform(lo, hi) * 2 ** (self.consecutive_failures - 1))
        if seconds <= 0:
            return
        self.log(f"cooling down {seconds:.1f}s before retrying")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.guard is not None and self.guard.stop_requested:
                raise Interrupted(self.guard.exit_code, f"{self.guard.name} during the cool-down: exiting; {self.out / LAST} holds the last saved state. Run the same command to continue.")
            time.sleep(max(0.0, min(0.1, end - time.monotonic())))

    def _recover(self, err: Exception) -> None:
        """Log, cool down, reload the newest valid checkpoint; raise when the retry budget is spent."""
        where = f"epoch {self.epoch + 1}, step {self.step}, global step {self.global_step}"
        self.failures.append(f"{where}: {type(err).__name__}: {err}")
        self.consecutive_failures += 1
        print(f"error during training at {where}:\n{traceback.format_exc()}", file=sys.stderr)
        if len(self.failures) > self.cfg.max_retries:
            raise TrainingFailed(
                f"training failed {len(self.failures)} times, more than --max-retries {self.cfg.max_retries}:\n  "
                + "\n  ".join(self.failures)
            ) from None
        self.log(f"recovering (retry {len(self.failures)}/{self.cfg.max_retries})")
        self._cooldown()
        state, path, problems = load_newest_valid(self.checkpoint_paths())
        for p in problems:
            self.log(f"warning: {p}")
        if state is None:
            raise TrainingFailed("no valid checkpoint to recover from: " + "; ".join(problems))
        self.load_state_dict(state, carry_over=True)
        self.events.append({"type": "retry", "global_step": self.global_step, "error": f"{type(err).__name__}: {err}"[:300],
                            "attempt": len(self.failures), "from": path.name})
        self.log(f"resumed from {path.name} at epoch {self.epoch + 1}, step {self.step}")
        self._save_after_recovery()

    def fit(self, resume_state: dict[str, Any] | None = None, resumed_from: str | None = None) -> FitResult:
        """Train to the end (or early stop), surviving what the fault model lists.

        ``resume_state`` is a verified checkpoint to continue from (None: start fresh).
        Raises ``Interrupted`` on a handled signal, ``TrainingFailed`` when recovery is impossible,
        ``UserError`` for problems that no retry can fix.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        for p in remove_stale_temporaries(self.out):
            self.log(f"removed {p.name}, left by a run killed while writing it")
        if resume_state is not None:
            self.load_state_dict(resume_state)
            if self.finished is not None:
                return FitResult("already_finished", EXIT_OK,
                                 f"this run already finished ({self.finished['detail']}); nothing to do. "
                                 "Use --no-resume to train again (the old run is moved aside).", self.keeper.best())
            for stray in self.keeper.stray_files():
                stray.unlink(missing_ok=True)  # written by an epoch the checkpoint had not recorded yet
            self._link_best()  # the best model as the checkpoint knows it, whatever a killed epoch left
            self.events.append({"type": "resumed", "from": resumed_from or LAST, "epoch": self.epoch + 1,
                                "step": self.step, "global_step": self.global_step})
        self._preflight()
        with SignalGuard() as guard:
            self.guard = guard
            try:
                if resume_state is None:
                    try:
                        self.save_last()  # a rollback/retry target from the very start
                    except ArtifactWriteError as err:
                        raise UserError(str(err).split(". Training stopped")[0] + "; choose a writable --output-dir") from None
                while True:
                    try:
                        result = self._run_epochs()
                        self.write_history()
                        return result
                    except (Interrupted, UserError, TrainingFailed, KeyboardInterrupt):
                        raise
                    except Exception as err:  # noqa: BLE001 - the fault model: retry anything else
                        if type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
                            # torch.compile fails the same way every time: not worth a retry.
                            raise UserError(f"torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                                            "run without --compile") from None
                        self._recover(err)
            finally:
                self.guard = None
                set_write_hook(None)
