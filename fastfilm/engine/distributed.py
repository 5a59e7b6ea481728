"""Data-parallel training on torch.distributed, set up from torchrun's environment.

    torchrun --nproc_per_node K -m fastfilm train DATA ...      (docs/distributed.md)

Each process ("rank") holds a whole model; DistributedDataParallel averages the gradients
over ranks in every backward. NCCL on CUDA (rank r uses cuda:LOCAL_RANK), gloo on CPU.
Every collective has a timeout (`--dist-timeout-s`): a rank that stops answering makes the
others fail with an error instead of waiting forever, and a rank that raises closes its
connections (the group is destroyed in a `finally`), which fails its peers at once.

Batch norm: per rank by default (each rank normalises with its own batch statistics; DDP
copies rank 0's running statistics to every rank before each forward). `sync_bn` replaces
every BatchNorm with `GlobalBatchNorm` (fastfilm/model/norm.py), which normalises with the statistics of the global
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
from torch.nn.parallel import DistributedDataParallel
from torch import Tensor

from fastfilm.engine.compile import can_compile, compiled
from fastfilm.errors import UserError
from fastfilm.hardware import resolve_device
from fastfilm.model.norm import convert_sync_batchnorm

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

    def average_(self, tensors: list[Tensor]) -> None:
        """Each tensor replaced in place by its mean over ranks (one all-reduce per tensor)."""
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t)
                t /= self.world_size

    def shared_float(self, value: float) -> float:
        """Rank 0's `value` on every rank (e.g. its clock, which a schedule must read alike)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t.item())

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


def wrap(model: nn.Module, ctx: Dist, *, compile: bool, sync_bn: bool) -> nn.Module:
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
    if sync_bn:
        convert_sync_batchnorm(model)
    inner = compiled(model, fullgraph=not sync_bn) if compile and can_compile(model) else model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Ablations whose question pipeline gets no gradient (no FiLM-ed block, or gamma := 1
    # with beta := 0): DDP must not wait for those gradients.
    find_unused = getattr(model, "may_leave_parameters_unused", lambda: False)()
    return DistributedDataParallel(inner, device_ids=device_ids, find_unused_parameters=find_unused)


def note(message: str) -> None:
    """A line on stderr from rank 0 only."""
    if is_main():
        print(f"fastfilm: {message}", file=sys.stderr)
