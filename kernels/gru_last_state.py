"""The GRU recurrence up to each row's last real token, as one opaque custom op.

    last = gru_last_state(gi, w_hh, b_hh, lengths)      # [B, H]

is the state of a one-layer GRU (h0 = 0, PyTorch's gate equations, gate order r, z, n)
after token lengths[b] of row b, given the input gates gi = x W_ih^T + b_ih [L, B, 3H]
(the caller applies the input projection: FastQuestionEncoder projects the vocabulary table
once and gathers). nn.GRU computes the same from x, W_ih, b_ih, W_hh, b_hh.

Why an op: torch.compile breaks the graph on nn.GRU, and tracing the loop instead unrolls L
steps into the graph (minutes of compile time per question length). Registered with
torch.library (`fastfilm::gru_last_state` and `fastfilm::gru_last_state_backward`, fake
implementations and an autograd formula), the recurrence is one call in a compiled graph.
Per token the forward is one addmm and four pointwise ops; the hand-written backward is
three ops per token and one matmul for all steps' weight gradient.

Packing (`pack=True`, lengths sorted longest first): each row stops after its last token,
which on CLEVR-like lengths skips more than half of the recurrence. It reads the lengths on
the host, so by default it is done only for CPU tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _active_rows(lengths: Tensor, steps: int, pack: bool) -> list[int]:
    """Rows computed at each step: [steps] ints; with `pack`, only rows still inside their
    question (lengths sorted longest first, read on the host), else all of them."""
    if not pack:
        return [lengths.numel()] * steps
    lens = lengths.clamp(1, steps)
    if (lens[1:] > lens[:-1]).any():
        raise ValueError("gru_last_state packs rows: lengths must be sorted longest first")
    return (lens.numel() - torch.bincount(lens, minlength=steps + 1).cumsum(0))[:steps].tolist()


def _gru_forward(gi: Tensor, w_hh: Tensor, b_hh: Tensor, lengths: Tensor, pack: bool,
                 save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The recurrence.

    Args:
        gi: [L, B, 3H] input gates (x W_ih^T + b_ih, gate order r, z, n), contiguous.
        w_hh: [3H, H] and b_hh: [3H], gi's dtype.
        lengths: [B] tokens per row (longest first if `pack`).
        pack: compute each row only up to its length.
        save: keep every step's gh and gates for the backward (else one scratch step).
    Returns:
        last [B, H], the state after each row's last token; states [L, B, H]; gh [L or 1, B, 3H]
        (h W_hh^T + b_hh) and gates [L or 1, B, 3H] (r, z after the sigmoid, n after the tanh).
        Packed rows stop at their length; the entries they leave unwritten are zeros so that
        the backward's products stay finite.
    """
    L, B, G = gi.shape
    H = G // 3
    active = _active_rows(lengths, L, pack)
    alloc = gi.new_zeros if active[-1] < B else gi.new_empty
    states = alloc(L, B, H)
    gh_all, gates = alloc(L if save else 1, B, G), alloc(L if save else 1, B, G)
    h = gi.new_zeros(B, H)
    w_t = w_hh.t()
    for t, n in enumerate(active):
        k = t if save else 0
        gh = torch.addmm(b_hh, h[:n], w_t, out=gh_all[k, :n])
        rz = torch.add(gi[t, :n, :2 * H], gh[:, :2 * H], out=gates[k, :n, :2 * H]).sigmoid_()
        c = torch.addcmul(gi[t, :n, 2 * H:], rz[:, :H], gh[:, 2 * H:], out=gates[k, :n, 2 * H:]).tanh_()
        h = torch.lerp(c, h[:n], rz[:, H:], out=states[t, :n])  # (1 - z) * c + z * h
    last = states[(lengths - 1).clamp(0, L - 1), torch.arange(B, device=gi.device)]
    return last, states, gh_all, gates


def _gru_backward(dlast: Tensor, lengths: Tensor, pack: bool, states: Tensor, gh_all: Tensor, gates: Tensor,
                  w_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence's backward.

    Args:
        dlast: [B, H] gradient of `last`; lengths: [B]; pack: as in the forward.
        states: [L, B, H]; gh_all, gates: [L, B, 3H] (saved by the forward); w_hh: [3H, H].
    Returns:
        dgi [L, B, 3H], dw_hh [3H, H], db_hh [3H].
    """
    L, B, H = states.shape
    active = _active_rows(lengths, L, pack)
    r, z, c = gates.split(H, dim=2)  # [L, B, H] each
    h_prev = torch.cat([states.new_zeros(1, B, H), states[:-1]])
    # Every gate gradient is dh (the gradient reaching h_t) times a coefficient that does
    # not depend on dh: compute those for all steps at once, so that the sequential loop is
    # three ops per step.
    one_z = 1 - z
    dc = one_z * (1 - c * c)                                 # d pre-tanh / dh
    dz = (h_prev - c) * z * one_z                            # d pre-sigmoid(z) / dh
    dr = dc * gh_all[:, :, 2 * H:] * r * (1 - r)             # d pre-sigmoid(r) / dh
    coef = torch.stack([dr, dz, dc * r], dim=2)              # [L, B, 3, H]: d gh / dh
    dlast_at = torch.zeros_like(states)                      # dlast where each row's state was read
    dlast_at[(lengths - 1).clamp(0, L - 1), torch.arange(B, device=states.device)] = dlast
    dgh = torch.zeros_like(coef)
    dh_all = torch.zeros_like(states)                        # dh_all[t]: gradient reaching h_t
    dh = torch.zeros_like(dlast)
    for t in range(L - 1, -1, -1):
        n = active[t]
        torch.add(dh[:n], dlast_at[t, :n], out=dh_all[t, :n])
        torch.mul(coef[t, :n], dh_all[t, :n, None], out=dgh[t, :n])
        if t > 0:  # h_{t-1} reaches h_t through z * h_{t-1} and through gh
            torch.addmm(dh_all[t, :n] * z[t, :n], dgh[t, :n].view(n, 3 * H), w_hh, out=dh[:n])
    dgi = dgh.clone()
    torch.mul(dc, dh_all, out=dgi[:, :, 2])  # the input part of the candidate is not scaled by r
    dgh, dgi = dgh.view(L * B, 3 * H), dgi.view(L, B, 3 * H)
    # Weight gradients of all steps in one matmul.
    dw_hh = dgh.t() @ h_prev.reshape(L * B, H)
    return dgi, dw_hh, dgh.sum(0)


# ---------------------------------------------------------------- torch.library registration

@torch.library.custom_op("fastfilm::gru_last_state", mutates_args=())
def _gru_op(gi: Tensor, w_hh: Tensor, b_hh: Tensor, lengths: Tensor, pack: bool,
            save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _gru_forward(gi, w_hh, b_hh, lengths, pack, save)


@_gru_op.register_fake
def _(gi, w_hh, b_hh, lengths, pack, save):
    L, B, G = gi.shape
    steps = L if save else 1
    return gi.new_empty(B, G // 3), gi.new_empty(L, B, G // 3), gi.new_empty(steps, B, G), gi.new_empty(steps, B, G)


@torch.library.custom_op("fastfilm::gru_last_state_backward", mutates_args=())
def _gru_bwd_op(dlast: Tensor, lengths: Tensor, pack: bool, states: Tensor, gh_all: Tensor, gates: Tensor,
                w_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _gru_backward(dlast, lengths, pack, states, gh_all, gates, w_hh)


@_gru_bwd_op.register_fake
def _(dlast, lengths, pack, states, gh_all, gates, w_hh):
    return torch.empty_like(gh_all), torch.empty_like(w_hh), w_hh.new_empty(w_hh.shape[0])


def _gru_setup(ctx, inputs, output) -> None:
    gi, w_hh, b_hh, lengths, pack, save = inputs
    ctx.saved, ctx.pack = save, pack
    ctx.save_for_backward(lengths, *output[1:], w_hh)


def _gru_grad(ctx, dlast, *_unused):
    if not ctx.saved:
        raise RuntimeError("gru_last_state ran without saving its activations and cannot be differentiated")
    lengths, states, gh_all, gates, w_hh = ctx.saved_tensors
    dgi, dw_hh, db_hh = _gru_bwd_op(dlast.contiguous(), lengths, ctx.pack, states, gh_all, gates, w_hh)
    return dgi, dw_hh, db_hh, None, None, None


_gru_op.register_autograd(_gru_grad, setup_context=_gru_setup)


# ---------------------------------------------------------------- public op

def _check(gi: Tensor, w_hh: Tensor, b_hh: Tensor, lengths: Tensor) -> None:
    """Programming errors (what a caller hands the op), not user errors."""
    where = "gru_last_state"
    if gi.dim() != 3 or gi.shape[2] % 3 or gi.shape[0] < 1:
        raise ValueError(f"{where}: gi must be [L, B, 3H] with L >= 1, got shape {tuple(gi.shape)}")
    L, B, G = gi.shape
    H = G // 3
    for name, t, shape in (("w_hh", w_hh, (G, H)), ("b_hh", b_hh, (G,)), ("lengths", lengths, (B,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must be {list(shape)} for gi of shape {tuple(gi.shape)}, "
                             f"got {tuple(t.shape)}")
    for name, t in (("gi", gi), ("w_hh", w_hh), ("b_hh", b_hh)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {t.dtype}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{where}: lengths must be an integer tensor, got {lengths.dtype}")
    for name, t in (("w_hh", w_hh), ("b_hh", b_hh), ("lengths", lengths)):
        if t.device != gi.device:
            raise ValueError(f"{where}: {name} is on {t.device}, gi on {gi.device}")


def gru_last_state(gi: Tensor, w_hh: Tensor, b_hh: Tensor, lengths: Tensor, pack: bool | None = None) -> Tensor:
    """The GRU state (h0 = 0, PyTorch's gate equations) after each row's last real token.

    Args:
        gi: [L, B, 3H] input gates x W_ih^T + b_ih (gate order r, z, n), any float dtype.
        w_hh: [3H, H] and b_hh: [3H], cast to gi's dtype.
        lengths: [B] integer, real tokens per row; values outside [1, L] are clamped to it.
        pack: compute each row only up to its length (then lengths must be sorted longest
            first: ValueError otherwise). Packing reads the lengths on the host, so by default
            it is done only for CPU tensors (elsewhere it would cost a device sync per call).
    Returns:
        [B, H] in gi's dtype. Differentiable in gi, w_hh and b_hh.
    """
    _check(gi, w_hh, b_hh, lengths)
    w_hh, b_hh = w_hh.to(gi.dtype), b_hh.to(gi.dtype)
    pack = lengths.device.type == "cpu" if pack is None else pack
    save = torch.is_grad_enabled() and (gi.requires_grad or w_hh.requires_grad or b_hh.requires_grad)
    return _gru_op(gi.contiguous(), w_hh.contiguous(), b_hh.contiguous(), lengths, pack, save)[0]
