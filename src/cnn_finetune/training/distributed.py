"""Several processes under ``torchrun``: the process group, and the few collectives the run needs.

One process without ``torchrun`` (or ``--nproc_per_node=1``) gets a ``Dist`` with ``world == 1``:
every method is then a no-op that returns its input, so the rest of the code reads the same for one
process and for N. Under ``torchrun --nproc_per_node=N`` (and ``--nnodes=M`` with a c10d
rendezvous) every rank joins the default process group (NCCL on CUDA, gloo on the CPU) and a second
gloo group for small host-side decisions (a stop signal, an out-of-memory error, a save that is due):
exchanging a Python flag through gloo never makes a CUDA stream wait on the host.

Decisions that must be taken at the same step by every rank go through ``any_true`` (a MAX
all-reduce). Rank 0 reads and writes files; what it read reaches the others through
``broadcast_object`` over the gloo group (pickled: only ever between the ranks of one run).
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import TrainingFailed, UserError

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that never comes is a failure; torchrun restarts the group


@dataclass
class Dist:
    """This process's place in the run: rank, world size, and the process groups (None: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # default group: NCCL on CUDA, gloo on the CPU
    host_group: Any = None  # gloo, for host-side flags and objects

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reads and writes the run's files and prints."""
        return self.rank == 0

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (host-side, no device sync)."""
        return bool(self.max_ints([int(flag)])[0])

    def max_ints(self, values: list[int]) -> list[int]:
        """The largest of every rank's ``values``, element by element (host-side, one collective)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return [int(v) for v in t.tolist()]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place, on its device."""
        if self.enabled:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def average_buffers(self, model: nn.Module, weight: float) -> None:
        """Make the batch-norm running statistics of every rank their average weighted by ``weight``.

        Each rank updated them from its own ghost-batch-norm groups; weighting by the number of groups
        gives exactly the update one process makes from all the groups (the update is linear), and
        ranks without a group this step (weight 0) do not count. One collective for all buffers.
        """
        if not self.enabled:
            return
        # Only layers in training mode update their statistics: frozen ones (in eval mode) are the same on
        # every rank, and their average could differ from them in the last bit.
        bufs = [b for m in model.modules() if m.training for b in m.buffers(recurse=False) if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1) for b in bufs] + [torch.ones(1, device=bufs[0].device, dtype=bufs[0].dtype)]) * weight
        dist.all_reduce(flat, group=self.group)
        total = flat[-1]
        offset = 0
        for b in bufs:
            b.copy_((flat[offset:offset + b.numel()] / total).view_as(b))
            offset += b.numel()

    def shard(self, groups: list[int]) -> tuple[int, int, int]:
        """This rank's part of a batch made of ghost-batch-norm groups of the given sizes:
        ``(start, end, number of groups)``, contiguous, the groups spread as evenly as possible."""
        n = len(groups)
        # Rounded up: with fewer groups than processes, rank 0 (which saves) is never the one left out.
        first, last = -(-n * self.rank // self.world), -(-n * (self.rank + 1) // self.world)
        return sum(groups[:first]), sum(groups[:last]), last - first

    def weights_digest(self, model: nn.Module) -> list[str]:
        """Every rank's SHA-256 of its parameters and floating-point buffers: equal when the ranks are in step.

        (Batch norm's step counters are left out: a rank that had no sample in a step does not count it;
        rank 0, which saves, always has samples.)"""
        h = hashlib.sha256()
        for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        mine = h.hexdigest()
        if not self.enabled:
            return [mine]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, mine, group=self.host_group)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier(group=self.host_group)

    def close(self) -> None:
        """Leave the process group, and let go of it at once.

        A process group still referenced when the interpreter shuts down is destroyed during its
        finalisation, when gloo's threads can no longer be joined properly: about one exit in seven
        then ended in SIGABRT ("terminate called without an active exception", no Python frame),
        whatever the outcome of the run. Dropping the references here (this object is the only
        holder besides ``torch.distributed``'s own tables, which ``destroy_process_group`` empties)
        frees the groups while the process is whole.
        """
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
            self.group = self.host_group = None
            gc.collect()

    def agree(self, work: Callable[[], Any], run_here: bool = True) -> Any:
        """``work()`` where ``run_here``, then every rank learns whether it failed anywhere.

        A rank that raises ``UserError`` or ``TrainingFailed`` no longer leaves the others waiting in
        the next collective until its exit breaks the connection (a gloo traceback, exit 1): the
        error reaches every rank, which raises it too (bad input is exit 2 on every worker). Any other
        exception is raised where it happened and becomes a ``TrainingFailed`` naming that rank on the
        others. Returns ``work()``'s result (None where it did not run).
        """
        result, failure, raised = None, None, None
        try:
            result = work() if run_here else None
        except (UserError, TrainingFailed) as err:
            failure = err
        except Exception as err:  # noqa: BLE001 - told to the others, then raised here
            raised, failure = err, TrainingFailed(f"process {self.rank} failed: {type(err).__name__}: {err}")
        if self.enabled:
            everyone: list[Any] = [None] * self.world
            dist.all_gather_object(everyone, failure, group=self.host_group)
            failure = next((f for f in everyone if f is not None), None)
        if raised is not None:
            raise raised
        if failure is not None:
            raise failure
        return result


def from_environment(device_type: str) -> Dist:
    """The ``Dist`` of this process: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        if torch.cuda.device_count() <= local_rank:
            raise UserError(f"this process is local rank {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                            "are present: use --nproc_per_node at most the number of GPUs of a machine")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, store=_attempt_store(rank, world), rank=rank, world_size=world, timeout=TIMEOUT)
    host = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return Dist(rank, world, local_rank, dist.group.WORLD, host)


def _attempt_store(rank: int, world: int) -> dist.Store:
    """torchrun's rendezvous store, with a key prefix of its own per restart.

    After torchrun restarts the workers, the store still holds the addresses the killed workers
    published; without a fresh prefix the new ones try to connect to them (seen with gloo in torch
    2.13: "connectFullMesh failed ... Connection refused").
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                         is_master=not agent and rank == 0, timeout=TIMEOUT, multi_tenant=not agent)
    return dist.PrefixStore(f"cnn_finetune/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def data_parallel(module: nn.Module, dist_: Dist, device: torch.device, some_frozen: bool = False) -> nn.Module | None:
    """``module`` in DistributedDataParallel (None on one process).

    ``some_frozen``: some parameters get no gradient in some steps (the feature layers while frozen),
    which DDP must be told of (``find_unused_parameters``), or it waits for their gradients and fails.

    DDP broadcasts rank 0's parameters and buffers once, here, so every rank starts from the same
    weights (a base model or a checkpoint loaded on rank 0 alone would do). Buffers are not broadcast
    at every forward: the batch-norm running statistics are averaged after each step instead
    (``Dist.average_buffers``), which is what one process computes.
    """
    if not dist_.enabled:
        return None
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:  # torch >= 2.13 names it so
        return DDP(module, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=some_frozen)
    return DDP(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=some_frozen)
