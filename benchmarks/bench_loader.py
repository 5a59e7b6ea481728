"""Questions/s served by the training loader at batch 64, against what a training step consumes.

A cache-shaped split (conftest.cache_split: memory-mapped .npy files, 10 questions per image,
CLEVR-like question lengths) at 64 and 224 px. Loader variants: images memory-mapped (the
default), with length buckets, and resident (whole image array in memory); a round serves
BATCHES batches. `train_step` times one optimisation step of the reference FiLM model at the
`cpu` preset on one batch (at 224 px with a 4-layer stem, 14x14 maps as in the paper) and is
its group's baseline, so a loader's extra_info["vs_baseline"] is how many steps' worth of
questions it serves in the time of one step: it must stay above 1.

    pytest benchmarks/bench_loader.py --benchmark-json benchmarks/results/loader.json
"""
from __future__ import annotations

import itertools
import sys

import pytest
import torch

from fastfilm.data.cache import SplitData
from fastfilm.data.loader import Loader

BATCH = 64
SIZES = (64, 224)
LOADERS = {"mmap": {}, "mmap_buckets": {"buckets": (16, 24, 32, 48)}, "resident": {"resident": True}}


def scale(quick: bool) -> dict:
    """Images in the split, batches per round, rounds."""
    return {"images": 20, "batches": 2, "rounds": 1} if quick else {"images": 1000, "batches": 50, "rounds": 5}


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s}px")
def split(request, cache_split, quick) -> SplitData:
    return cache_split(scale(quick)["images"], request.param)


def serve(loader: Loader, batches: int, epochs: itertools.count) -> None:
    # A fresh epoch each round: its order is computed and its first batches gathered.
    for _ in itertools.islice(loader.epoch(next(epochs)), batches):
        pass


@pytest.mark.parametrize("variant", LOADERS)
def test_loader(benchmark, throughput, quick, split, variant):
    s = scale(quick)
    loader = Loader(split, BATCH, shuffle=True, **LOADERS[variant])
    benchmark.group = f"loader {split.images.shape[1]}px"
    benchmark.pedantic(serve, args=(loader, s["batches"], itertools.count()), rounds=s["rounds"], warmup_rounds=1)
    throughput(s["batches"] * BATCH, "questions")


def test_train_step(benchmark, throughput, quick, split):
    try:
        from fastfilm.config import model_config
        from fastfilm.model import build_model
    except ImportError as e:
        pytest.skip(f"model not importable: {e}")
    size = split.images.shape[1]
    overrides = {"image_size": size} if size == 64 else {"image_size": size, "stem_layers": 4}
    torch.manual_seed(0)
    model = build_model(model_config("cpu", **overrides), int(split.questions.max()) + 1,
                        int(split.answers.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    batch = next(iter(Loader(split, BATCH, shuffle=True).epoch(0)))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(batch.images, batch.questions, batch.lengths), batch.answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    benchmark.group = f"loader {size}px"
    benchmark.extra_info["model"] = f"reference FiLM, preset cpu, {overrides}"
    benchmark.pedantic(step, rounds=max(1, scale(quick)["rounds"] - 2), warmup_rounds=1)
    throughput(BATCH, "questions", baseline=True)


if __name__ == "__main__":  # `python benchmarks/<this file> [pytest options]` runs it under pytest
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
