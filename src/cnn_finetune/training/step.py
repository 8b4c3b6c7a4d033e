"""The maths of one optimizer step, kept apart from the loop that decides which step comes next.

A step draws its augmentation (and any other random number) from ``(seed, epoch, step)``, runs the
forward and backward passes, skips the update on the device when the loss or the gradient is not
finite (the fused optimizer's ``found_inf``: no host-device sync), and updates the running metrics.
After a CUDA out-of-memory error the same step is redone as 2, 4, 8... micro-batches with gradient
accumulation; ghost batch norm and a loss normalised by the whole batch keep the result the same.

Under several processes (DistributedDataParallel) the global batch is the configured batch: every
rank augments the whole global batch (the same draws with 1 or N processes) and trains on its
contiguous share of its ghost-batch-norm groups, so the groups, and hence the arithmetic, are those of
one process. Before the last backward pass (the one DDP synchronises) the ranks agree on whether any
of them ran out of memory: then every rank redoes the step with the same number of micro-batches.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.augment import AugmentParams, augment_batch, normalize
from ..config import TrainConfig
from .distributed import Dist
from .mechanisms import EpochMetrics, mix_seed
from .microbatch import MicroBatcher
from ..model.cnn import CNNv2, deferred_bn_stats, grad_norm
from .microbatch import ghost_groups, split_for_micro_batches
from .sampling import DeviceData
from .label_review import MarginTracker
from .averaging import WeightAverage


class PeerOutOfMemory(Exception):
    """Another rank ran out of memory in this step: every rank redoes it as more micro-batches."""


class StepRunner:
    """Runs optimizer steps of ``model`` (trained through ``net``, its compiled or wrapped form)."""

    def __init__(self, cfg: TrainConfig, model: CNNv2, net: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: DeviceData, micro: MicroBatcher, metrics: EpochMetrics, *, mean: float, std: float,
                 channels_last: bool, on_event: Callable[..., None], log: Callable[[str], None],
                 dist: Dist | None = None, ddp: Any = None) -> None:
        self.cfg, self.model, self.net, self.optimizer = cfg, model, net, optimizer
        self.batches, self.micro, self.metrics = batches, micro, metrics
        self.device = batches.device
        self.mean, self.std = mean, std
        self.on_event, self.log = on_event, log
        self.dist, self.ddp = dist or Dist(), ddp  # ddp: the DistributedDataParallel module (None: one process)
        self.last_loss: torch.Tensor | None = None  # the mean loss of the last step (on the device)
        self.augment = AugmentParams(cfg.aug_rotation, cfg.aug_translate, cfg.aug_scale, cfg.aug_noise,
                                     cfg.aug_elastic, cfg.aug_elastic_sigma)
        self.generator = torch.Generator(device=self.device)
        self.channels_last = channels_last  # the input's memory format follows the model's
        cuda_bf16 = cfg.amp == "auto" and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if (cfg.amp == "bf16" or cuda_bf16) else None
        # The area under the margin of every training image, from this step's own logits (label_review.py).
        self.review = MarginTracker(len(batches.y_train), self.device)
        # The EMA (ema_decay > 0), or a copy of the trained weights with clean batch-norm statistics
        # (bn_stats "clean"), is what is validated and kept; neither: a no-op.
        self.average = WeightAverage(model, cfg.ema_decay, cfg.ema_bn, cfg.ema_warmup, follow=cfg.bn_stats == "clean")
        # Per-training-image loss weights once suspects are set aside (set_aside.py); None: every image counts.
        self.keep: torch.Tensor | None = None

    def set_aside(self, images: torch.Tensor) -> None:
        """From now on the training images ``images`` (indices) weigh 0 in the loss; empty: all count again."""
        if images.numel() == 0:
            self.keep = None
            return
        keep = torch.ones(len(self.batches.y_train), dtype=torch.float32, device=self.device)
        keep[images.to(self.device)] = 0.0
        self.keep = keep

    def share_size(self, batch: int) -> int:
        """How many of a global batch of ``batch`` samples this process trains on."""
        start, end, _ = self.dist.shard(ghost_groups(self.model, batch))
        return end - start

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the network's input: normalised, in the model's memory format."""
        x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self) -> Any:
        """bf16 autocast where configured (CUDA by default), else nothing."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def run(self, idx: torch.Tensor, epoch: int, step: int, global_step: int, lr: float) -> None:
        """Forward, backward and update for the samples ``idx`` at position (epoch, step, global_step)."""
        s = mix_seed(self.cfg.seed, epoch, step)
        self.generator.manual_seed(s)
        torch.manual_seed(s)  # any other random draw (e.g. dropout) is a function of the step too
        xb = self.prepare(augment_batch(self.batches.x_train[idx], self.augment, self.generator))
        yb = self.batches.y_train[idx]
        weights = self.batches.class_weights
        # The loss is normalised by the whole (global) batch, so micro-batches and ranks add up to its
        # gradient. (A Python float, not a device tensor: copying it to a GPU would synchronise every step.)
        batch = yb.shape[0]
        denom = weights[yb].sum() if weights is not None else float(batch)
        start, end, groups = self.dist.shard(ghost_groups(self.model, batch))
        # A rank without a sample this step still takes part in the collectives: one sample, weight 0.
        share, weight = (slice(start, end), 1.0) if end > start else (slice(0, 1), 0.0)
        xb, yb, ib = xb[share], yb[share], idx[share]
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        while True:
            try:
                loss_sum, correct = self._forward_backward(xb, yb, ib, denom, weight)
                break
            except (torch.OutOfMemoryError, PeerOutOfMemory) as err:
                self.review.discard()  # the step is redone: its margins come again
                self._split_after_oom(err, yb.shape[0], global_step)
        self.dist.average_buffers(self.model, float(groups))
        norm = grad_norm(self.model, self.cfg.grad_clip)
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(norm))
        bad = self.dist.sum_(bad.to(torch.int32)) > 0  # the skip is decided for every rank at once
        self.optimizer.found_inf = bad.to(torch.float32)  # fused optimizers skip the update on device
        self.optimizer.step()
        self.average.update(self.model)
        self.review.commit(~bad if weight > 0 else torch.zeros((), dtype=torch.bool, device=self.device))
        self.metrics.add(loss_sum, correct, int(weight) * yb.shape[0], denom, bad, batch=batch)
        self.last_loss = loss_sum * self.dist.world / denom  # this rank's share, scaled: for per-step logging
        if self.micro.on_success():
            self.on_event("oom_probe", global_step=global_step, micro_batches=self.micro.parts)

    def _forward_backward(self, xb: torch.Tensor, yb: torch.Tensor, ib: torch.Tensor, denom: Any,
                          weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the batch, accumulated over the current number of micro-batches."""
        sizes = split_for_micro_batches(self.model, yb.shape[0], self.micro.parts)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        # DDP averages the ranks' gradients: times the world size, their sum. (x 1.0 on one process: exact.)
        factor = weight * self.dist.world
        with deferred_bn_stats(self.model, keep=weight > 0):
            try:
                for last, xs, ys, js in self._micro_batches(xb, yb, ib, sizes):
                    with nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                        with self.autocast():
                            logits = self.net(xs)
                        part = F.cross_entropy(logits.float(), ys, weight=self.batches.class_weights, reduction="none",
                                               label_smoothing=self.cfg.label_smoothing)
                        # Set-aside images weigh 0; the denominator stays the batch's, so the others' steps are unchanged.
                        part = (part * self.keep[js]).sum() if self.keep is not None else part.sum()
                        if last and self.dist.any_true(False):  # before DDP's collective: does any rank lack memory?
                            self._drain(logits)
                            raise PeerOutOfMemory()
                        (part * factor / denom).backward()
                    loss_sum = loss_sum + part.detach() * weight
                    self.review.observe(js, logits, ys)
                    correct += (logits.detach().argmax(1) == ys).sum() * int(weight)
            except torch.OutOfMemoryError:
                if self.ddp is not None:
                    self.dist.any_true(True)  # tell the others (they ask before their last backward)
                    self._drain(None, xb[:1])
                raise
        return loss_sum, correct

    def _drain(self, logits: torch.Tensor | None, sample: torch.Tensor | None = None) -> None:
        """Complete DDP's iteration with a zero gradient on every rank, so that the next attempt of the step
        starts in step: a rank that ran out of memory passes one sample (``sample``) to join in."""
        if self.ddp is None:
            return
        if logits is None:
            logits = self.net(sample)
        (logits.float().sum() * 0.0).backward()

    @staticmethod
    def _micro_batches(xb: torch.Tensor, yb: torch.Tensor, ib: torch.Tensor,
                       sizes: list[int]) -> Iterator[tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i, (xs, ys, js) in enumerate(zip(xb.split(sizes), yb.split(sizes), ib.split(sizes))):
            yield i == len(sizes) - 1, xs, ys, js

    def _split_after_oom(self, err: BaseException, batch: int, global_step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        sizes = self.micro.split_after_oom(
            lambda parts: split_for_micro_batches(self.model, batch, parts),
            f"the model does not fit on {self.device}; free GPU memory, use --device cpu, or lower --width ({err})")
        where = "on another process; " if isinstance(err, PeerOutOfMemory) else ""
        self.on_event("oom", global_step=global_step, micro_batches=len(sizes))
        self.log(f"CUDA out of memory at step {global_step}: {where}redoing it as {len(sizes)} micro-batches of "
                 f"{max(sizes)} (same effective batch {batch})")
