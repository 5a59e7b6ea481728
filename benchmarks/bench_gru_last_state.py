"""GRU recurrence: fastfilm.kernels.gru_last_state against nn.GRU, forward and forward+backward.

Every candidate maps embedded tokens x [L, B, E] to the state at each row's last real token
[B, H], with the same weights:
- nn_gru: nn.GRU over every step of every row (MKL-DNN on CPU, cuDNN on CUDA), then the state
  gathered at each row's length, as the reference model's QuestionEncoder does (the baseline);
- op_packed: the input projection (one F.linear), then the op with each row stopping after its
  length (lengths sorted longest first; the default for CPU tensors);
- op_dense: the same with every row running every step (the default on CUDA, where packing
  would read the lengths on the host); not at the paper's size on the CPU, to keep the run
  short.
Modes: `fwd` (inference: no_grad, the op keeps one step of scratch) and `fwd_bwd` (forward
and the gradients of x and of the four weights).

Sizes: the cpu preset (H=128, E=64, B=64, L=46 with lengths 12-46 like CLEVR questions) and
the paper's (H=4096, E=200, B=64, L=16 with lengths 6-16; B=32 on the CPU). fp32, one CPU
thread (on a machine shared with other jobs a parallel region waits for its slowest, preempted
thread). At the paper's size on the CPU a round takes seconds, so it gets one round and no
warm-up (eager: no compilation to warm up); elsewhere 10 rounds after 2 (CPU) or 50 after 5
(CUDA, the clock read after a device sync at both ends of a round: harness.synced_clock).

    python -m pytest benchmarks/bench_gru_last_state.py --benchmark-only \\
        --benchmark-json benchmarks/results/gru_last_state_cpu.json
    python benchmarks/bench_gru_last_state.py [-k preset]   # same JSON path, _cpu or _cuda

The JSON holds pytest-benchmark's statistics per candidate, the machine and commit
(machine_info.fastfilm: CPU model and features, torch version) and, per group, each
candidate's speed-up over nn_gru ("speedups").
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import main_pytest  # noqa: E402

from fastfilm.kernels.gru_last_state import gru_last_state  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"

# name: (H, E, B, L, shortest length). At the paper's size on the CPU one nn.GRU
# forward+backward of B=64 takes seconds to tens of seconds on a shared 2-core machine:
# B=32 there keeps the run under a minute and the length profile (what packing gains on).
SIZES = {
    "preset": (128, 64, 64, 46, 12),
    "paper": (4096, 200, 32 if ON_CPU else 64, 16, 6),
}
CANDIDATES = ("nn_gru", "op_packed", "op_dense")
MODES = ("fwd", "fwd_bwd")


def rounds(size: str) -> tuple[int, int]:
    """(rounds, warm-up rounds)."""
    if size == "paper" and ON_CPU:
        return 1, 0
    return (10, 2) if ON_CPU else (50, 5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: on a machine shared with other jobs a parallel region waits for its
    slowest, preempted thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(SIZES))
def problem(request):
    """(size name, nn.GRU, x [L, B, E], lengths [B] sorted longest first) on DEVICE."""
    hidden, embed, batch, steps, shortest = SIZES[request.param]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gru = torch.nn.GRU(embed, hidden).to(DEVICE)
    x = torch.randn(steps, batch, embed, generator=g).to(DEVICE)
    lengths = torch.randint(shortest, steps + 1, (batch,), generator=g).sort(descending=True).values
    return request.param, gru, x, lengths.to(DEVICE)


def forward(candidate: str, gru: torch.nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x [L, B, E] -> [B, H] by `candidate`."""
    if candidate == "nn_gru":
        states, _ = gru(x)  # [L, B, H]
        return states[lengths - 1, torch.arange(x.shape[1], device=x.device)]
    gi = F.linear(x, gru.weight_ih_l0, gru.bias_ih_l0)  # [L, B, 3H]
    return gru_last_state(gi, gru.weight_hh_l0, gru.bias_hh_l0, lengths, pack=candidate == "op_packed")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_gru_last_state(benchmark, problem, candidate, mode):
    size, gru, x, lengths = problem
    if candidate == "op_dense" and size == "paper" and ON_CPU:
        pytest.skip("dense at the paper's size on the CPU: seconds a round, and not the CPU default")
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return forward(candidate, gru, x, lengths)
    else:
        xg = x.detach().requires_grad_()
        inputs = [xg, *gru.parameters()]
        dout = torch.randn(x.shape[1], gru.hidden_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)

        def call():
            return torch.autograd.grad(forward(candidate, gru, xg, lengths), inputs, dout)

    hidden, embed, batch, steps, _ = SIZES[size]
    benchmark.group = f"{size} H={hidden} E={embed} B={batch} L={steps} {mode}"
    benchmark.extra_info.update(candidate=candidate, baseline="nn_gru", size=size, mode=mode, H=hidden, E=embed,
                                B=batch, L=steps, real_tokens=int(lengths.sum()), dtype="fp32", device=DEVICE,
                                threads=torch.get_num_threads())
    n, warmup = rounds(size)
    benchmark.pedantic(call, rounds=n, warmup_rounds=warmup, iterations=1)


if __name__ == "__main__":
    sys.exit(main_pytest(__file__, f"gru_last_state_{DEVICE}"))
