"""Batch-norm layers beyond torch's: GlobalBatchNorm, the global-batch statistics of --sync-bn."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


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
