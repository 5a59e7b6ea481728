"""Parity of the GRU recurrence op with nn.GRU: the state at each row's last real token.

The op gets the input gates x W_ih^T + b_ih; nn.GRU gets x. Both start from the same
embedding and the same weights, so every gradient, down to the embedding table's, is
compared. Runs on CUDA when present (both pack modes), else on the CPU.
"""
import pytest
import torch
import torch.nn.functional as F

from fastfilm.kernels.gru_last_state import gru_last_state

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 13
PARAMS = ["embedding", "w_ih", "b_ih", "w_hh", "b_hh"]

# (lengths, padded length L, H, E): L beyond the longest question is the padding of a longer
# length bucket; padding tokens are not <NULL> so that a leak would show.
CASES = {
    "ragged": ([7, 5, 5, 2, 1], 7, 11, 5),
    "bucket-padding": ([6, 3, 3, 1], 9, 11, 5),
    "equal": ([4, 4, 4], 4, 11, 5),
    "all-one": ([1, 1, 1], 3, 11, 5),
    "batch-1": ([6], 6, 11, 5),
    "batch-1-length-1": ([1], 1, 11, 5),
    "cpu-preset": (torch.randint(12, 47, (64,), generator=torch.Generator().manual_seed(0)).tolist(), 46, 128, 64),
}

# bf16 against the fp32 nn.GRU on the same bf16-rounded embedding and weights: errors are
# measured against each tensor's largest |expected| (atol = TOL * max|expected|, rtol = 0),
# because the weight and embedding gradients are sums over up to L*B = 2944 rounded terms
# whose cancellations leave elements near 0 that no relative tolerance fits. Every step stores
# h and the gates in bf16 (2^-9 relative each) and errors compound along the sequence; the
# backward rounds again per step, and nn.Embedding's backward adds bf16 rows token by token.
# Measured worst |err| / max|expected| over these cases (CPU, both pack modes): state 6.3e-3,
# gradients 1.8e-2 (the embedding table at the cpu preset). Tolerances: about 2.4x and 2.2x.
BF16_STATE, BF16_GRAD = 1.5e-2, 4e-2


def assert_close(actual, expected, what, atol=None, rtol=None):
    """assert_close (its defaults unless atol/rtol) that names the tensor and lists the five
    elements that exceed their allowed difference the most."""
    actual = actual.detach().to(expected.dtype)
    expected = expected.detach()

    def msg(default: str) -> str:
        a, r = (1e-5, 1.3e-6) if atol is None else (atol, rtol)
        excess = ((actual - expected).abs() / (a + r * expected.abs())).flatten()
        worst = excess.topk(min(5, excess.numel())).indices
        rows = [f"  at {tuple(int(j) for j in torch.unravel_index(i, actual.shape))}: "
                f"got {actual.flatten()[i].item():.6g}, expected {expected.flatten()[i].item():.6g}"
                for i in worst]
        return f"{what}: {default}\nworst elements:\n" + "\n".join(rows)

    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg)


def assert_close_bf16(actual, expected, what, tol):
    """|actual - expected| <= tol * max|expected| (see BF16_STATE)."""
    assert_close(actual, expected, what, atol=tol * max(expected.abs().max().item(), 1e-30), rtol=0.0)


def make(case: str, sort: bool, seed: int = 0):
    """(embedding, gru, tokens [L, B], lengths [B]) in fp32 on DEVICE; lengths sorted longest
    first when `sort` (what packing needs), else in a scrambled order."""
    lengths, steps, hidden, embed = CASES[case]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    embedding = torch.nn.Embedding(VOCAB, embed, padding_idx=0)
    gru = torch.nn.GRU(embed, hidden)  # time-major, h0 = 0
    lengths = torch.tensor(sorted(lengths, reverse=True) if sort else lengths)
    if not sort:
        lengths = lengths[torch.randperm(len(lengths), generator=g)]
    tokens = torch.randint(1, VOCAB, (steps, len(lengths)), generator=g)
    return embedding.to(DEVICE), gru.to(DEVICE), tokens.to(DEVICE), lengths.to(DEVICE)


def params(embedding, gru) -> list[torch.Tensor]:
    return [embedding.weight, gru.weight_ih_l0, gru.bias_ih_l0, gru.weight_hh_l0, gru.bias_hh_l0]


def nn_gru_last(embedding, gru, tokens, lengths):
    """The oracle: nn.GRU over every token, read at each row's last real one. [B, H]."""
    states, _ = gru(embedding(tokens))  # [L, B, H]
    return states[lengths - 1, torch.arange(len(lengths), device=tokens.device)]


def op_last_of(tokens, lengths, emb, w_ih, b_ih, w_hh, b_hh, pack: bool):
    """The op's path from tokens [L, B] to [B, H], on tensors only (what torch.compile sees)."""
    gi = F.linear(F.embedding(tokens, emb), w_ih, b_ih)  # [L, B, 3H]
    return gru_last_state(gi, w_hh, b_hh, lengths, pack=pack)


def op_last(embedding, gru, tokens, lengths, pack, dtype=torch.float32):
    """The op on the same parameters, cast to `dtype` (differentiably). [B, H]."""
    return op_last_of(tokens, lengths, *(p.to(dtype) for p in params(embedding, gru)), pack=pack)


def run(embedding, gru, tokens, lengths, fn, dout, **kw):
    """fn's [B, H] result and the gradients of every parameter for upstream gradient dout."""
    out = fn(embedding, gru, tokens, lengths, **kw)
    grads = torch.autograd.grad(out, params(embedding, gru), dout.to(out.dtype))
    return out, grads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: on a shared 2-core machine an OpenMP barrier waiting for a descheduled
    thread costs more than the parallel region saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN's GRU may use TF32 by default; the parity here is fp32 against fp32."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_nn_gru_fp32(case, pack):
    """Forward and every gradient with assert_close's fp32 defaults (packed: rows stop at
    their length, lengths sorted; dense: all rows run, lengths in any order)."""
    embedding, gru, tokens, lengths = make(case, sort=pack)
    expected = nn_gru_last(embedding, gru, tokens, lengths)
    dout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = run(embedding, gru, tokens, lengths, op_last, dout, pack=pack)
    _, ref_grads = run(embedding, gru, tokens, lengths, nn_gru_last, dout)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert_close(out, expected, f"{case} last state")
    for name, a, e in zip(PARAMS, grads, ref_grads):
        assert_close(a, e, f"{case} grad {name}")
    with torch.no_grad():  # the inference path keeps one step of scratch instead of all of them
        assert_close(op_last(embedding, gru, tokens, lengths, pack), expected, f"{case} no_grad")


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "dense"])
@pytest.mark.parametrize("case", ["ragged", "bucket-padding", "batch-1", "cpu-preset"])
def test_matches_nn_gru_bf16(case, pack):
    embedding, gru, tokens, lengths = make(case, sort=pack)
    # The oracle runs in fp32 on the values the bf16 op sees.
    with torch.no_grad():
        for p in params(embedding, gru):
            p.copy_(p.to(torch.bfloat16).float())
    expected = nn_gru_last(embedding, gru, tokens, lengths)
    dout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = run(embedding, gru, tokens, lengths, op_last, dout, pack=pack, dtype=torch.bfloat16)
    _, ref_grads = run(embedding, gru, tokens, lengths, nn_gru_last, dout)
    assert out.dtype == torch.bfloat16
    assert_close_bf16(out, expected, f"bf16 {case} last state", BF16_STATE)
    for name, a, e in zip(PARAMS, grads, ref_grads):
        assert_close_bf16(a, e, f"bf16 {case} grad {name}", BF16_GRAD)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "dense"])
def test_gradcheck_fp64(pack):
    """Ragged lengths with a row of length 1 and padding past the longest row."""
    g = torch.Generator().manual_seed(0)
    gi, w_hh, b_hh = (torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
                      for s in ((5, 3, 9), (9, 3), (9,)))
    lengths = torch.tensor([4, 3, 1], device=DEVICE)
    assert torch.autograd.gradcheck(lambda *a: gru_last_state(*a, lengths, pack=pack), (gi, w_hh, b_hh))


def _op_args(pack: bool, save: bool):
    g = torch.Generator().manual_seed(0)
    gi, w_hh, b_hh = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_(save)
                      for s in ((5, 3, 12), (12, 4), (12,)))
    return gi, w_hh, b_hh, torch.tensor([5, 2, 1], device=DEVICE), pack, save


@pytest.mark.slow
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "dense"])
def test_opcheck(pack):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops:
    the forward with saved activations (differentiable) and without (inference), and the
    backward on what the forward saved."""
    for save in (True, False):
        torch.library.opcheck(torch.ops.fastfilm.gru_last_state.default, _op_args(pack, save))
    gi, w_hh, b_hh, lengths, _, _ = _op_args(pack, True)
    with torch.no_grad():
        last, states, gh, gates = torch.ops.fastfilm.gru_last_state(gi, w_hh, b_hh, lengths, pack, True)
    dlast = torch.randn_like(last)
    torch.library.opcheck(torch.ops.fastfilm.gru_last_state_backward.default,
                          (dlast, lengths, pack, states, gh, gates, w_hh.detach()))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) raises on a graph break; the compiled embedding ->
    projection -> op gives nn.GRU's state and gradients. The op stays one call: the graph
    does not grow with the sequence length (no unrolled steps)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    op_counts = []
    for case in ("ragged", "bucket-padding"):  # L = 7, then 9
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(backend)
        fn = torch.compile(op_last_of, backend=counter, fullgraph=True)
        embedding, gru, tokens, lengths = make(case, sort=True)
        dout = torch.randn(len(lengths), gru.hidden_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        out = fn(tokens, lengths, *params(embedding, gru), pack=True)
        grads = torch.autograd.grad(out, params(embedding, gru), dout)
        expected, ref_grads = run(embedding, gru, tokens, lengths, nn_gru_last, dout)
        assert counter.frame_count == 1
        op_counts.append(counter.op_count)
        assert_close(out, expected, f"{backend} {case} last state")
        for name, a, e in zip(PARAMS, grads, ref_grads):
            assert_close(a, e, f"{backend} {case} grad {name}")
    assert op_counts[0] == op_counts[1], f"the compiled graph grows with the sequence length: {op_counts}"


def test_packing_needs_sorted_lengths():
    gi, w_hh, b_hh = torch.randn(3, 2, 6), torch.randn(6, 2), torch.randn(6)
    with pytest.raises(ValueError, match="sorted"):
        gru_last_state(gi, w_hh, b_hh, torch.tensor([1, 3]), pack=True)
    with pytest.raises(ValueError, match="sorted"):  # CPU tensors pack by default
        gru_last_state(gi, w_hh, b_hh, torch.tensor([1, 3]))


@pytest.mark.parametrize("bad,error,match", [
    (dict(gi=torch.randn(3, 2, 7)), ValueError, r"gi must be \[L, B, 3H\]"),
    (dict(gi=torch.randn(2, 6)), ValueError, r"gi must be \[L, B, 3H\]"),
    (dict(gi=torch.randn(0, 2, 6)), ValueError, "L >= 1"),
    (dict(w_hh=torch.randn(6, 3)), ValueError, r"w_hh must be \[6, 2\]"),
    (dict(b_hh=torch.randn(5)), ValueError, r"b_hh must be \[6\]"),
    (dict(lengths=torch.tensor([3, 2, 1])), ValueError, r"lengths must be \[2\]"),
    (dict(gi=torch.ones(3, 2, 6, dtype=torch.int64)), TypeError, "gi must be a floating-point"),
    (dict(lengths=torch.tensor([3.0, 2.0])), TypeError, "lengths must be an integer"),
    (dict(w_hh=torch.randn(6, 2, device="meta")), ValueError, "w_hh is on meta"),
], ids=["gates-not-3H", "2d", "empty", "w_hh-shape", "b_hh-shape", "lengths-shape", "int-gates", "float-lengths",
        "device"])
def test_bad_input_is_a_programming_error(bad, error, match):
    """What the model hands the op is the program's doing: ValueError / TypeError, not UserError."""
    args = dict(gi=torch.randn(3, 2, 6), w_hh=torch.randn(6, 2), b_hh=torch.randn(6),
                lengths=torch.tensor([3, 2]), pack=False)
    args.update(bad)
    with pytest.raises(error, match=match):
        gru_last_state(**args)
