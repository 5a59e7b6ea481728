"""Fused BatchNorm (no affine) + FiLM + ReLU + residual add, in Triton.

    out[n, c, h, w] = residual[n, c, h, w] + max(a[n, c] * y[n, c, h, w] + b[n, c], 0)
    a = gamma * rstd[c],  b = beta - a * mean[c]

Every activation is addressed as (n, c, s) with s = h * W + w and strides (sn, sc, ss), so
NCHW (ss == 1) and channels_last (sc == 1) run without a layout conversion; a tensor whose
H and W cannot be collapsed into one stride is made contiguous by the launcher. All
arithmetic is in the accumulation dtype ACC: float64 for float64 inputs (gradcheck),
float32 otherwise. Launches per call: training forward 2 (3 when the statistics are split
across programs), eval forward 1, backward 3 (reduce, merge, dy) in training and 2 in eval.
Design and traffic analysis: docs/bn_film_relu_residual.md.

Kernels are decorated at import: set TRITON_INTERPRET=1 before importing this module to
run them on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Read once, like triton.jit itself: the kernels below are interpreted iff this is True.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Most programs a reduction is split into along N*H*W (statistics) or H*W (backward):
# the merge kernels hold all splits of a channel block in registers at once.
MAX_SPLIT = 256


def _tile_configs(default: tuple[int, int, int]) -> list[triton.Config]:
    """Tile shapes (BLOCK_S, BLOCK_C, num_warps) for the elementwise kernels. The best
    shape depends on the layout (which axis is contiguous) and on H*W (14x14 = 196 fits
    no power of two), so it is autotuned on GPUs; the interpreter gets one config.
    Every config compiles for sm_80 and sm_90 without spilling (tests/test_aot_compile.py);
    (16, 128, 8) was dropped for that: ptxas spills the fp16 NCHW backward at 16-24 bytes."""
    shapes = [default] if INTERPRETED else [
        (256, 4, 4), (128, 8, 4), (64, 16, 4), (32, 32, 4), (16, 64, 4), (8, 128, 4),
        (256, 16, 8), (64, 64, 8),
    ]
    return [triton.Config({"BLOCK_S": s, "BLOCK_C": c}, num_warps=w) for s, c, w in shapes]


# The key holds the strides that say which axis is contiguous (1 is specialised by Triton).
_TILE_KEY = ["C", "HW", "y_sc", "y_ss"]


# ---------------------------------------------------------------------------------- kernels

@triton.jit
def _finalize_stats(mean, m2, rows, cols, cmask, MEAN, RSTD, RM, RV, momentum, eps,
                    HAS_RUNNING: tl.constexpr):
    """mean, m2: [BLOCK_C] over `rows` values each; writes mean, rstd and the running stats."""
    rstd = 1.0 / tl.sqrt(m2 / rows + eps)
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(RSTD + cols, rstd, mask=cmask)
    if HAS_RUNNING:
        # Running variance is unbiased, as in F.batch_norm.
        rm = tl.load(RM + cols, mask=cmask, other=0.0).to(mean.dtype)
        rv = tl.load(RV + cols, mask=cmask, other=0.0).to(mean.dtype)
        rm = (1.0 - momentum) * rm + momentum * mean
        rv = (1.0 - momentum) * rv + momentum * (m2 / (rows - 1))
        tl.store(RM + cols, rm.to(RM.dtype.element_ty), mask=cmask)
        tl.store(RV + cols, rv.to(RV.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_stats_fwd_kernel(
    Y,              # [N, C, H, W], strides (y_sn, y_sc, y_ss), s = h * W + w
    PART,           # [SPLIT, 2, C] ACC: per-split mean and M2 (written unless FINALIZE)
    MEAN, RSTD,     # [C] ACC (written if FINALIZE)
    RM, RV,         # [C] running mean / var, any float dtype (updated if FINALIZE and HAS_RUNNING)
    C, HW, rows, rows_per_split,  # rows = N * HW values per channel
    y_sn, y_sc, y_ss,
    momentum, eps,
    FINALIZE: tl.constexpr, HAS_RUNNING: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C), SPLIT): per-channel mean/M2 of rows [split * rows_per_split, ...)."""
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * y_sc
    start = pid_split * rows_per_split
    end = tl.minimum(start + rows_per_split, rows)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < end
        n = r // HW
        row_off = n.to(tl.int64) * y_sn + (r - n * HW).to(tl.int64) * y_ss
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(Y + row_off[:, None] + col_off[None, :], mask=mask, other=0.0).to(ACC)
        # Exact two-pass moments of the tile (it is in registers), merged into the running
        # ones with Chan's formula: no E[x^2] - E[x]^2 cancellation at any point.
        seen = (r0 - start).to(ACC)
        cnt = tl.minimum(end - r0, BLOCK_R).to(ACC)
        tmean = tl.sum(x, axis=0) / cnt
        d = tl.where(mask, x - tmean[None, :], 0.0)
        tm2 = tl.sum(d * d, axis=0)
        total = seen + cnt
        delta = tmean - mean
        mean += delta * (cnt / total)
        m2 += tm2 + delta * delta * (seen * cnt / total)
    if FINALIZE:
        _finalize_stats(mean, m2, rows, cols, cmask, MEAN, RSTD, RM, RV, momentum, eps, HAS_RUNNING)
    else:
        tl.store(PART + pid_split * 2 * C + cols, mean, mask=cmask)
        tl.store(PART + pid_split * 2 * C + C + cols, m2, mask=cmask)


@triton.jit
def _bn_stats_merge_fwd_kernel(
    PART,           # [SPLIT, 2, C] ACC: per-split mean and M2
    MEAN, RSTD,     # [C] ACC (written)
    RM, RV,         # [C] running stats (updated if HAS_RUNNING)
    C, rows, rows_per_split, n_split,
    momentum, eps,
    HAS_RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C),): all splits at once, mean = sum(cnt * mean_s) / rows and
    M2 = sum(M2_s) + sum(cnt * (mean_s - mean)^2): exact, and a fixed reduction order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sp = tl.arange(0, BLOCK_SPLIT)
    smask = sp < n_split
    cnt = tl.where(smask, tl.minimum(rows_per_split, rows - sp * rows_per_split), 0).to(ACC)
    mask = smask[:, None] & cmask[None, :]
    part = PART + sp[:, None] * 2 * C + cols[None, :]
    pmean = tl.load(part, mask=mask, other=0.0)
    pm2 = tl.load(part + C, mask=mask, other=0.0)
    mean = tl.sum(cnt[:, None] * pmean, axis=0) / rows
    d = tl.where(mask, pmean - mean[None, :], 0.0)
    m2 = tl.sum(pm2, axis=0) + tl.sum(cnt[:, None] * d * d, axis=0)
    _finalize_stats(mean, m2, rows, cols, cmask, MEAN, RSTD, RM, RV, momentum, eps, HAS_RUNNING)


@triton.jit
def _load_scale_shift(GAMMA, BETA, MEAN, STAT, n, cols, cmask, g_sn, g_sc, b_sn, b_sc, eps,
                      IS_VAR: tl.constexpr, ACC: tl.constexpr):
    """Per-(n, c) fold of BN + FiLM: returns a, b, gamma, mean, rstd, each [BLOCK_C]."""
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(ACC)
    stat = tl.load(STAT + cols, mask=cmask, other=1.0).to(ACC)
    if IS_VAR:
        rstd = 1.0 / tl.sqrt(stat + eps)
    else:
        rstd = stat
    g = tl.load(GAMMA + n * g_sn + cols * g_sc, mask=cmask, other=0.0).to(ACC)
    be = tl.load(BETA + n * b_sn + cols * b_sc, mask=cmask, other=0.0).to(ACC)
    a = g * rstd
    return a, be - a * mean, g, mean, rstd


@triton.autotune(configs=_tile_configs((64, 16, 4)), key=_TILE_KEY)
@triton.jit
def _bn_film_relu_residual_fwd_kernel(
    Y, R, OUT,      # [N, C, H, W] each with its own strides (.._sn, .._sc, .._ss)
    GAMMA, BETA,    # [N, C], strides (g_sn, g_sc) / (b_sn, b_sc)
    MEAN, STAT,     # [C]: batch mean and rstd, or (IS_VAR) running mean and running var
    C, HW,
    y_sn, y_sc, y_ss, r_sn, r_sc, r_ss, o_sn, o_sc, o_ss,
    g_sn, g_sc, b_sn, b_sc,
    eps,
    IS_VAR: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(HW, BLOCK_S), cdiv(C, BLOCK_C), N): out = residual + max(a * y + b, 0)."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    cmask = cols < C
    mask = (s < HW)[:, None] & cmask[None, :]
    a, b, _, _, _ = _load_scale_shift(GAMMA, BETA, MEAN, STAT, n, cols, cmask,
                                      g_sn, g_sc, b_sn, b_sc, eps, IS_VAR, ACC)
    y = tl.load(Y + n * y_sn + s[:, None] * y_ss + cols[None, :] * y_sc, mask=mask, other=0.0).to(ACC)
    r = tl.load(R + n * r_sn + s[:, None] * r_ss + cols[None, :] * r_sc, mask=mask, other=0.0).to(ACC)
    z = tl.maximum(a[None, :] * y + b[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    out = r + z
    tl.store(OUT + n * o_sn + s[:, None] * o_ss + cols[None, :] * o_sc,
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bn_film_relu_residual_bwd_reduce_kernel(
    DOUT, Y, DY,    # [N, C, H, W], strides (d_sn, ...), (y_sn, ...), (dy_sn, ...)
    GAMMA, BETA,    # [N, C], strides (g_sn, g_sc) / (b_sn, b_sc)
    MEAN, RSTD,     # [C] ACC
    PART,           # [2, SPLIT, N, C] ACC: per-split sum(dz) and sum(dz * xhat)
    N, C, HW, s_per_split,
    d_sn, d_sc, d_ss, y_sn, y_sc, y_ss, dy_sn, dy_sc, dy_ss,
    g_sn, g_sc, b_sn, b_sc,
    WRITE_DY: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (SPLIT, cdiv(C, BLOCK_C), N). dz = dout * (a * y + b > 0), the ReLU mask
    recomputed from y. In eval (WRITE_DY) the statistics are constants, so dy = a * dz is
    written in this same pass."""
    pid_split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    n64 = n.to(tl.int64)
    cmask = cols < C
    a, b, _, mean, rstd = _load_scale_shift(GAMMA, BETA, MEAN, RSTD, n64, cols, cmask,
                                            g_sn, g_sc, b_sn, b_sc, 0.0, False, ACC)
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    start = pid_split * s_per_split
    end = tl.minimum(start + s_per_split, HW)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < end)[:, None] & cmask[None, :]
        y = tl.load(Y + n64 * y_sn + s[:, None] * y_ss + cols[None, :] * y_sc, mask=mask, other=0.0).to(ACC)
        d = tl.load(DOUT + n64 * d_sn + s[:, None] * d_ss + cols[None, :] * d_sc, mask=mask, other=0.0).to(ACC)
        dz = tl.where(a[None, :] * y + b[None, :] > 0.0, d, 0.0)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * ((y - mean[None, :]) * rstd[None, :]), axis=0)
        if WRITE_DY:
            tl.store(DY + n64 * dy_sn + s[:, None] * dy_ss + cols[None, :] * dy_sc,
                     (a[None, :] * dz).to(DY.dtype.element_ty), mask=mask)
    part = PART + (pid_split * N + n) * C + cols
    tl.store(part, sum_dz, mask=cmask)
    tl.store(part + tl.num_programs(0) * N * C, sum_dz_xhat, mask=cmask)


@triton.jit
def _bn_film_relu_residual_bwd_merge_kernel(
    PART,           # [2, SPLIT, N, C] ACC from the reduce kernel
    GAMMA,          # [N, C], strides (g_sn, g_sc)
    DGAMMA, DBETA,  # [N, C] contiguous, gamma's / beta's dtype (written)
    K,              # [2, C] ACC (written): mean over N*HW of dxhat and of dxhat * xhat
    N, C, n_split, rows,
    g_sn, g_sc,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C),): sums the splits in a fixed order (deterministic), a
    [BLOCK_N, BLOCK_C] tile at a time. dbeta = sum dz, dgamma = sum dz * xhat; with
    dxhat = gamma * dz the per-channel sums are sum_n gamma * dbeta and sum_n gamma * dgamma."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    k1 = tl.zeros([BLOCK_C], dtype=ACC)
    k2 = tl.zeros([BLOCK_C], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & cmask[None, :]
        nc = n[:, None] * C + cols[None, :]
        db = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
        dg = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
        for sp in range(0, n_split):
            db += tl.load(PART + sp * N * C + nc, mask=mask, other=0.0)
            dg += tl.load(PART + (n_split + sp) * N * C + nc, mask=mask, other=0.0)
        tl.store(DBETA + nc, db.to(DBETA.dtype.element_ty), mask=mask)
        tl.store(DGAMMA + nc, dg.to(DGAMMA.dtype.element_ty), mask=mask)
        g = tl.load(GAMMA + n[:, None] * g_sn + cols[None, :] * g_sc, mask=mask, other=0.0).to(ACC)
        k1 += tl.sum(g * db, axis=0)
        k2 += tl.sum(g * dg, axis=0)
    tl.store(K + cols, k1 / rows, mask=cmask)
    tl.store(K + C + cols, k2 / rows, mask=cmask)


@triton.autotune(configs=_tile_configs((64, 16, 4)), key=_TILE_KEY)
@triton.jit
def _bn_film_relu_residual_bwd_kernel(
    DOUT, Y, DY,    # [N, C, H, W], strides as in the reduce kernel
    GAMMA, BETA,    # [N, C]
    MEAN, RSTD,     # [C] ACC
    K,              # [2, C] ACC from the merge kernel
    C, HW,
    d_sn, d_sc, d_ss, y_sn, y_sc, y_ss, dy_sn, dy_sc, dy_ss,
    g_sn, g_sc, b_sn, b_sc,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(HW, BLOCK_S), cdiv(C, BLOCK_C), N), training only:
    dy = rstd * (gamma * dz - k1 - xhat * k2)."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    cmask = cols < C
    mask = (s < HW)[:, None] & cmask[None, :]
    a, b, g, mean, rstd = _load_scale_shift(GAMMA, BETA, MEAN, RSTD, n, cols, cmask,
                                            g_sn, g_sc, b_sn, b_sc, 0.0, False, ACC)
    k1 = tl.load(K + cols, mask=cmask, other=0.0)
    k2 = tl.load(K + C + cols, mask=cmask, other=0.0)
    y = tl.load(Y + n * y_sn + s[:, None] * y_ss + cols[None, :] * y_sc, mask=mask, other=0.0).to(ACC)
    d = tl.load(DOUT + n * d_sn + s[:, None] * d_ss + cols[None, :] * d_sc, mask=mask, other=0.0).to(ACC)
    dz = tl.where(a[None, :] * y + b[None, :] > 0.0, d, 0.0)
    xhat = (y - mean[None, :]) * rstd[None, :]
    dy = rstd[None, :] * (g[None, :] * dz - k1[None, :] - xhat * k2[None, :])
    tl.store(DY + n * dy_sn + s[:, None] * dy_ss + cols[None, :] * dy_sc,
             dy.to(DY.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- launchers

def acc_dtype(y: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 for float64 activations, float32 for everything else."""
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def empty_like_act(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [N, C, H, W] tensor in y's layout (channels_last iff y is
    channels_last and not also contiguous), so that real and fake kernels agree on strides."""
    fmt = (torch.channels_last if y.is_contiguous(memory_format=torch.channels_last)
           and not y.is_contiguous() else torch.contiguous_format)
    return torch.empty(y.shape, dtype=dtype, device=y.device, memory_format=fmt)


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """t: [N, C, H, W] -> (t or a contiguous copy, (sn, sc, ss)) with s = h * W + w."""
    _, _, h, w = t.shape
    if w == 1:
        return t, (t.stride(0), t.stride(1), t.stride(2))
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, (t.stride(0), t.stride(1), t.stride(3))
    t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _stats_blocks(rows: int, C: int, channels_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for the statistics pass: ~2K elements a tile, wide along the
    contiguous axis. Not autotuned: this kernel updates the running statistics."""
    if channels_contiguous:
        block_c = min(64, triton.next_power_of_2(C))
        return max(16, 2048 // block_c), block_c
    block_r = min(512, triton.next_power_of_2(rows))
    return block_r, max(1, min(triton.next_power_of_2(C), 2048 // block_r))


def _reduce_blocks(HW: int, C: int, channels_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) for the backward reduction: ~1K elements a tile."""
    if channels_contiguous:
        block_c = min(64, triton.next_power_of_2(C))
        return max(16, 1024 // block_c), block_c
    block_s = min(256, triton.next_power_of_2(HW))
    return block_s, max(1, min(triton.next_power_of_2(C), 1024 // block_s))


def bn_stats_fwd(y: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 *, momentum: float, eps: float, split: int | None = None,
                 blocks: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch statistics, updating the running ones in place.

    Args:
        y: [N, C, H, W], any float dtype and layout.
        running_mean, running_var: [C] or None; updated in place with `momentum`
            (running_var with the unbiased variance).
        split: programs per channel block along N*H*W (default: enough to fill the device).
        blocks: (BLOCK_R, BLOCK_C) powers of two instead of the heuristic (tests, tuning).
    Returns:
        mean, rstd: [C] in acc_dtype(y); rstd = 1 / sqrt(biased var + eps).
    """
    N, C, H, W = y.shape
    rows = N * H * W
    y, (sn, sc, ss) = _flat(y)
    acc = acc_dtype(y)
    mean = torch.empty(C, dtype=acc, device=y.device)
    rstd = torch.empty(C, dtype=acc, device=y.device)
    block_r, block_c = blocks or _stats_blocks(rows, C, sc == 1 and ss != 1)
    c_blocks = triton.cdiv(C, block_c)
    if split is None:
        # Fill the device about 4 times over, but give every program at least 4 tiles.
        split = min(triton.cdiv(4 * _sm_count(y.device), c_blocks), triton.cdiv(rows, 4 * block_r))
    split = max(1, min(split, MAX_SPLIT))
    rows_per_split = triton.cdiv(triton.cdiv(rows, split), block_r) * block_r
    split = triton.cdiv(rows, rows_per_split)  # no empty split
    has_running = running_mean is not None
    rm = running_mean if has_running else mean
    rv = running_var if has_running else rstd
    part = torch.empty((split, 2, C), dtype=acc, device=y.device) if split > 1 else mean
    _bn_stats_fwd_kernel[(c_blocks, split)](
        y, part, mean, rstd, rm, rv, C, H * W, rows, rows_per_split, sn, sc, ss, momentum, eps,
        FINALIZE=split == 1, HAS_RUNNING=has_running, ACC=_tl_dtype(acc),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    if split > 1:
        block_split = triton.next_power_of_2(split)
        merge_c = max(1, min(triton.next_power_of_2(C), 4096 // block_split))
        _bn_stats_merge_fwd_kernel[(triton.cdiv(C, merge_c),)](
            part, mean, rstd, rm, rv, C, rows, rows_per_split, split, momentum, eps,
            HAS_RUNNING=has_running, ACC=_tl_dtype(acc), BLOCK_SPLIT=block_split, BLOCK_C=merge_c)
    return mean, rstd


def _tile_grid(N: int, C: int, HW: int):
    return lambda meta: (triton.cdiv(HW, meta["BLOCK_S"]), triton.cdiv(C, meta["BLOCK_C"]), N)


def bn_film_relu_residual_fwd(y: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor,
                              beta: torch.Tensor, mean: torch.Tensor, stat: torch.Tensor, *,
                              is_var: bool, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The one elementwise pass: out = residual + relu(a * y + b).

    Args:
        y, residual: [N, C, H, W], any float dtypes and layouts.
        gamma, beta: [N, C].
        mean, stat: [C]; stat is rstd, or (is_var) a variance to which eps is added
            (eval: the running statistics are folded in here, no extra launch).
    Returns:
        out: [N, C, H, W] of out_dtype in y's layout (see empty_like_act).
    """
    N, C, H, W = y.shape
    out = empty_like_act(y, out_dtype)
    y, ys = _flat(y)
    residual, rs = _flat(residual)
    _, os_ = _flat(out)
    _bn_film_relu_residual_fwd_kernel[_tile_grid(N, C, H * W)](
        y, residual, out, gamma, beta, mean, stat, C, H * W, *ys, *rs, *os_,
        gamma.stride(0), gamma.stride(1), beta.stride(0), beta.stride(1), eps,
        IS_VAR=is_var, ACC=_tl_dtype(acc_dtype(y)))
    return out


def bn_film_relu_residual_bwd(dout: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                              mean: torch.Tensor, rstd: torch.Tensor, *, training: bool,
                              split: int | None = None, blocks: tuple[int, int] | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of out = residual + relu(a * y + b) (d residual is dout itself).

    Args:
        dout: [N, C, H, W] gradient of out, any layout (expanded zeros included).
        y: [N, C, H, W] the forward input; gamma, beta: [N, C].
        mean, rstd: [C] the statistics the forward used (batch ones in training).
        training: whether mean and rstd depend on y (adds the BN cross terms to dy).
        split: programs per (n, channel block) along H*W (default: enough to fill the device).
        blocks: (BLOCK_S, BLOCK_C) of the reduction, powers of two, instead of the heuristic.
    Returns:
        dy: [N, C, H, W] of y's dtype and layout; dgamma, dbeta: [N, C] of gamma's / beta's dtype.
    """
    N, C, H, W = y.shape
    HW = H * W
    acc = acc_dtype(y)
    mean, rstd = mean.to(acc), rstd.to(acc)
    dy = empty_like_act(y, y.dtype)
    y, ys = _flat(y)
    dout, ds = _flat(dout)
    _, dys = _flat(dy)
    g_s = (gamma.stride(0), gamma.stride(1), beta.stride(0), beta.stride(1))
    block_s, block_c = blocks or _reduce_blocks(HW, C, ys[1] == 1 and ys[2] != 1)
    c_blocks = triton.cdiv(C, block_c)
    if split is None:
        split = min(triton.cdiv(4 * _sm_count(y.device), c_blocks * N), triton.cdiv(HW, 4 * block_s))
    split = max(1, min(split, MAX_SPLIT))
    s_per_split = triton.cdiv(triton.cdiv(HW, split), block_s) * block_s
    split = triton.cdiv(HW, s_per_split)
    part = torch.empty((2, split, N, C), dtype=acc, device=y.device)
    _bn_film_relu_residual_bwd_reduce_kernel[(split, c_blocks, N)](
        dout, y, dy, gamma, beta, mean, rstd, part, N, C, HW, s_per_split, *ds, *ys, *dys, *g_s,
        WRITE_DY=not training, ACC=_tl_dtype(acc), BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4)
    dgamma = torch.empty((N, C), dtype=gamma.dtype, device=y.device)
    dbeta = torch.empty((N, C), dtype=beta.dtype, device=y.device)
    k = torch.empty((2, C), dtype=acc, device=y.device)
    merge_n = min(64, triton.next_power_of_2(N))
    merge_c = max(1, min(triton.next_power_of_2(C), 2048 // merge_n))
    _bn_film_relu_residual_bwd_merge_kernel[(triton.cdiv(C, merge_c),)](
        part, gamma, dgamma, dbeta, k, N, C, split, N * HW, gamma.stride(0), gamma.stride(1),
        ACC=_tl_dtype(acc), BLOCK_N=merge_n, BLOCK_C=merge_c)
    if training:
        _bn_film_relu_residual_bwd_kernel[_tile_grid(N, C, HW)](
            dout, y, dy, gamma, beta, mean, rstd, k, C, HW, *ds, *ys, *dys, *g_s, ACC=_tl_dtype(acc))
    return dy, dgamma, dbeta
