"""Decode + resize throughput of `fastfilm preprocess`: DALI (CPU operators) vs Pillow.

Every decoder (decode.BACKENDS: `pillow`; `dali`, DALI decodes and resizes; `dali+pillow`,
DALI decodes and Pillow resizes) decodes the same 480x320 RGBA PNGs (CLEVR's format) to
each output side in SIZES with decode.decode_images, one call over the whole image set per
round, as preprocessing does. Two image sets, because PNG decode cost grows with file size:
- `generated`: the project's renderer (conftest.generated_pngs), clean images that compress well;
- `noisy`: conftest.noisy_pngs, files about as large as real CLEVR PNGs.
Pillow is each group's baseline, so a DALI decoder's extra_info["vs_baseline"] is its speed-up;
extra_info also records how far its pixels are from Pillow's (mean |DALI - Pillow|, which
tests/test_cache.py bounds, and the largest single difference) and the median wall-clock
seconds of a round whatever --benchmark-timer timed. Each decoder's first call (DALI's
one-time library start) is an untimed warm-up.

    pytest benchmarks/bench_preprocess.py --benchmark-json benchmarks/results/preprocess_<kind>.json
    python benchmarks/decoder_table.py        # -> fastfilm/data/decoder_speeds.json, what --decoder auto reads

<kind> is hardware.machine_kind (machine_info["fastfilm"]["machine_kind"], e.g. cpu-amx). On a
shared machine add `--benchmark-timer time.process_time`: CPU seconds of the whole process
(every decode thread) per round, which other jobs' load disturbs far less than wall time.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastfilm.data.decode import BACKENDS, dali_available, decode_images, default_workers

# The quickstart's cpu preset (48), small presets (64), and the paper's 224.
SIZES = (48, 64, 128, 224)


@pytest.fixture(scope="module")
def image_sets(generated_pngs, noisy_pngs) -> dict[str, list[Path]]:
    return {"generated": generated_pngs, "noisy": noisy_pngs}


@pytest.fixture(scope="module")
def pillow_pixels(image_sets):
    """(set, size) -> Pillow's decode of the set [N, size, size, 3], what DALI is compared with."""
    done: dict[tuple[str, int], np.ndarray] = {}

    def pixels(name: str, size: int) -> np.ndarray:
        if (name, size) not in done:
            out = np.zeros((len(image_sets[name]), size, size, 3), np.uint8)
            decode_images(image_sets[name], size, out, backend="pillow")
            done[name, size] = out
        return done[name, size]

    return pixels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("image_set", ["generated", "noisy"])
def test_decode(benchmark, throughput, quick, image_sets, pillow_pixels, image_set, size, backend):
    if backend != "pillow" and not dali_available():
        pytest.skip("nvidia-dali is not installed")
    paths = image_sets[image_set]
    workers = default_workers(0)
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    decode_images(paths, size, out, backend=backend, workers=workers)  # warm-up (DALI's library start)
    benchmark.group = f"decode {image_set} {size}px"
    benchmark.extra_info.update(workers=workers, images=len(paths),
                                mean_png_kib=sum(p.stat().st_size for p in paths) / len(paths) / 1024)
    wall: list[float] = []

    def call():
        t0 = time.perf_counter()
        decode_images(paths, size, out, backend=backend, workers=workers)
        wall.append(time.perf_counter() - t0)

    benchmark.pedantic(call, rounds=1 if quick else 5, warmup_rounds=0)
    throughput(len(paths), "images", baseline=backend == "pillow")
    benchmark.extra_info["wall_median_s"] = statistics.median(wall)
    if backend != "pillow":
        diff = np.abs(out.astype(np.int16) - pillow_pixels(image_set, size).astype(np.int16))
        benchmark.extra_info.update(mean_abs_diff_vs_pillow=float(diff.mean()),
                                    worst_image_mean_abs_diff=float(diff.mean(axis=(1, 2, 3)).max()),
                                    max_abs_diff_vs_pillow=int(diff.max()))


if __name__ == "__main__":  # `python benchmarks/<this file> [pytest options]` runs it under pytest
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
