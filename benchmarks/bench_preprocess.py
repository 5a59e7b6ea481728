"""Decode + resize throughput of `fastfilm preprocess`: DALI (CPU operators) vs Pillow.

Both backends decode the same 480x320 RGBA PNGs (CLEVR's format) to the model's input side
with decode.decode_images, one call over the whole image set per round, as preprocessing
does. Two image sets, because PNG decode cost grows with file size:
- `generated`: the project's renderer (conftest.generated_pngs), clean images that compress well;
- `noisy`: conftest.noisy_pngs, files about as large as real CLEVR PNGs.
Pillow is each group's baseline, so DALI's extra_info["vs_baseline"] is its speed-up; DALI's
extra_info also records how far its pixels are from Pillow's (mean |DALI - Pillow|, which
tests/test_cache.py bounds, and the largest single difference). Each backend's first call
(DALI's one-time library start) is an untimed warm-up.

    pytest benchmarks/bench_preprocess.py --benchmark-json benchmarks/results/preprocess.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fastfilm.data.decode import dali_available, decode_images, default_workers

SIZES = (224, 64)


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


@pytest.mark.parametrize("backend", ["pillow", "dali"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("image_set", ["generated", "noisy"])
def test_decode(benchmark, throughput, quick, image_sets, pillow_pixels, image_set, size, backend):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali is not installed")
    paths = image_sets[image_set]
    workers = default_workers(0)
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    decode_images(paths, size, out, backend=backend, workers=workers)  # warm-up (DALI's library start)
    benchmark.group = f"decode {image_set} {size}px"
    benchmark.extra_info.update(workers=workers, images=len(paths),
                                mean_png_kib=sum(p.stat().st_size for p in paths) / len(paths) / 1024)
    benchmark.pedantic(decode_images, args=(paths, size, out), kwargs={"backend": backend, "workers": workers},
                       rounds=1 if quick else 5, warmup_rounds=0)
    throughput(len(paths), "images", baseline=backend == "pillow")
    if backend == "dali":
        diff = np.abs(out.astype(np.int16) - pillow_pixels(image_set, size).astype(np.int16))
        benchmark.extra_info.update(mean_abs_diff_vs_pillow=float(diff.mean()),
                                    worst_image_mean_abs_diff=float(diff.mean(axis=(1, 2, 3)).max()),
                                    max_abs_diff_vs_pillow=int(diff.max()))


if __name__ == "__main__":  # `python benchmarks/<this file> [pytest options]` runs it under pytest
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
