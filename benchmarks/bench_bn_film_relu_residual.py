"""Fused BN + FiLM + ReLU + residual: achieved bandwidth against a plain copy of the same bytes.

GB/s counts the bytes the op must move at least (forward: read y and residual, write out;
backward: read dout and y, write dy; gamma, beta and the statistics are negligible), so
every candidate is scored on the same work (extra_info.gb_per_s, on the median round).

Candidates, one pytest-benchmark group per (shape, dtype, layout, mode):
- eager_unfused: bn_film_relu_residual_reference, the op's plain eager definition (baseline);
- compiled_unfused: torch.compile(fullgraph=True) of it;
- torch_backend, compiled_torch_backend: the op's torch backend, eager and compiled;
- triton: the op's Triton kernels, on CUDA only (on the CPU the Triton interpreter would run
  them, which times Python, not kernels: tests/test_bn_film_relu_residual.py uses it for parity);
- copy: a copy of the same bytes, the bandwidth yardstick (of copy = copy median / median).
Modes: train_fwd, eval_fwd, train_fwd_bwd; layouts: NCHW (contiguous) and channels_last;
dtypes: fp32 and bf16; shapes: FiLM's 64x128x14x14 and 64x128x28x28. Each case compiles
afresh (torch._dynamo.reset()); the first call's seconds, compilation or Triton's JIT and
autotuning included, are extra_info.first_call_s, apart from the timed rounds.

CPU: one thread (on a machine shared with other jobs a parallel region waits for its slowest,
preempted thread), 15 rounds after 3 warm-up rounds. The whole matrix compiles 48 times on
the CPU (minutes): pick cases with -k, e.g.

    python -m pytest benchmarks/bench_bn_film_relu_residual.py --benchmark-only \\
        -k "14x14 and fp32" --benchmark-json benchmarks/results/bn_film_relu_residual_cpu.json
    python benchmarks/bench_bn_film_relu_residual.py -k "14x14 and fp32"   # same JSON path, _cpu or _cuda

CUDA: 20 rounds of 20 calls each, the clock read after a device sync at both ends of a round
(harness.synced_clock); inputs stay in L2 between calls when they fit (64x128x14x14 bf16 is
3.2 MB), as y does in the model right after the convolution that writes it.

The JSON holds pytest-benchmark's statistics, the machine and commit (machine_info.fastfilm)
and each group's speed-ups over eager_unfused ("speedups").
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import main_pytest  # noqa: E402

from fastfilm.kernels.bn_film_relu_residual import (bn_film_relu_residual,  # noqa: E402
                                                    bn_film_relu_residual_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"14x14": (64, 128, 14, 14), "28x28": (64, 128, 28, 28)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")
MODES = ("train_fwd", "eval_fwd", "train_fwd_bwd")
CANDIDATES = ("eager_unfused", "compiled_unfused", "torch_backend", "compiled_torch_backend", "triton", "copy")
# (rounds, warm-up rounds, calls per round)
ROUNDS = (15, 3, 1) if DEVICE == "cpu" else (20, 3, 20)


def unfused(y, residual, gamma, beta, running_mean, running_var, training: bool):
    return bn_film_relu_residual_reference(y, residual, gamma, beta, running_mean, running_var, training=training)


def fused(backend: str) -> Callable:
    def fn(y, residual, gamma, beta, running_mean, running_var, training: bool):
        return bn_film_relu_residual(y, residual, gamma, beta, running_mean, running_var,
                                     training=training, backend=backend)
    return fn


def candidate_fn(name: str) -> Callable:
    """A fresh callable for `name` (compiled ones compile on their first call)."""
    return {"eager_unfused": lambda: unfused,
            "compiled_unfused": lambda: torch.compile(unfused, fullgraph=True),
            "torch_backend": lambda: fused("torch"),
            "compiled_torch_backend": lambda: torch.compile(fused("torch"), fullgraph=True),
            "triton": lambda: fused("triton")}[name]()


def inputs(shape, dtype, layout: str, grad: bool, device: str = DEVICE):
    """y, residual: [N, C, H, W]; gamma, beta: [N, C]; running stats [C] fp32."""
    N, C, H, W = shape
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    res = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    gamma = 1 + 0.5 * torch.randn(N, C, device=device, dtype=dtype)
    beta = 0.5 * torch.randn(N, C, device=device, dtype=dtype)
    acts = [t.requires_grad_(grad) for t in (y, res, gamma, beta)]
    return acts, torch.zeros(C, device=device), torch.ones(C, device=device)


def min_bytes(shape, dtype, mode: str) -> int:
    """Bytes the op must move: 3 tensors forward, 3 more backward (d residual = dout is free)."""
    elems = shape[0] * shape[1] * shape[2] * shape[3]
    return (6 if mode == "train_fwd_bwd" else 3) * elems * torch.empty((), dtype=dtype).element_size()


def closure(fn: Callable, shape, dtype, layout: str, mode: str, device: str = DEVICE) -> Callable[[], object]:
    """One call of `fn` in `mode` on fixed inputs."""
    grad = mode == "train_fwd_bwd"
    acts, rm, rv = inputs(shape, dtype, layout, grad, device)
    training = mode != "eval_fwd"
    if not grad:
        def call():
            with torch.no_grad():
                return fn(*acts, rm, rv, training)
        return call
    dout = torch.randn_like(acts[0])

    def call_bwd():
        return torch.autograd.grad(fn(*acts, rm, rv, training), acts, dout)
    return call_bwd


def copy_closure(nbytes: int, dtype, device: str = DEVICE) -> Callable[[], object]:
    """A copy moving `nbytes` (half read, half written)."""
    n = nbytes // (2 * torch.empty((), dtype=dtype).element_size())
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread, for the reason given in the module docstring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bn_film_relu_residual(benchmark, shape, dtype, layout, mode, candidate):
    if candidate == "triton" and DEVICE != "cuda":
        pytest.skip("Triton on the CPU runs under the interpreter: its time is Python's, not the kernels'")
    size, dt = SHAPES[shape], DTYPES[dtype]
    nbytes = min_bytes(size, dt, mode)
    if candidate == "copy":
        call = copy_closure(nbytes, dt)
    else:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit, honest compile times
        call = closure(candidate_fn(candidate), size, dt, layout, mode)
    t0 = time.perf_counter()
    call()  # compilation (inductor, or Triton's JIT and autotuning) outside the timed rounds
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    benchmark.group = f"{shape} {dtype} {layout} {mode}"
    rounds, warmup, calls = ROUNDS
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=calls)
    benchmark.extra_info.update(
        candidate=candidate, baseline="eager_unfused", shape=list(size), dtype=dtype, layout=layout, mode=mode,
        device=DEVICE, threads=torch.get_num_threads(), min_bytes=nbytes, first_call_s=round(compile_s, 3),
        gb_per_s=round(nbytes / benchmark.stats.stats.median / 1e9, 2),
        gb_per_s_best=round(nbytes / benchmark.stats.stats.min / 1e9, 2))


if __name__ == "__main__":
    sys.exit(main_pytest(__file__, f"bn_film_relu_residual_{DEVICE}"))
