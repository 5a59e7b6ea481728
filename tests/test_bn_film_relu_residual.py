"""Parity of the fused BN + FiLM + ReLU + residual op with the unfused torch expression
(`bn_film_relu_residual_reference`, plain eager F.batch_norm and pointwise ops).

The Triton kernels run under TRITON_INTERPRET=1 on CPU (natively on CUDA when present);
the torch backend runs natively. Shapes are small so the interpreter stays fast.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated, i.e. when its module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

from fastfilm.kernels import bn_film_relu_residual_triton as K
from fastfilm.kernels.bn_film_relu_residual import bn_film_relu_residual, bn_film_relu_residual_reference

if not torch.cuda.is_available() and not K.INTERPRETED:
    # Another test module imported the kernels before TRITON_INTERPRET was set.
    K = importlib.reload(K)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]

# (dtype, atol, rtol) against an fp32 reference computed from the same (upcast) inputs.
# Both backends compute in fp32, so the error is the final rounding to the output dtype:
# half an ulp is 2^-8 relative for bf16 and 2^-11 for fp16, except that the Triton
# interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): up to one ulp, 2^-7.
# Measured worst |err| / (1 + |expected|) over these tests: bf16 6.6e-3 (interpreter),
# 3.0e-3 (torch); fp16 3.9e-4 (both). Tolerances: about 1.3 ulp and 2 ulp.
DTYPES = [
    (torch.float32, None, None),       # assert_close defaults
    (torch.bfloat16, 1e-2, 1e-2),
    (torch.float16, 1e-3, 1e-3),
]


def assert_close(actual, expected, what, atol=None, rtol=None):
    """assert_close that names the tensor and lists its five worst elements on failure."""
    actual = actual.detach().to(expected.dtype)
    expected = expected.detach()

    def msg(default: str) -> str:
        diff = (actual - expected).abs().flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        rows = [f"  at {tuple(int(j) for j in torch.unravel_index(i, actual.shape))}: "
                f"got {actual.flatten()[i].item():.6g}, expected {expected.flatten()[i].item():.6g}"
                for i in worst]
        return f"{what}: {default}\nworst elements:\n" + "\n".join(rows)

    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg)


def make_inputs(shape, dtype=torch.float32, layout="contiguous", seed=0, zero_gamma=True):
    """y, residual: [N, C, H, W] in `layout`; gamma, beta: [N, C] with negative and (unless
    not zero_gamma) zero gammas."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape

    def randn(*size):
        return torch.randn(size, generator=g).to(DEVICE, dtype)

    y = randn(*shape) * 2 + 0.5
    residual = randn(*shape)
    gamma = randn(N, C) * 2
    beta = randn(N, C)
    if zero_gamma:
        gamma[:, 0] = 0.0                 # FiLM shuts the feature map off ...
        beta[: (N + 1) // 2, 0] = 0.0     # ... with and without a shift
    if layout == "channels_last":
        y = y.to(memory_format=torch.channels_last)
        residual = residual.to(memory_format=torch.channels_last)
    elif layout == "strided":
        # A channel slice (collapsible strides) for y, an H/W transpose for the residual
        # (not collapsible: the launcher copies it) and a transposed gamma.
        y = torch.cat([y, randn(*shape)], dim=1)[:, ::2]
        residual = residual.transpose(2, 3).contiguous().transpose(2, 3)
        gamma = gamma.t().contiguous().t()
    elif layout == "mixed":
        y = y.to(memory_format=torch.channels_last)
    running_mean = torch.randn(C, generator=g) * 0.1
    running_var = torch.rand(C, generator=g) + 0.5
    return [y, residual, gamma, beta], running_mean.to(DEVICE), running_var.to(DEVICE)


def run_both(shape, dtype, layout, training, backend, steps=1, momentum=0.1):
    """Runs op and reference `steps` times on fresh inputs; returns (ours, theirs) lists of
    [out, dy, dresidual, dgamma, dbeta, running_mean, running_var] from the last step."""
    acts, rm, rv = make_inputs(shape, dtype, layout)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for step in range(steps):
        acts, _, _ = make_inputs(shape, dtype, layout, seed=step)
        ours = [t.clone().requires_grad_() for t in acts]
        theirs = [t.detach().float().requires_grad_() for t in acts]
        out = bn_film_relu_residual(*ours, rm, rv, training=training, momentum=momentum, backend=backend)
        ref = bn_film_relu_residual_reference(*theirs, rm_ref, rv_ref, training=training, momentum=momentum)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE, out.dtype)
        out.backward(dout)
        ref.backward(dout.float())
    return ([out] + [t.grad for t in ours] + [rm, rv]), ([ref] + [t.grad for t in theirs] + [rm_ref, rv_ref])


NAMES = ["out", "dy", "dresidual", "dgamma", "dbeta", "running_mean", "running_var"]

SHAPES = [
    ((2, 3, 7, 5), "contiguous"),        # C=3, H*W=7x5, N*H*W not a multiple of any block
    ((4, 3, 7, 5), "channels_last"),
    ((1, 4, 6, 5), "contiguous"),        # N=1 with H*W > 1
    ((3, 130, 3, 3), "channels_last"),   # large C, not a power of two
    ((5, 4, 13, 11), "contiguous"),      # several row tiles per channel, ragged last tile
    ((3, 5, 4, 6), "strided"),
    ((3, 5, 4, 6), "mixed"),
    ((67, 2, 2, 2), "contiguous"),       # batch above one tile of the backward merge (64)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", SHAPES, ids=[f"{s}-{lay}" for s, lay in SHAPES])
def test_parity_fp32(shape, layout, training, backend):
    ours, theirs = run_both(shape, torch.float32, layout, training, backend)
    for name, a, e in zip(NAMES, ours, theirs):
        assert_close(a, e, f"{backend} {name}")
    if layout in ("channels_last", "mixed"):
        assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[1:], ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_low_precision(layout, training, dtype, atol, rtol, backend):
    ours, theirs = run_both((4, 6, 5, 7), dtype, layout, training, backend)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, a, e in zip(NAMES, ours, theirs):
        # Running statistics are fp32 and accumulated in fp32 from the same values.
        tol = {} if name.startswith("running") else dict(atol=atol, rtol=rtol)
        assert_close(a, e, f"{backend} {dtype} {name}", **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_over_steps_then_eval(backend):
    shape = (3, 4, 5, 6)
    ours, theirs = run_both(shape, torch.float32, "contiguous", True, backend, steps=4, momentum=0.3)
    for name, a, e in zip(NAMES, ours, theirs):
        assert_close(a, e, f"{backend} after 4 steps: {name}")
    rm, rv = ours[5:]
    (y, r, g, b), _, _ = make_inputs(shape, seed=7)
    out = bn_film_relu_residual(y, r, g, b, rm, rv, training=False, backend=backend)
    expected = bn_film_relu_residual_reference(y, r, g, b, theirs[5], theirs[6], training=False)
    assert_close(out, expected, f"{backend} eval with learned stats")


@pytest.mark.parametrize("split,layout", [(1, "contiguous"), (3, "channels_last"), (7, "contiguous")])
def test_triton_split_statistics_agree(split, layout):
    """Small tiles and every split of the reductions across programs give the statistics
    and gradients of the default launch (which uses one large tile here)."""
    (y, r, g, b), rm, rv = make_inputs((3, 5, 9, 7), layout=layout)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    # 16-row tiles: 189 rows are 12 tiles, the last one ragged, in min(split, 6) programs.
    mean, rstd = K.bn_stats_fwd(y, rm, rv, momentum=0.1, eps=1e-5, split=split, blocks=(16, 8))
    F.batch_norm(y, rm_ref, rv_ref, None, None, True, 0.1, 1e-5)
    var, mean_ref = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert_close(mean, mean_ref, f"mean split={split}")
    assert_close(rstd, torch.rsqrt(var + 1e-5), f"rstd split={split}")
    assert_close(rm, rm_ref, f"running_mean split={split}")
    assert_close(rv, rv_ref, f"running_var split={split}")
    dout = torch.randn_like(y)
    for training in (True, False):
        dy1, dg1, db1 = K.bn_film_relu_residual_bwd(dout, y, g, b, mean, rstd, training=training)
        # 16-position tiles: 63 positions are 4 tiles, the last one ragged.
        dy2, dg2, db2 = K.bn_film_relu_residual_bwd(dout, y, g, b, mean, rstd, training=training,
                                                    split=split, blocks=(16, 2))
        for name, a, e in (("dy", dy2, dy1), ("dgamma", dg2, dg1), ("dbeta", db2, db1)):
            assert_close(a, e, f"{name} split={split} training={training}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_are_numerically_safe(backend):
    """A large common offset: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance."""
    (y, r, g, b), rm, rv = make_inputs((4, 3, 8, 8))
    y = y + 1e4
    # Only the statistics are checked: the output's fold a * y + b (by design) costs an
    # absolute |a * mean| * 2^-24 per element, large at this offset.
    rm64, rv64 = rm.double(), rv.double()
    bn_film_relu_residual(y, r, g, b, rm, rv, training=True, backend=backend)
    F.batch_norm(y.double(), rm64, rv64, None, None, True, 0.1, 1e-5)
    assert_close(rm, rm64.float(), f"{backend} running_mean with offset")
    assert_close(rv, rv64.float(), f"{backend} running_var with offset", atol=1e-5, rtol=1e-4)
    if backend == "triton":
        mean, rstd = K.bn_stats_fwd(y, None, None, momentum=0.1, eps=1e-5, split=3, blocks=(32, 2))
        var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        assert_close(mean, mean64.float(), "mean with offset, split")
        assert_close(rstd, torch.rsqrt(var64 + 1e-5).float(), "rstd with offset, split", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_fp64(backend, training):
    # gamma = beta = 0 puts the ReLU exactly on its kink, where finite differences are
    # meaningless; the parity tests cover that case.
    (y, r, g, b), rm, rv = make_inputs((2, 3, 3, 2), torch.float64, zero_gamma=False)
    rm, rv = rm.double(), rv.double()
    inputs = [t.detach().requires_grad_() for t in (y, r, g, b)]

    def fn(y, r, g, b):
        # Fresh running stats each call: their update must not leak between evaluations.
        return bn_film_relu_residual(y, r, g, b, rm.clone(), rv.clone(), training=training, backend=backend)

    # The interpreter runs ~0.1 s a call: the Triton backend gets gradcheck's fast mode
    # (random projections of the Jacobian, a few calls), the torch backend the full one.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=backend == "triton")


@pytest.mark.slow
def test_opcheck_custom_ops():
    (y, r, g, b), rm, rv = make_inputs((2, 3, 3, 2))
    y, r, g, b = (t.requires_grad_() for t in (y, r, g, b))
    mean, rstd = torch.ops.fastfilm.bn_stats(y.detach(), rm, rv, 0.1, 1e-5)
    dout = torch.randn_like(y)
    cases = [
        (torch.ops.fastfilm.bn_stats.default, (y.detach(), rm, rv, 0.1, 1e-5)),
        (torch.ops.fastfilm.bn_stats.default, (y.detach(), None, None, 0.1, 1e-5)),
        (torch.ops.fastfilm.bn_film_relu_residual_fwd.default, (y, r, g, b, mean, rstd, True, 1e-5)),
        (torch.ops.fastfilm.bn_film_relu_residual_fwd.default, (y, r, g, b, rm, rv, False, 1e-5)),
        (torch.ops.fastfilm.bn_film_relu_residual_bwd.default, (dout, y.detach(), g.detach(), b.detach(),
                                                                 mean, rstd, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    (y, r, g, b), rm, rv = make_inputs((3, 5, 9, 7), layout="channels_last")
    results = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (y, r, g, b)]
        out = bn_film_relu_residual(*ins, rm.clone(), rv.clone(), training=True, backend=backend)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in ins])
    for name, a, e in zip(NAMES, *results):
        assert torch.equal(a, e), f"{backend} {name} differs between two identical calls"


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16(backend):
    """Under autocast the conv and the FiLM generator hand the op bf16 tensors."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(DEVICE)
    film = torch.nn.Linear(3, 8).to(DEVICE)
    x = torch.randn(3, 4, 5, 5, device=DEVICE)
    q = torch.randn(3, 3, device=DEVICE)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, (gamma, beta) = conv(x), film(q).chunk(2, dim=1)
        out = bn_film_relu_residual(y, x.to(y.dtype), gamma, beta, rm, rv, training=True, backend=backend)
    assert y.dtype == gamma.dtype == out.dtype == torch.bfloat16
    ref = bn_film_relu_residual_reference(y.float(), x.to(y.dtype).float(), gamma.float(), beta.float(),
                                          torch.zeros_like(rm), torch.ones_like(rv), training=True)
    assert_close(out, ref, f"{backend} under autocast", atol=1e-2, rtol=1e-2)


class _Block(torch.nn.Module):
    """The tail of a FiLM ResBlock, with BN buffers like nn.BatchNorm2d's."""

    def __init__(self, channels: int, backend: str):
        super().__init__()
        self.backend = backend
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, y, residual, gamma, beta):
        return bn_film_relu_residual(y, residual, gamma, beta, self.running_mean, self.running_var,
                                     training=self.training, backend=self.backend)


def _compiled_step(block, backend, shape):
    (y, r, g, b), _, _ = make_inputs(shape)
    ins = [t.clone().requires_grad_() for t in (y, r, g, b)]
    fn = torch.compile(block, fullgraph=True, backend=backend)
    out = fn(*ins)
    out.backward(torch.ones_like(out))
    return [out] + [t.grad for t in ins] + [block.running_mean, block.running_var]


def _reference_step(shape):
    """What _compiled_step must give: the unfused expression from fresh BN buffers."""
    (y, r, g, b), _, _ = make_inputs(shape)
    ins = [t.clone().requires_grad_() for t in (y, r, g, b)]
    rm, rv = torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)
    out = bn_film_relu_residual_reference(*ins, rm, rv, training=True)
    out.backward(torch.ones_like(out))
    return [out] + [t.grad for t in ins] + [rm, rv]


@pytest.mark.slow
def test_compile_torch_backend_fuses_on_cpu():
    from torch._inductor.utils import run_and_get_code

    shape = (3, 4, 5, 6)
    ours, code = run_and_get_code(_compiled_step, _Block(4, "torch").to(DEVICE), "inductor", shape)
    theirs = _reference_step(shape)
    for name, a, e in zip(NAMES, ours, theirs):
        assert_close(a, e, f"compiled {name}")
    if DEVICE == "cpu":
        # Statistics, running-stat update and the elementwise tail become one generated C++
        # kernel; the backward's reductions and dy another: no aten call, no custom op.
        for direction, src in zip(("forward", "backward"), (code[0], code[-1])):
            kernels = [line.split(" =")[0] for line in src.splitlines() if line.startswith("cpp_fused")]
            assert len(kernels) == 1, f"{direction}: {kernels}"
            call = src.split("def call")[1]
            assert "extern_kernels." not in call and "torch.ops." not in call, f"{direction}: {call}"


def test_compile_triton_backend_no_graph_break():
    """fullgraph=True raises on a graph break; aot_eager runs the fake and autograd registrations."""
    shape = (3, 4, 5, 6)
    ours = _compiled_step(_Block(4, "triton").to(DEVICE), "aot_eager", shape)
    theirs = _reference_step(shape)
    for name, a, e in zip(NAMES, ours, theirs):
        assert_close(a, e, f"compiled triton {name}")


@pytest.mark.parametrize("bad,error,match", [
    (dict(y=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
    (dict(residual=torch.randn(2, 3, 4, 5)), ValueError, "residual has shape"),
    (dict(gamma=torch.randn(3, 2)), ValueError, "gamma must be"),
    (dict(running_mean=None, training=False), ValueError, "running_mean and running_var"),
    (dict(running_var=torch.ones(4)), ValueError, "running_var must be"),
    (dict(backend="cuda"), ValueError, "backend="),
    (dict(y=torch.randn(2, 3, 4)), ValueError, r"y must be \[N, C, H, W\]"),
    (dict(beta=torch.ones(2, 3, dtype=torch.int64)), TypeError, "beta has dtype torch.int64"),
    (dict(running_mean=torch.zeros(3, device="meta")), ValueError, "running_mean is on meta"),
], ids=["one-value", "residual-shape", "gamma-shape", "eval-no-stats", "stats-shape", "backend", "3d", "int-beta",
        "device"])
def test_bad_input_is_a_programming_error(bad, error, match):
    """What the model hands the op is the program's doing, never the user's: ValueError /
    TypeError with a traceback, not fastfilm.errors.UserError."""
    y = bad.get("y", torch.randn(2, 3, 4, 4))
    args = dict(y=y, residual=torch.randn(y.shape), gamma=torch.randn(y.shape[0], 3),
                beta=torch.randn(y.shape[0], 3), running_mean=torch.zeros(3), running_var=torch.ones(3),
                training=True, backend="torch")
    if "y" in bad and y.dim() != 4:
        args["residual"] = y
    args.update(bad)
    if bad.get("running_mean", 0) is None:
        args["running_var"] = None
    with pytest.raises(error, match=match):
        bn_film_relu_residual(**args)


def test_triton_on_cpu_without_interpreter_is_a_value_error(monkeypatch):
    monkeypatch.setattr(K, "INTERPRETED", False)
    (y, r, g, b), rm, rv = make_inputs((2, 3, 4, 4))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        bn_film_relu_residual(y.cpu(), r.cpu(), g.cpu(), b.cpu(), rm.cpu(), rv.cpu(), training=True,
                              backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_film_shape(layout, dtype, atol, rtol):
    """FiLM's real shape on the GPU, Triton against the unfused expression."""
    ours, theirs = run_both((64, 128, 14, 14), dtype, layout, True, "triton", steps=2)
    for name, a, e in zip(NAMES, ours, theirs):
        # Sums over 196 (dgamma, dbeta) and 12544 (statistics, dy) values run in another
        # order than cuDNN's: a few fp32 roundings per term more than the defaults allow.
        if name.startswith("running"):
            tol = dict(atol=1e-5, rtol=1e-5)
        elif dtype == torch.float32 and name != "dresidual":
            tol = dict(atol=1e-4, rtol=1e-4)
        else:
            tol = dict(atol=atol, rtol=rtol)
        assert_close(a, e, f"cuda {dtype} {layout} {name}", **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inductor_keeps_triton_op():
    shape = (8, 16, 7, 7)
    ours = _compiled_step(_Block(16, "triton").to(DEVICE), "inductor", shape)
    theirs = _reference_step(shape)
    for name, a, e in zip(NAMES, ours, theirs):
        assert_close(a, e, f"inductor triton {name}")
