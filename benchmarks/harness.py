"""What every fastfilm benchmark shares: the machine record, and the timing of end-to-end runs.

`machine()` says what numbers were measured on (CPU model and ISA flags, the ISA and machine
kind fastfilm picks its defaults by, device, versions, commit); every results file carries it: pytest-benchmark's JSON under
machine_info["fastfilm"] (benchmarks/conftest.py), the end-to-end scripts' JSON under
"machine" (`write_results`).

End-to-end scripts (bench_train.py, bench_generate.py's script part) time their candidates
*interleaved* (A, B, C, A, B, C, ...) in one process so that the noise of a shared machine
hits all of them alike; results are medians with the inter-quartile range, reported as
ratios against a baseline measured in the same run, and written to
benchmarks/results/NAME.json. Microbenchmarks run under pytest-benchmark instead (see
benchmarks/README.md).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from fastfilm.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"


# CPU features that decide which kernels a CPU runs (torch's bf16 paths need AVX-512 BF16 or
# AMX; AVX2-only CPUs fall back to fp32), named as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# Versions worth recording besides torch's (distribution names).
PACKAGES = ("numpy", "pillow", "triton", "nvidia-dali-cuda120", "pytest-benchmark")


def machine(device: str | None = None) -> dict:
    """What the numbers were measured on. `device` (default: cpu) names the machine kind:
    fastfilm.hardware.machine_kind of it, e.g. 'cpu-amx', 'cpu-avx2', 'cuda-sm90', the key
    results are filed under (benchmarks/results/<bench>_<kind>.json)."""
    import torch

    from fastfilm.hardware import cpu_isa, machine_kind

    cpu_name, flags = _cpuinfo()
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "platform": platform.platform(),
        "processor": cpu_name,
        "cpu_flags": {f: f in flags for f in ISA_FLAGS} if flags else None,  # None: no /proc/cpuinfo
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": cpu_isa(),
        "machine_kind": machine_kind(torch.device(device or "cpu")),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        # Figures from a tree with uncommitted changes are not the commit's (None: no git).
        "dirty": None if status == "unknown" else bool(status),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name in PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    return info


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, ISA flags) from /proc/cpuinfo; (platform.processor(), empty) elsewhere."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor(), flags


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(candidates: dict[str, Callable[[], object]], *, warmup: int = 3, reps: int = 15,
                     inner: int = 1) -> dict[str, dict]:
    """Time each candidate `reps` times, round-robin, after `warmup` untimed calls each.

    `inner` calls make one sample (for very short functions). Returns, per name, the
    median seconds per call, the inter-quartile range and the raw samples.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            _sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: summarize(s) for name, s in samples.items()}


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median_s": statistics.median(s), "q1_s": q[0], "q3_s": q[2], "n": len(s), "samples_s": s}


def ratios(results: dict[str, dict], baseline: str) -> dict[str, float]:
    """Speed-up of each candidate over `baseline` (baseline median / candidate median)."""
    base = results[baseline]["median_s"]
    return {name: base / r["median_s"] for name, r in results.items()}


def write_results(name: str, payload: dict, directory: Path | None = None, *, device: str | None = None) -> Path:
    """Atomically write {machine, **payload} to benchmarks/results/NAME.json."""
    return write_results_to((directory or RESULTS) / f"{name}.json", payload, device=device)


def write_results_to(path: str | Path, payload: dict, *, device: str | None = None) -> Path:
    """Atomically write {machine(device), **payload} to exactly `path` (a name without .json stays so)."""
    path = Path(path)
    write_json(path, {"machine": machine(device), **payload})
    return path


# ------------------------------------------------------------ pytest-benchmark

def synced_clock() -> float:
    """time.perf_counter after waiting for CUDA's queue (when CUDA is in use): the clock
    pytest-benchmark reads at both ends of a round (benchmarks/conftest.py sets it), so that
    a round of several asynchronous calls ends when their kernels do, with one sync per round
    rather than per call."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def add_machine(machine_info: dict) -> None:
    """pytest_benchmark_update_machine_info: fastfilm's record of the machine and commit.
    Without "threads": it is read before a benchmark's fixtures set their own, so each
    benchmark records its thread count in extra_info instead."""
    machine_info["fastfilm"] = {k: v for k, v in machine().items() if k != "threads"}


def add_speedups(output_json: dict) -> None:
    """pytest_benchmark_update_json: per benchmark group, every candidate's speed-up over the
    group's baseline (baseline median / candidate median, and the same for the fastest
    rounds, which preemption on a shared machine can only slow down). A benchmark names
    itself and its baseline in extra_info["candidate"] and extra_info["baseline"]."""
    groups: dict[str, dict[str, dict]] = {}
    for b in output_json.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "candidate" in info and "baseline" in info:
            groups.setdefault(b["group"], {})[info["candidate"]] = {"stats": b["stats"], "baseline": info["baseline"]}
    speedups = {}
    for group, runs in groups.items():
        base = runs.get(next(iter(runs.values()))["baseline"])
        if base is None:  # the baseline was deselected
            continue
        speedups[group] = {name: {"median": round(base["stats"]["median"] / r["stats"]["median"], 3),
                                  "min": round(base["stats"]["min"] / r["stats"]["min"], 3)}
                           for name, r in runs.items()}
    output_json["speedups"] = speedups


def main_pytest(bench_file: str, name: str) -> int:
    """Run one benchmark file under pytest-benchmark, its JSON to benchmarks/results/NAME.json;
    extra command-line arguments go to pytest (e.g. -k to pick cases)."""
    import pytest

    return pytest.main([bench_file, "-p", "no:cacheprovider", "--benchmark-only",
                        f"--benchmark-json={RESULTS / f'{name}.json'}", *sys.argv[1:]])
