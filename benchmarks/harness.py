"""The one timing harness every fastfilm benchmark uses.

Candidates are timed *interleaved* (A, B, C, A, B, C, ...) in one process so that the
noise of a shared machine hits all of them alike; results are medians with the
inter-quartile range, reported as ratios against a baseline measured in the same run,
and written to benchmarks/results/NAME.json together with the machine and commit.

Benchmarks run under pytest-benchmark use the same records: benchmarks/conftest.py adds
`machine()` to pytest-benchmark's machine info and `add_speedups` to its JSON, and
`main_pytest` lets `python benchmarks/bench_X.py` write benchmarks/results/NAME.json.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from fastfilm.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_features() -> list[str]:
    """The CPU's vector and matrix extensions that decide fp32/bf16 speed, e.g. AVX2 only
    (the AMD EPYC of earlier results) or AVX-512 + AVX-512 BF16 + AMX (Intel Xeon, Sapphire Rapids on)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
    return [f for f in wanted if f in flags]


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


def write_results(name: str, payload: dict, directory: Path | None = None) -> Path:
    """Atomically write {machine, **payload} to benchmarks/results/NAME.json."""
    directory = directory or RESULTS
    return write_json(directory / f"{name}.json", {"machine": machine(), **payload})


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
