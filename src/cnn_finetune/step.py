"""The maths of one optimizer step, kept apart from the loop that decides which step comes next.

A step draws its augmentation (and any other random number) from ``(seed, epoch, step)``, runs the
forward and backward passes, skips the update on the device when the loss or the gradient is not
finite (the fused optimizer's ``found_inf``: no host-device sync), and updates the running metrics.
After a CUDA out-of-memory error the same step is redone as 2, 4, 8... micro-batches with gradient
accumulation; ghost batch norm and a loss normalised by the whole batch keep the result the same.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import AugmentParams, augment_batch, normalize
from .config import TrainConfig
from .mechanisms import EpochMetrics, MicroBatcher, mix_seed
from .model import CNNv2, deferred_bn_stats, grad_norm, split_for_micro_batches
from .sampling import DeviceData


class StepRunner:
    """Runs optimizer steps of ``model`` (trained through ``net``, its compiled or wrapped form)."""

    def __init__(self, cfg: TrainConfig, model: CNNv2, net: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: DeviceData, micro: MicroBatcher, metrics: EpochMetrics, *, mean: float, std: float,
                 channels_last: bool, on_event: Callable[..., None], log: Callable[[str], None]) -> None:
        self.cfg, self.model, self.net, self.optimizer = cfg, model, net, optimizer
        self.batches, self.micro, self.metrics = batches, micro, metrics
        self.device = batches.device
        self.mean, self.std = mean, std
        self.on_event, self.log = on_event, log
        self.augment = AugmentParams(cfg.aug_rotation, cfg.aug_translate, cfg.aug_scale, cfg.aug_noise)
        self.generator = torch.Generator(device=self.device)
        self.channels_last = channels_last  # the input's memory format follows the model's
        cuda_bf16 = cfg.amp == "auto" and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if (cfg.amp == "bf16" or cuda_bf16) else None

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
        batch = yb.shape[0]
        weights = self.batches.class_weights
        # The loss is normalised by the whole batch, so micro-batches add up to the same gradient.
        # (A Python float, not a device tensor: copying it to a GPU would synchronise every step.)
        denom = weights[yb].sum() if weights is not None else float(batch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        while True:
            try:
                loss_sum, correct = self._forward_backward(xb, yb, denom)
                break
            except torch.OutOfMemoryError as err:
                self._split_after_oom(err, batch, global_step)
        norm = grad_norm(self.model, self.cfg.grad_clip)
        bad = ~(torch.isfinite(loss_sum) & torch.isfinite(norm))
        self.optimizer.found_inf = bad.to(torch.float32)  # fused optimizers skip the update on device
        self.optimizer.step()
        self.metrics.add(loss_sum, correct, batch, denom, bad)
        if self.micro.on_success():
            self.on_event("oom_probe", global_step=global_step, micro_batches=self.micro.parts)

    def _forward_backward(self, xb: torch.Tensor, yb: torch.Tensor, denom: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the batch, accumulated over the current number of micro-batches."""
        sizes = split_for_micro_batches(self.model, yb.shape[0], self.micro.parts)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        with deferred_bn_stats(self.model):
            for xs, ys in zip(xb.split(sizes), yb.split(sizes)):
                with self.autocast():
                    logits = self.net(xs)
                part = F.cross_entropy(logits.float(), ys, weight=self.batches.class_weights, reduction="none",
                                       label_smoothing=self.cfg.label_smoothing).sum()
                (part / denom).backward()
                loss_sum = loss_sum + part.detach()
                correct += (logits.detach().argmax(1) == ys).sum()
        return loss_sum, correct

    def _split_after_oom(self, err: BaseException, batch: int, global_step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        sizes = self.micro.split_after_oom(
            lambda parts: split_for_micro_batches(self.model, batch, parts),
            f"the model does not fit on {self.device}; free GPU memory, use --device cpu, or lower --width ({err})")
        self.on_event("oom", global_step=global_step, micro_batches=len(sizes))
        self.log(f"CUDA out of memory at step {global_step}: redoing it as {len(sizes)} micro-batches of "
                 f"{max(sizes)} (same effective batch {batch})")
