"""The fast path's switches (config.FastConfig) resolved for the device at hand.

    ex = resolve(cfg, device)        # -> Execution: amp dtype, compile, fused, channels_last, cuda_graphs
    ex.autocast()                    # the autocast context of every forward

A switch left at "auto" takes the value of DEFAULTS for this kind of machine
(hardware.machine_kind: cpu-amx, cpu-avx2, cuda-sm90, ...): each entry turns on only what a
committed benchmark measured faster there. What the user asked for is honoured, except where
the hardware cannot give it (bf16 without native support falls back to fp32, CUDA graphs off a
CUDA device are off) or where it means nothing (--reference turns the other switches off,
except CUDA graphs: replaying the oracle's kernels from a graph changes no number). One line on
stderr says what was chosen and why.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from fastfilm.config import FastConfig
from fastfilm.hardware import machine_kind, native_bf16

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


@dataclass(frozen=True)
class Defaults:
    """The fast path on one kind of machine when the switches are left at auto. `source` is the
    committed benchmark in which each choice measured faster than its alternative (bench_train's
    ablation: the training step, whose ranking inference followed wherever both were measured)."""
    amp: str
    compile: bool
    fused: bool
    channels_last: bool
    source: str


_AVX2 = Defaults(amp="off", compile=True, fused=True, channels_last=False, source="benchmarks/results/train_cpu.json")
_AMX = Defaults(amp="bf16", compile=True, fused=True, channels_last=False,
                source="benchmarks/results/train_cpu-amx.json")
# hardware.machine_kind -> Defaults. CPU rule: a piece is on when the committed ablation measured
# its training step >= 2% faster with it than without (tests/test_fastpath.py checks the files).
DEFAULTS: dict[str, Defaults] = {
    "cpu-amx": _AMX,
    # AMX-less AVX-512 BF16 (Cooper Lake, Zen 4): native bf16 at a lower rate; not measured.
    "cpu-avx512_bf16": Defaults(**{**_AMX.__dict__, "source": "as cpu-amx (cpu-avx512_bf16 not measured)"}),
    "cpu-avx512": Defaults(**{**_AVX2.__dict__, "source": "as cpu-avx2 (cpu-avx512 not measured)"}),
    "cpu-avx2": _AVX2,
    "cpu-other": Defaults(**{**_AVX2.__dict__, "source": "as cpu-avx2 (cpu-other not measured)"}),
    # CUDA: the design's choices (Triton fused op, tensor cores); no CUDA benchmark is committed yet.
    "cuda": Defaults(amp="bf16", compile=True, fused=True, channels_last=True,
                     source="design; no committed CUDA benchmark"),
}


def defaults_for(kind: str) -> Defaults:
    """DEFAULTS for a machine kind ('cuda-sm80' -> 'cuda'; an unknown CPU kind -> 'cpu-other')."""
    if kind in DEFAULTS:
        return DEFAULTS[kind]
    return DEFAULTS["cuda" if kind.startswith("cuda") else "cpu-other"]


def cuda_graphs_on(asked: bool, device: torch.device) -> bool:
    """--cuda-graphs on `device`: off (with a note, not an error, so that one command line
    serves a GPU machine and a laptop alike) anywhere but CUDA."""
    if asked and device.type != "cuda":
        note(f"--cuda-graphs: CUDA graphs need a CUDA device and this run is on {device.type}; running without them")
        return False
    return asked


def resolve(cfg: FastConfig, device: torch.device | str) -> Execution:
    """cfg's switches as they will run on `device`: auto ones from DEFAULTS, said in one line."""
    device = torch.device(device)
    graphs = cuda_graphs_on(cfg.cuda_graphs, device)
    if cfg.reference:
        on = [name for name, value in (("--compile", cfg.compile), (f"--amp {cfg.amp}", cfg.amp not in ("off", "auto")),
                                       ("--fused", cfg.fused), ("--channels-last", cfg.channels_last)) if value]
        if on:
            note(f"--reference runs the plain fp32 eager oracle; the fast-path switches ({', '.join(on)}) "
                 "do not apply to it")
        return Execution(device=device, reference=True, cuda_graphs=graphs)
    kind = machine_kind(device)
    table = defaults_for(kind)
    amp = cfg.amp
    if amp == "auto":
        # The CUDA entry asks for bf16; a pre-Ampere GPU runs fp32 without a fallback note.
        amp = table.amp if table.amp != "bf16" or native_bf16(device) else "off"
    pick = {name: table.__dict__[name] if getattr(cfg, name) is None else getattr(cfg, name)
            for name in ("compile", "fused", "channels_last")}
    ex = Execution(device=device, dtype=autocast_dtype(amp, device), cuda_graphs=graphs, **pick)
    asked = [f"--amp {cfg.amp}"] if cfg.amp != "auto" else []
    asked += [f"--{'' if value else 'no-'}{name.replace('_', '-')}" for name, value in
              (("compile", cfg.compile), ("fused", cfg.fused), ("channels_last", cfg.channels_last))
              if value is not None]
    why = [f"defaults from {table.source}"] if len(asked) < 4 else []
    why += [f"asked: {' '.join(asked)}"] if asked else []
    note(f"{kind}: {describe(ex)} ({'; '.join(why)})")
    return ex


def describe(ex: Execution) -> str:
    """'bf16, compile, no fused op, NCHW': what an Execution runs, in words."""
    if ex.reference:
        return "reference (fp32 eager)"
    return ", ".join([str(ex.dtype or "fp32").replace("torch.bfloat16", "bf16").replace("torch.float16", "fp16"),
                      "compile" if ex.compile else "eager", "fused op" if ex.fused else "no fused op",
                      "channels_last" if ex.channels_last else "NCHW"] + (["CUDA graphs"] if ex.cuda_graphs else []))
