"""Questions/s served by the training loader at batch 64, against what a training step consumes.

A cache-shaped split (memory-mapped .npy files, 10 questions per image, CLEVR-like question
lengths) is written to a temp dir; each candidate serves `--batches` batches, interleaved
in one run. Loader variants: images memory-mapped (the default), with length buckets, and
resident (whole image array in memory). `train_step` times one optimisation step of the
reference FiLM model at the `cpu` preset on one batch (at 224 px with a 4-layer stem,
14x14 maps as in the paper), so `loader_over_step` says how many steps' worth of batches
the loader serves in the time of one: it must stay above 1.

    python benchmarks/bench_loader.py [--sizes 64,224] [--images 1000] [--batches 50] [--reps 3]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import time_interleaved, write_results  # noqa: E402

from fastfilm.data.cache import SplitData  # noqa: E402
from fastfilm.data.loader import Loader  # noqa: E402

BATCH = 64
VOCAB, ANSWERS = 90, 32  # CLEVR: 80-odd question tokens, 28 answers + 4 specials


def write_split(directory: Path, images: int, size: int, seed: int = 0) -> SplitData:
    """Random arrays laid out as a cache split, then memory-mapped back, as load_split does."""
    rng = np.random.default_rng(seed)
    q = images * 10
    lengths = rng.integers(8, 46, q)  # CLEVR questions: ~8 to 45 tokens with START/END
    questions = np.zeros((q, lengths.max()), np.int64)
    for i, n in enumerate(lengths):
        questions[i, :n] = rng.integers(4, VOCAB, n)
    arrays = {"images": rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8), "questions": questions,
              "lengths": lengths, "answers": rng.integers(4, ANSWERS, q), "image_index": np.repeat(np.arange(images), 10),
              "types": rng.integers(0, 5, q), "families": rng.integers(0, 90, q)}
    for name, a in arrays.items():
        np.save(directory / f"{name}.npy", a)
    return SplitData(**{name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in arrays}, name="bench")


def serve(loader: Loader, batches: int, epoch: itertools.count) -> None:
    for _ in itertools.islice(loader.epoch(next(epoch)), batches):
        pass


def train_step_fn(split: SplitData, size: int):
    """A closure doing one reference-model training step on a fixed batch, or (None, reason)."""
    try:
        from fastfilm.config import model_config
        from fastfilm.model import build_model
    except ImportError as e:
        return None, f"model not importable: {e}"
    overrides = {"image_size": size} if size == 64 else {"image_size": size, "stem_layers": 4}
    cfg = model_config("cpu", **overrides)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, ANSWERS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    batch = next(iter(Loader(split, BATCH, shuffle=True).epoch(0)))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(batch.images, batch.questions, batch.lengths), batch.answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, f"reference FiLM, preset cpu, {overrides}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3, help="a CPU training step at 224 px takes ~20 s")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step comparison")
    args = ap.parse_args()
    payload: dict = {"what": f"questions/s served at batch {BATCH} (median of reps), loader vs one training step",
                     "images": args.images, "questions": args.images * 10, "batches": args.batches, "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            split = write_split(Path(tmp), args.images, size)
            counter = itertools.count()
            loaders = {"mmap": Loader(split, BATCH, shuffle=True),
                       "mmap_buckets": Loader(split, BATCH, shuffle=True, buckets=(16, 24, 32, 48)),
                       "resident": Loader(split, BATCH, shuffle=True, resident=True)}
            candidates = {name: (lambda ld=ld: serve(ld, args.batches, counter)) for name, ld in loaders.items()}
            step, step_note = (None, "skipped") if args.no_step else train_step_fn(split, size)
            if step is not None:
                candidates["train_step"] = step
            results = time_interleaved(candidates, warmup=1, reps=args.reps)
        qps = {name: (args.batches if name != "train_step" else 1) * BATCH / r["median_s"]
               for name, r in results.items()}
        row = {"questions_per_s": qps, "train_step": step_note, "raw": results}
        if "train_step" in qps:
            row["loader_over_step"] = {n: q / qps["train_step"] for n, q in qps.items() if n != "train_step"}
        payload["sizes"][str(size)] = row
        for name, q in qps.items():
            print(f"{size:4d}px {name:13s} {q:10.0f} questions/s")
    print(f"wrote {write_results('loader', payload)}")


if __name__ == "__main__":
    main()
