"""The fast path's switches (config.FastConfig) resolved for the device at hand.

    ex = resolve(cfg, device)        # -> Execution: amp dtype, compile, fused, channels_last, cuda_graphs
    ex.autocast()                    # the autocast context of every forward

What the user asked for is honoured, except where the hardware cannot give it (bf16 without
native support falls back to fp32, CUDA graphs off a CUDA device are off) or where it means
nothing (--reference turns the other switches off, except CUDA graphs: replaying the oracle's
kernels from a graph changes no number); each such change is said in one line on stderr.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from fastfilm.config import FastConfig
from fastfilm.hardware import native_bf16

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}

_NOTED: set[str] = set()


def note(message: str) -> None:
    """One line on stderr, once per process (ranks other than 0 stay quiet)."""
    if message not in _NOTED and os.environ.get("RANK", "0") == "0":
        _NOTED.add(message)
        print(f"fastfilm: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Execution:
    """How models run on `device`. dtype: the autocast dtype, None for fp32."""
    device: torch.device
    reference: bool = False
    dtype: torch.dtype | None = None
    compile: bool = False
    fused: bool = False
    channels_last: bool = False
    cuda_graphs: bool = False   # only ever True on a CUDA device

    def autocast(self):
        """The autocast context of a forward pass (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on `device`; None: fp32. bf16 without hardware support
    is emulated, many times slower than fp32 (docs/fastpath.md), so it falls back to fp32."""
    if amp not in _AMP:
        raise ValueError(f"amp must be one of {sorted(_AMP)}, got {amp!r}")
    dtype = _AMP[amp]
    if dtype == torch.bfloat16 and not native_bf16(device):
        note(f"--amp bf16: no native bf16 on this {device.type} (needs AVX-512 BF16/AMX or CUDA Ampere+); "
             "running fp32 (pass --amp off to silence)")
        return None
    return dtype


def cuda_graphs_on(asked: bool, device: torch.device) -> bool:
    """--cuda-graphs on `device`: off (with a note, not an error, so that one command line
    serves a GPU machine and a laptop alike) anywhere but CUDA."""
    if asked and device.type != "cuda":
        note(f"--cuda-graphs: CUDA graphs need a CUDA device and this run is on {device.type}; running without them")
        return False
    return asked


def resolve(cfg: FastConfig, device: torch.device | str) -> Execution:
    """cfg's switches as they will run on `device`."""
    device = torch.device(device)
    graphs = cuda_graphs_on(cfg.cuda_graphs, device)
    if cfg.reference:
        on = [name for name, value in (("--compile", cfg.compile), (f"--amp {cfg.amp}", cfg.amp != "off"),
                                       ("--fused", cfg.fused), ("--channels-last", cfg.channels_last)) if value]
        if on:
            note(f"--reference runs the plain fp32 eager oracle; the fast-path switches ({', '.join(on)}) "
                 "do not apply to it")
        return Execution(device=device, reference=True, cuda_graphs=graphs)
    return Execution(device=device, dtype=autocast_dtype(cfg.amp, device), compile=cfg.compile, fused=cfg.fused,
                     channels_last=cfg.channels_last, cuda_graphs=graphs)
