"""Data-parallel training on torch.distributed, set up from torchrun's environment.

    torchrun --nproc_per_node K -m fastfilm train DATA ...      (docs/distributed.md)

Each process ("rank") holds a whole model; DistributedDataParallel averages the gradients
over ranks in every backward. NCCL on CUDA (rank r uses cuda:LOCAL_RANK), gloo on CPU.
Every collective has a timeout (`--dist-timeout-s`): a rank that stops answering makes the
others fail with an error instead of waiting forever, and a rank that raises closes its
connections (the group is destroyed in a `finally`), which fails its peers at once.

Batch norm: per rank by default (each rank normalises with its own batch statistics; DDP
copies rank 0's running statistics to every rank before each forward). `sync_bn` replaces
every BatchNorm with `GlobalBatchNorm`, which normalises with the statistics of the global
batch (all-gathered, differentiable). The fused ResBlock op computes its statistics inside
the kernel, so with sync_bn the trainer builds the model with the unfused ResBlock tail.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastfilm.errors import UserError

# Substrings of the errors gloo and NCCL raise when a peer died, stalled or hung up.
_COMM_ERRORS = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                "Broken pipe", "timed out")


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun; 1 when not launched by it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.lstrip("-").isdigit():
        raise UserError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but environment variable {name} is "
                        f"{'missing' if value is None else repr(value)}: launch with torchrun")
    return int(value)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. Its collectives are no-ops in a single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def totals(self, loss_sum: Tensor, correct: Tensor, seen: int, flag: bool) -> tuple[float, int, int, bool]:
        """(loss sum, correct, seen) summed over ranks, and rank 0's `flag`, in one all-reduce.
        loss_sum: [] float, correct: [] int, both on the device. One host sync."""
        if not self.enabled:
            return loss_sum.item(), int(correct.item()), seen, flag
        values = torch.stack([loss_sum.detach().double(), correct.double(),
                              loss_sum.new_tensor(seen, dtype=torch.float64),
                              loss_sum.new_tensor(float(flag and self.is_main), dtype=torch.float64)])
        dist.all_reduce(values)
        loss, hits, n, flag_sum = values.tolist()
        return loss, int(hits), int(n), flag_sum > 0

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (decisions that must not differ, or a rank would hang)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (batch norm running statistics) to every rank."""
        if self.enabled:
            for buf in module.buffers():
                dist.broadcast(buf, 0)

    def merge_predictions(self, preds: np.ndarray) -> np.ndarray:
        """preds: [Q] int64, this rank's predictions and -1 for questions of other shards ->
        every rank's predictions [Q]. Shards are disjoint and a shard's padding repeats its own
        questions into the same slots, so each question counts exactly once."""
        if not self.enabled:
            return preds
        t = torch.from_numpy(np.ascontiguousarray(preds, dtype=np.int64)).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        merged = t.cpu().numpy()
        missing = int((merged < 0).sum())
        if missing:
            raise RuntimeError(f"{missing} of {len(merged)} questions were predicted by no rank: "
                               "the evaluation loaders are not sharded (rank, world) over the same split")
        return merged


def _device_for(device: str, local_rank: int, world: int) -> torch.device:
    from fastfilm.evaluate import resolve_device

    dev = resolve_device("cuda" if device == "auto" and torch.cuda.is_available() else device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None and dev.index != local_rank:
        raise UserError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda "
                        "(or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} visible GPUs: "
                        f"--nproc_per_node must be at most that (world size {world})")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device: str = "auto", timeout_s: float = 600.0) -> Iterator[Dist]:
    """This process's Dist; under torchrun (WORLD_SIZE > 1) the process group is initialised
    (NCCL for CUDA, gloo for CPU, every collective timing out after `timeout_s`) and destroyed
    on exit, error or not. A group the caller initialised is used and left alone."""
    from fastfilm.evaluate import resolve_device

    if timeout_s <= 0:
        raise UserError(f"--dist-timeout-s must be > 0, got {timeout_s}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        yield Dist(rank, world, local, _device_for(device, local, world) if world > 1 else resolve_device(device),
                   timeout_s)
        return
    world = launched_world_size()
    if world <= 1:
        yield Dist(device=resolve_device(device), timeout_s=timeout_s)
        return
    if not dist.is_available():
        raise UserError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    dev = _device_for(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=dev if dev.type == "cuda" else None)
    try:
        yield Dist(rank, world, local, dev, timeout_s)
    finally:
        # Closing this rank's connections fails the peers' pending collectives at once.
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process is rank 0 (or the only process), also outside a session."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launched_world_size() <= 1 or os.environ.get("RANK", "0") == "0"


def is_comm_error(e: BaseException) -> bool:
    """Whether `e` looks like a failed collective (a peer died, stalled or hung up)."""
    if dist.is_available() and isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _COMM_ERRORS)


def explain_comm_error(e: BaseException, timeout_s: float) -> str:
    """One paragraph for the user of a torchrun job: which rank, what failed, what to look at."""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return (f"rank {os.environ.get('RANK', '?')} of {launched_world_size()}: a collective operation failed "
            f"({first[:300]}). Another rank most likely failed first (see its error) or stalled for more "
            f"than --dist-timeout-s {timeout_s:g} s.")


# ---------------------------------------------------------------- DDP


def wrap(model: nn.Module, ctx: Dist, *, compile: bool, sync_bn: bool, find_unused: bool = False) -> nn.Module:
    """The module the training step calls: `model` itself in a single process; under
    torchrun, DistributedDataParallel around `model` (torch.compile'd first when `compile`
    and it is the fast model). It shares `model`'s parameters, so the optimizer, checkpoints
    and the Predictor keep using `model`. sync_bn: BatchNorms become GlobalBatchNorm first.

    Compile goes inside DDP: DDP's forward runs eagerly and its reducer hooks stay outside
    the graph, while Dynamo sees the active DDP module and splits the compiled graph at
    gradient-bucket boundaries so that the all-reduce of one bucket overlaps the backward
    of the next. GlobalBatchNorm's collectives are graph breaks, hence no fullgraph with it.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    from fastfilm.fastpath import configure_compiler
    from fastfilm.model.fast import FastFiLMNet

    if sync_bn:
        convert_sync_batchnorm(model)
    inner = model
    if compile and isinstance(model, FastFiLMNet):
        configure_compiler()
        inner = torch.compile(model, fullgraph=not sync_bn, dynamic=False)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(inner, device_ids=device_ids, find_unused_parameters=find_unused)


# ---------------------------------------------------------------- synchronised batch norm


class _GatherStats(torch.autograd.Function):
    """stats [K] of this rank -> [W, K] of every rank. The backward hands each rank the sum
    over ranks of the gradients reaching its row: every rank's loss depends on every row."""

    @staticmethod
    def forward(ctx, stats: Tensor) -> Tensor:
        # The list form: gloo and NCCL accept it in every torch version fastfilm supports.
        rows = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, stats.contiguous())
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


@torch._dynamo.disable
def _gather_stats(stats: Tensor) -> Tensor:
    return _GatherStats.apply(stats)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, for inputs [N, C, *] (1d, 2d, 3d).

    Same parameters, buffers and state_dict keys as nn.BatchNorm{1,2,3}d. In training with
    a process group of more than one rank, each rank computes the exact two-pass mean and
    M2 of its batch; one all-gather of [W, 2C+1] merges them (Chan's formula, no large-sum
    cancellation); the backward is one all-reduce of the same size. Otherwise it is plain
    F.batch_norm. Unlike nn.SyncBatchNorm it runs on CPU (gloo) as well as CUDA (NCCL).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, *] -> [N, C, *]."""
        synced = (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        if not synced:
            return super().forward(x)
        c = x.size(1)
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        n = x.numel() // c
        mean = xf.mean(dims)                                                 # [C]
        m2 = (xf - mean.view(shape)).square().sum(dims)                      # [C]
        rows = _gather_stats(torch.cat([mean, m2, mean.new_full((1,), n)]))  # [W, 2C+1]
        means, m2s, counts = rows[:, :c], rows[:, c:2 * c], rows[:, 2 * c:]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total                            # [C]
        g_var = (m2s.sum(0) + (counts * (means - g_mean).square()).sum(0)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = g_var * (total / (total - 1).clamp(min=1))
                self.running_mean.lerp_(g_mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (xf - g_mean.view(shape)) * torch.rsqrt(g_var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d of `module` (in place) by a GlobalBatchNorm that
    takes over its parameters and buffers (the same tensors). Returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child)
    return module


def note(message: str) -> None:
    """A line on stderr from rank 0 only."""
    if is_main():
        print(f"fastfilm: {message}", file=sys.stderr)
