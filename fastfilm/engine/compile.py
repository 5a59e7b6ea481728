"""The one place fastfilm calls torch.compile, and the one answer to "can this model be
compiled?". Compile time is reported apart from steady-state speed by the benchmarks."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from fastfilm.model.fast import FastFiLMNet


def can_compile(model: nn.Module) -> bool:
    """Whether `model` compiles whole (fullgraph): the fast model does; the reference network
    and the baselines call nn.GRU, which fullgraph compilation rejects."""
    return isinstance(model, FastFiLMNet)


def configure_compiler() -> None:
    """Dynamo/inductor settings of the fast path (idempotent)."""
    # One graph per (question-length bucket, train/eval); the default limit of 8 per
    # function would silently fall back to eager after that.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)


def compiled(fn: Callable, *, fullgraph: bool = True, mode: str | None = None, backend: str = "inductor",
             freeze: bool = False) -> Callable:
    """fn (a function or module) compiled with static shapes.

    freeze: inductor's freezing, for inference under no_grad/inference_mode: the parameters and
    buffers become constants, so batch norm folds into the convolution before it and conv/linear
    weights are converted and prepacked once for oneDNN (in the autocast dtype) instead of cast
    on every call. The compiled function then never sees later changes to the weights: only for
    a model that is done training.
    """
    configure_compiler()
    if not freeze:
        return torch.compile(fn, fullgraph=fullgraph, dynamic=False, mode=mode, backend=backend)
    if backend != "inductor":
        raise ValueError(f"freezing is an inductor pass; backend {backend!r} cannot freeze")
    # torch.compile takes a mode or inductor options, not both: reduce-overhead is CUDA graphs.
    options = {"freezing": True, **({"triton.cudagraphs": True} if mode == "reduce-overhead" else {})}
    return torch.compile(fn, fullgraph=fullgraph, dynamic=False, backend=backend, options=options)
