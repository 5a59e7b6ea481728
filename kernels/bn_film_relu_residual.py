"""Fused ops of fastfilm, registered with torch.library.

`bn_film_relu_residual` is the tail of every FiLM ResBlock:
    out = residual + relu(gamma[:, :, None, None] * BN(y) + beta[:, :, None, None])
with BN a batch norm without affine. `bn_film_relu_residual_reference` is that expression in
plain eager torch ops (`film_relu_residual` its part after the batch norm), the one definition
that the tests, the benchmark and the model's unfused ablation use. Two backends compute it fused:
- "torch": plain torch ops (an autograd.Function whose forward and backward are torch ops),
  which torch.compile traces through so that inductor fuses them (on CPU too);
- "triton": the kernels of fastfilm.kernels.bn_film_relu_residual_triton behind opaque custom ops
  (`torch.ops.fastfilm.*`) with autograd and fake registrations, so torch.compile keeps
  them as single calls without a graph break.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _out_dtype(y: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor) -> torch.dtype:
    """The dtype the unfused expression would produce (type promotion of all four)."""
    return functools.reduce(torch.promote_types, (y.dtype, residual.dtype, gamma.dtype, beta.dtype))


def _kernels():
    # Imported on first use: the torch backend needs no Triton, and the kernels read
    # TRITON_INTERPRET when they are defined.
    from fastfilm.kernels import bn_film_relu_residual_triton as k
    return k


# ---------------------------------------------------------------- triton backend: custom ops

@torch.library.custom_op("fastfilm::bn_stats", mutates_args=("running_mean", "running_var"))
def _stats_op(y: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
              eps: float) -> tuple[Tensor, Tensor]:
    """Batch mean [C] and rstd [C] of y [N, C, H, W]; updates the running stats in place.
    Not differentiable: the forward op's backward accounts for the statistics' dependence on y."""
    return _kernels().bn_stats_fwd(y, running_mean, running_var, momentum=momentum, eps=eps)


@_stats_op.register_fake
def _(y, running_mean, running_var, momentum, eps):
    stat = y.new_empty((y.shape[1],), dtype=_acc_dtype(y))
    return stat, torch.empty_like(stat)


@torch.library.custom_op("fastfilm::bn_film_relu_residual_fwd", mutates_args=())
def _fwd_op(y: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, stat: Tensor,
            training: bool, eps: float) -> Tensor:
    """out [N, C, H, W] from mean [C] and stat [C]: the batch rstd (training) or the running
    variance (eval, folded in the same single pass)."""
    return _kernels().bn_film_relu_residual_fwd(
        y, residual, gamma, beta, mean, stat, is_var=not training, eps=eps,
        out_dtype=_out_dtype(y, residual, gamma, beta))


@_fwd_op.register_fake
def _(y, residual, gamma, beta, mean, stat, training, eps):
    return _kernels().empty_like_act(y, _out_dtype(y, residual, gamma, beta))


@torch.library.custom_op("fastfilm::bn_film_relu_residual_bwd", mutates_args=())
def _bwd_op(dout: Tensor, y: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, rstd: Tensor,
            training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dy [N, C, H, W], dgamma [N, C], dbeta [N, C]."""
    return _kernels().bn_film_relu_residual_bwd(dout, y, gamma, beta, mean, rstd, training=training)


@_bwd_op.register_fake
def _(dout, y, gamma, beta, mean, rstd, training):
    return (_kernels().empty_like_act(y, y.dtype), gamma.new_empty(gamma.shape),
            beta.new_empty(beta.shape))


def _fwd_setup(ctx, inputs, output) -> None:
    y, residual, gamma, beta, mean, stat, training, eps = inputs
    ctx.save_for_backward(y, gamma, beta, mean, stat)
    ctx.residual_dtype = residual.dtype
    ctx.training, ctx.eps = training, eps


def _fwd_backward(ctx, dout):
    y, gamma, beta, mean, stat = ctx.saved_tensors
    acc = _acc_dtype(y)
    rstd = stat if ctx.training else torch.rsqrt(stat.to(acc) + ctx.eps)
    dy, dgamma, dbeta = _bwd_op(dout, y, gamma, beta, mean.to(acc), rstd, ctx.training)
    return dy, dout.to(ctx.residual_dtype), dgamma, dbeta, None, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ---------------------------------------------------------------- torch backend

class _TorchBnFilm(torch.autograd.Function):
    """The fused op as torch ops, given detached per-channel statistics. The backward is
    written out (not derived) so that it saves only y, gamma, beta, mean, rstd and
    recomputes the ReLU mask, like the Triton kernels; inductor fuses each pass."""

    @staticmethod
    def forward(ctx, y: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor,
                rstd: Tensor, training: bool) -> Tensor:
        acc = mean.dtype
        a = gamma.to(acc) * rstd                      # [N, C]
        b = beta.to(acc) - a * mean                   # [N, C]
        z = torch.relu(a[:, :, None, None] * y.to(acc) + b[:, :, None, None])
        ctx.save_for_backward(y, gamma, beta, mean, rstd)
        ctx.training = training
        ctx.residual_dtype = residual.dtype
        # z first: on mixed layouts the output follows y's, as with the Triton backend.
        return (z + residual.to(acc)).to(_out_dtype(y, residual, gamma, beta))

    @staticmethod
    def backward(ctx, dout: Tensor):
        y, gamma, beta, mean, rstd = ctx.saved_tensors
        acc = mean.dtype
        g = gamma.to(acc)
        a = g * rstd
        b = beta.to(acc) - a * mean
        yf = y.to(acc)
        dz = torch.where(a[:, :, None, None] * yf + b[:, :, None, None] > 0, dout.to(acc), 0)
        xhat = (yf - mean[:, None, None]) * rstd[:, None, None]
        dbeta = dz.sum((2, 3))                        # [N, C]
        dgamma = (dz * xhat).sum((2, 3))              # [N, C]
        if ctx.training:
            rows = y.shape[0] * y.shape[2] * y.shape[3]
            k1 = (g * dbeta).sum(0) / rows            # [C] mean of dxhat
            k2 = (g * dgamma).sum(0) / rows           # [C] mean of dxhat * xhat
            dy = rstd[:, None, None] * (g[:, :, None, None] * dz - k1[:, None, None] - xhat * k2[:, None, None])
        else:
            dy = a[:, :, None, None] * dz
        return (dy.to(y.dtype), dout.to(ctx.residual_dtype), dgamma.to(gamma.dtype),
                dbeta.to(beta.dtype), None, None, None)


def _batch_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean [C] and biased variance [C] of y [N, C, H, W].

    Exact two-pass moments of each (n, c) plane (a plane is small enough to be re-read from
    cache), merged across n with Chan's formula for equal counts: numerically safe, and on
    CPU inductor compiles it to a faster forward than a Welford var_mean over (0, 2, 3)
    (docs/bn_film_relu_residual.md)."""
    hw = y.shape[2] * y.shape[3]
    plane_mean = y.mean((2, 3))                                              # [N, C]
    plane_m2 = (y - plane_mean[:, :, None, None]).square().sum((2, 3))      # [N, C]
    mean = plane_mean.mean(0)                                                # [C]
    m2 = plane_m2.sum(0) + hw * (plane_mean - mean).square().sum(0)         # [C]
    return mean, m2 / (y.shape[0] * hw)


def _torch_backend(y: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], training: bool, momentum: float, eps: float) -> Tensor:
    acc = _acc_dtype(y)
    if training:
        with torch.no_grad():
            mean, var = _batch_stats(y.to(acc))
            if running_mean is not None:
                rows = y.shape[0] * y.shape[2] * y.shape[3]
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (rows / (rows - 1))).to(running_var.dtype),
                                                    alpha=momentum)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    rstd = torch.rsqrt(var + eps)
    return _TorchBnFilm.apply(y, residual, gamma, beta, mean, rstd, training)


# ---------------------------------------------------------------- public op

def _check(y: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor],
           running_var: Optional[Tensor], training: bool, backend: str) -> None:
    """Programming errors (what a caller hands the op): ValueError, TypeError for dtypes."""
    where = "bn_film_relu_residual"
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend={backend!r}; choose from {BACKENDS}")
    if y.dim() != 4:
        raise ValueError(f"{where}: y must be [N, C, H, W], got shape {tuple(y.shape)}")
    N, C, H, W = y.shape
    if residual.shape != y.shape:
        raise ValueError(f"{where}: residual has shape {tuple(residual.shape)}, y has {tuple(y.shape)}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t.shape != (N, C):
            raise ValueError(f"{where}: {name} must be [N, C] = {[N, C]}, got {tuple(t.shape)}")
    named = [("y", y), ("residual", residual), ("gamma", gamma), ("beta", beta)]
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{where}: running_mean and running_var must be given together")
    if running_mean is not None:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.shape != (C,):
                raise ValueError(f"{where}: {name} must be [C] = [{C}], got {tuple(t.shape)}")
            named.append((name, t))
    elif not training:
        raise ValueError(f"{where}: eval mode (training=False) needs running_mean and running_var")
    for name, t in named:
        if t.dtype not in _FLOATS:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; expected one of {_FLOATS}")
        if t.device != y.device:
            raise ValueError(f"{where}: {name} is on {t.device}, y on {y.device}")
    if training and N * H * W <= 1:
        # F.batch_norm raises ValueError here too.
        raise ValueError(f"{where}: batch norm needs more than 1 value per channel when training, "
                         f"got y of shape {tuple(y.shape)}")


def film_relu_residual(normed: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """residual + relu(gamma * normed + beta), eager: the expression after the batch norm.
    normed, residual: [N, C, H, W]; gamma, beta: [N, C]. Returns [N, C, H, W]. Apart so that a
    caller whose batch norm is a module (FusedResBlock's unfused ablation, where it may be a
    GlobalBatchNorm) shares the expression."""
    return residual + torch.relu(gamma[:, :, None, None] * normed + beta[:, :, None, None])


def bn_film_relu_residual_reference(y: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor,
                                    running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                                    training: bool, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """The unfused expression in plain eager torch ops: what every backend must reproduce.

    Arguments and result as bn_film_relu_residual's; running_mean and running_var are updated
    in place when training, by F.batch_norm (num_batches_tracked belongs to the caller's module).
    """
    bn = F.batch_norm(y, running_mean, running_var, None, None, training, momentum, eps)
    return film_relu_residual(bn, residual, gamma, beta)


def bn_film_relu_residual(y: Tensor, residual: Tensor, gamma: Tensor, beta: Tensor,
                          running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                          training: bool, momentum: float = 0.1, eps: float = 1e-5,
                          backend: str = "auto") -> Tensor:
    """residual + relu(gamma * batch_norm(y) + beta), batch norm without affine, fused.

    y, residual: [N, C, H, W] (contiguous, channels_last or strided; fp32/fp16/bf16/fp64);
    gamma, beta: [N, C]; running_mean, running_var: [C] (may be None when training),
    updated in place when training exactly as F.batch_norm does (unbiased variance).
    Returns out: [N, C, H, W] of the promoted dtype of y, residual, gamma, beta.
    Differentiable in y, residual, gamma and beta. backend: "triton" (CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1), "torch" (torch ops that torch.compile fuses), or
    "auto" (Triton on CUDA, torch otherwise).
    """
    _check(y, residual, gamma, beta, running_mean, running_var, training, backend)
    if backend == "auto":
        backend = "triton" if y.is_cuda else "torch"
    if backend == "torch":
        return _torch_backend(y, residual, gamma, beta, running_mean, running_var, training, momentum, eps)
    if not y.is_cuda and not _kernels().INTERPRETED:
        raise ValueError("bn_film_relu_residual: backend='triton' needs CUDA tensors, or "
                         "TRITON_INTERPRET=1 set before fastfilm.kernels is imported for CPU tensors")
    if training:
        mean, stat = _stats_op(y.detach(), running_mean, running_var, float(momentum), float(eps))
    else:
        mean, stat = running_mean, running_var
    return _fwd_op(y, residual, gamma, beta, mean, stat, training, float(eps))
