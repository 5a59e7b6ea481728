"""Fixtures and hooks shared by every pytest-benchmark file in benchmarks/ (see README.md here).

    pytest benchmarks/bench_loader.py --benchmark-json benchmarks/results/loader.json
    pytest benchmarks/bench_loader.py --bench-quick --benchmark-disable   # smoke: tiny data, each body once

Machine and commit: the JSON's machine_info["fastfilm"] is harness.machine() (CPU model, ISA
flags, torch/triton versions, threads, commit, dirty tree); pytest-benchmark adds its own
commit_info.

Rates and ratios: `throughput(items, unit)` turns a benchmark's median into
extra_info["<unit>_per_s"]. One benchmark of a group may pass baseline=True; the written JSON
then gives every benchmark of that group with the same unit extra_info["vs_baseline"] = its
rate / the baseline's rate, a ratio measured in the same session.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harness  # benchmarks/ is on sys.path: pytest puts a rootdir conftest's directory there


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true",
                     help="tiny data sets and sizes: proves the benchmarks run; the numbers mean nothing")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # The clock waits for CUDA's queue at both ends of a round (harness.synced_clock), unless
    # another timer was chosen on the command line.
    if config.getoption("benchmark_timer", None) == "time.perf_counter":
        config.option.benchmark_timer = "harness.synced_clock"


def pytest_benchmark_update_machine_info(config, machine_info):
    harness.add_machine(machine_info)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Op benchmarks name candidate and baseline (harness.add_speedups); data benchmarks mark a
    # baseline and a unit (below).
    harness.add_speedups(output_json)
    groups: dict[str, list[dict]] = {}
    for bench in output_json["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    for group, members in groups.items():
        baselines = [b for b in members if b["extra_info"].get("baseline")]
        if len(baselines) > 1:
            raise RuntimeError(f"benchmark group {group!r} has {len(baselines)} baselines: "
                               + ", ".join(b["name"] for b in baselines))
        if not baselines or "unit" not in baselines[0]["extra_info"]:
            continue  # no baseline selected in this run (-k), or it ran disabled
        base = baselines[0]
        unit = base["extra_info"]["unit"]
        rate = base["extra_info"][f"{unit}_per_s"]
        for b in members:
            if b["extra_info"].get("unit") == unit:
                b["extra_info"]["vs_baseline"] = b["extra_info"][f"{unit}_per_s"] / rate
                b["extra_info"]["baseline_name"] = base["name"]


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """--bench-quick: benchmarks shrink their data so that a smoke run takes seconds."""
    return request.config.getoption("--bench-quick")


@pytest.fixture
def throughput(benchmark):
    """record(items, unit, baseline=False), called after the timed rounds: `items` done per
    round (images, questions, ...) becomes extra_info[f"{unit}_per_s"] from the median."""
    def record(items: int, unit: str, *, baseline: bool = False) -> None:
        benchmark.extra_info.update(unit=unit, items_per_round=items, baseline=baseline)
        if benchmark.stats is not None:  # None under --benchmark-disable: nothing was timed
            benchmark.extra_info[f"{unit}_per_s"] = items / benchmark.stats.stats.median
    return record


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, restored after: a per-core figure that the
    machine's other load disturbs least."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ data sets

@pytest.fixture(scope="session")
def generated_clevr(tmp_path_factory, quick) -> Path:
    """A CLEVR v1.0-layout directory made by `fastfilm generate` with CLEVR's settings (480x320
    RGBA PNGs, 3-10 objects, 10 questions per image): 48 train images, 4 with --bench-quick."""
    from fastfilm.config import GenerateConfig
    from fastfilm.data.generate import run

    out = tmp_path_factory.mktemp("bench") / "CLEVR_generated"
    run(GenerateConfig(out=str(out), train_images=4 if quick else 48, val_images=0, seed=0))
    return out


@pytest.fixture(scope="session")
def generated_pngs(generated_clevr) -> list[Path]:
    """The train PNGs of generated_clevr, in index order."""
    return sorted((generated_clevr / "images" / "train").glob("*.png"))


@pytest.fixture(scope="session")
def noisy_pngs(tmp_path_factory, quick) -> list[Path]:
    """480x320 RGBA PNGs that compress like real CLEVR renders: a shaded ground, 3-10 flat discs
    and +-1 sensor-like noise. The generator's clean renders compress far better, and PNG decode
    cost grows with file size. 48 files, 4 with --bench-quick."""
    directory = tmp_path_factory.mktemp("noisy_pngs")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:320, 0:480]
    for i in range(4 if quick else 48):
        img = np.empty((320, 480, 4), np.uint8)
        img[..., :3] = (90 + y[..., None] * 60 // 320 + rng.integers(-1, 2, (320, 480, 3))).clip(0, 255)
        for _ in range(rng.integers(3, 11)):
            cy, cx, r = rng.integers(40, 280), rng.integers(40, 440), rng.integers(12, 45)
            img[(y - cy) ** 2 + (x - cx) ** 2 < r * r, :3] = rng.integers(0, 256, 3)
        img[..., 3] = 255
        Image.fromarray(img, "RGBA").save(directory / f"{i:06d}.png")
    return sorted(directory.glob("*.png"))


# CLEVR's question vocabulary has 80-odd tokens, its answers 28 words + 4 specials.
VOCAB, ANSWERS = 90, 32


@pytest.fixture(scope="session")
def cache_split(tmp_path_factory):
    """split(images, size) -> a SplitData laid out as `fastfilm preprocess` writes one (.npy
    files, memory-mapped back read-only): random pixels, 10 questions per image, CLEVR-like
    question lengths. Memoised per (images, size)."""
    from fastfilm.data.cache import SplitData

    made: dict[tuple[int, int], SplitData] = {}

    def split(images: int, size: int) -> SplitData:
        if (images, size) in made:
            return made[images, size]
        directory = tmp_path_factory.mktemp(f"split_{images}x{size}")
        rng = np.random.default_rng(0)
        q = images * 10
        lengths = rng.integers(8, 46, q)  # <START> and <END> included
        questions = np.zeros((q, lengths.max()), np.int64)
        for i, n in enumerate(lengths):
            questions[i, :n] = rng.integers(4, VOCAB, n)
        arrays = {"images": rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8),
                  "questions": questions, "lengths": lengths, "answers": rng.integers(4, ANSWERS, q),
                  "image_index": np.repeat(np.arange(images), 10), "types": rng.integers(0, 5, q),
                  "families": rng.integers(0, 90, q)}
        for name, a in arrays.items():
            np.save(directory / f"{name}.npy", a)
        made[images, size] = SplitData(**{name: np.load(directory / f"{name}.npy", mmap_mode="r")
                                          for name in arrays}, name=f"bench_{size}px")
        return made[images, size]

    return split
