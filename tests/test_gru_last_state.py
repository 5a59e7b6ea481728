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
    lengths, steps, hidden, embed = CASES[case] if case in CASES else CUDA_CASES[case]
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


# Tiny tensors on a shared 2-core machine: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


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


# ---------------------------------------------------------------- the CUDA path

def test_dense_path_reads_no_device_value_on_the_host():
    """What lets a CUDA graph capture the op (kernels/gru_last_state.py, "On CUDA"): without
    packing, forward and backward take no decision from tensor values. On meta tensors (shapes,
    no data) any .item()/.tolist()/bool() of a tensor raises; the packed path, which reads the
    lengths, shows that the check bites."""
    from fastfilm.kernels.gru_last_state import _gru_backward, _gru_forward

    L, B, H = 6, 4, 5
    meta = dict(device="meta")
    gi, w_hh, b_hh = torch.empty(L, B, 3 * H, **meta), torch.empty(3 * H, H, **meta), torch.empty(3 * H, **meta)
    lengths = torch.empty(B, dtype=torch.long, **meta)
    for save in (False, True):  # the backward below takes what the saving forward kept
        last, states, gh, gates = _gru_forward(gi, w_hh, b_hh, lengths, pack=False, save=save)
        assert last.shape == (B, H) and states.shape == (L, B, H) and gh.shape == (L if save else 1, B, 3 * H)
    dgi, dw_hh, db_hh = _gru_backward(torch.empty(B, H, **meta), lengths, False, states, gh, gates, w_hh)
    assert (dgi.shape, dw_hh.shape, db_hh.shape) == ((L, B, 3 * H), (3 * H, H), (3 * H,))
    with pytest.raises(RuntimeError, match="meta"):
        _gru_forward(gi, w_hh, b_hh, lengths, pack=True, save=True)
    # The public op's default on a non-CPU device is the dense path.
    assert gru_last_state(gi, w_hh, b_hh, lengths).device.type == "meta"


# A size where cuBLAS and cuDNN pick their large-problem kernels (tiling, split-K), with
# CLEVR's batch and question lengths.
CUDA_CASES = {"large": (torch.randint(12, 47, (64,), generator=torch.Generator().manual_seed(2)).tolist(),
                        46, 1024, 200)}
# fp32 at the large size: cuDNN (nn.GRU) and cuBLAS (the op) sum up to L*B = 2944 products per weight
# gradient element in different orders. Measured on the CPU (MKL-DNN against the op, fp32):
# worst |err| / max|expected| 5.1e-7 over the state and every gradient; allowed: 1e-5 of each
# tensor's largest element (20x, for other summation orders on the GPU). bf16 at this size
# keeps BF16_STATE and BF16_GRAD: measured on the CPU (dense) 6.1e-3 for the state, 1.3e-2
# for the gradients (the embedding table's the largest).
LARGE_FP32 = 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["ragged", "bucket-padding", "batch-1-length-1", "cpu-preset", "large"])
def test_cuda_matches_nn_gru(case, dtype):
    """On CUDA (dense, the default there) against cuDNN's nn.GRU: the state and the gradients
    of the embedding table, W_ih, b_ih, W_hh and b_hh, ragged lengths in scrambled order."""
    embedding, gru, tokens, lengths = make(case, sort=False)
    assert tokens.is_cuda
    half = dtype == "bf16"
    if half:  # the oracle runs in fp32 on the values the bf16 op sees (as test_matches_nn_gru_bf16)
        with torch.no_grad():
            for p in params(embedding, gru):
                p.copy_(p.to(torch.bfloat16).float())
    expected = nn_gru_last(embedding, gru, tokens, lengths)
    dout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = run(embedding, gru, tokens, lengths, op_last, dout, pack=None,
                     dtype=torch.bfloat16 if half else torch.float32)
    _, ref_grads = run(embedding, gru, tokens, lengths, nn_gru_last, dout)
    pairs = [("last state", out, expected), *((f"grad {n}", a, e) for n, a, e in zip(PARAMS, grads, ref_grads))]
    for name, a, e in pairs:
        if half:
            assert_close_bf16(a, e, f"cuda bf16 {case} {name}", BF16_STATE if name == "last state" else BF16_GRAD)
        elif case == "large":
            assert_close_bf16(a, e, f"cuda fp32 {case} {name}", LARGE_FP32)
        else:
            assert_close(a, e, f"cuda fp32 {case} {name}")


def _gates_fn(gru, lengths, dout):
    """x [L, B, E] -> (last [B, H], grads of x and the four weights): projection, op, backward."""
    weights = [gru.weight_ih_l0, gru.bias_ih_l0, gru.weight_hh_l0, gru.bias_hh_l0]

    def fn(x):
        gi = F.linear(x, weights[0], weights[1])
        last = gru_last_state(gi, weights[2], weights[3], lengths)
        return (last, *torch.autograd.grad(last, [x, *weights], dout))
    return fn


def _nn_gru_fn(gru, lengths, dout):
    def fn(x):
        states, _ = gru(x)
        last = states[lengths - 1, torch.arange(len(lengths), device=x.device)]
        return (last, *torch.autograd.grad(last, [x, gru.weight_ih_l0, gru.bias_ih_l0, gru.weight_hh_l0,
                                                  gru.bias_hh_l0], dout))
    return fn


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_nn_gru():
    """The forward and backward captured in one CUDA graph (what --cuda-graphs does to the whole
    training step) and replayed on new inputs copied into the static ones equal nn.GRU on
    those inputs: nothing in the op was frozen at capture time except shapes."""
    torch.manual_seed(0)
    L, B, H, E = 9, 6, 32, 8
    gru = torch.nn.GRU(E, H).cuda()
    lengths = torch.tensor([9, 7, 4, 4, 2, 1], device="cuda")[torch.randperm(B, device="cuda")]
    dout = torch.randn(B, H, device="cuda")
    fn = _gates_fn(gru, lengths, dout)
    static_x = torch.randn(L, B, E, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(2):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    for seed in (1, 2):
        x = torch.randn(L, B, E, generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            static_x.copy_(x)
        lengths.copy_(lengths.roll(seed))  # the lengths are read on the device too
        graph.replay()
        expected = _nn_gru_fn(gru, lengths, dout)(x.requires_grad_())
        for name, a, e in zip(["last", "x", "w_ih", "b_ih", "w_hh", "b_hh"], static_out, expected):
            assert_close(a, e, f"replay {seed}: {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_backward_never_sync():
    """torch's sync debug mode raises on any synchronising call (a .item(), a copy to the host,
    a pageable copy to the device) during the op's forward and backward on CUDA."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(8, 32).cuda()
    lengths = torch.tensor([5, 3, 5, 1], device="cuda")
    dout = torch.randn(4, 32, device="cuda")
    x = torch.randn(5, 4, 8, device="cuda", requires_grad=True)
    fn = _gates_fn(gru, lengths, dout)
    fn(x)  # first call: lazy initialisation (cuBLAS handles) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
