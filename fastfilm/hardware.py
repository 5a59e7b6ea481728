"""What this machine offers: the device to run on and the instruction sets that decide which
fast-path pieces pay off (docs/fastpath.md, "Defaults per machine kind")."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from fastfilm.errors import UserError


def resolve_device(name: str) -> torch.device:
    """--device: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} visible GPU(s)")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_isa() -> str:
    """The best matmul ISA of this CPU as far as fastfilm cares: 'amx', 'avx512_bf16', 'avx512',
    'avx2' or 'other'. torch's own checks come first (they also see what the OS enabled)."""
    flags = cpu_flags()
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or "amx_bf16" in flags:
        return "amx"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls/convs run in hardware (CUDA Ampere+, CPU AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_isa() in ("amx", "avx512_bf16")
    return False


def machine_kind(device: torch.device) -> str:
    """A short name for the kind of machine, used to pick per-machine defaults and to label
    benchmark results: 'cuda-sm90', 'cpu-amx', 'cpu-avx2', ..."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return f"{device.type}-{cpu_isa()}"
