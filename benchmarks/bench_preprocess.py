"""Decode + resize throughput of `fastfilm preprocess`: DALI (CPU operators) vs Pillow.

Both decode the same 480x320 RGBA PNGs (CLEVR's format) and resize them to the model's
input side, interleaved in one run (harness.time_interleaved) so that the noise of a shared
machine hits both alike. Two image sets, because PNG decode cost grows with file size:
- `generated`: the project's renderer (fastfilm.data.generate), clean images of ~25 KiB;
- `noisy`: a numpy stand-in with +-1 sensor-like noise, ~175 KiB like real CLEVR PNGs
  (CLEVR_v1.0: ~18 GB over 100k images).
Each backend's first call (DALI's one-time library start, ~1 s) is an untimed warm-up.

    python benchmarks/bench_preprocess.py [--images 48] [--sizes 224,64] [--workers 0] [--reps 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ratios, time_interleaved, write_results  # noqa: E402

from fastfilm.data.decode import dali_available, decode_images, default_workers  # noqa: E402


def generated_pngs(directory: Path, count: int) -> bool:
    """Images from the project's renderer; False when it is not importable."""
    try:
        from fastfilm.config import GenerateConfig
        from fastfilm.data.generate import make_image
    except ImportError:
        return False
    cfg = GenerateConfig(out=str(directory))
    for i in range(count):
        Image.fromarray(make_image(cfg, "train", i)[1], "RGBA").save(directory / f"{i:06d}.png")
    return True


def noisy_pngs(directory: Path, count: int) -> None:
    """Shaded ground, 3-10 flat discs and +-1 noise, so the PNGs compress like rendered CLEVR."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:320, 0:480]
    for i in range(count):
        img = np.empty((320, 480, 4), np.uint8)
        img[..., :3] = (90 + y[..., None] * 60 // 320 + rng.integers(-1, 2, (320, 480, 3))).clip(0, 255)
        for _ in range(rng.integers(3, 11)):
            cy, cx, r = rng.integers(40, 280), rng.integers(40, 440), rng.integers(12, 45)
            img[(y - cy) ** 2 + (x - cx) ** 2 < r * r, :3] = rng.integers(0, 256, 3)
        img[..., 3] = 255
        Image.fromarray(img, "RGBA").save(directory / f"{i:06d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48, help="PNGs per image set")
    ap.add_argument("--sizes", default="224,64")
    ap.add_argument("--workers", type=int, default=0, help="threads for both backends (0: one per core)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not dali_available():
        sys.exit("nvidia-dali is not installed: nothing to compare Pillow with")
    workers = default_workers(args.workers)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        sets: dict[str, list[Path]] = {}
        for name in ("generated", "noisy"):
            d = Path(tmp) / name
            d.mkdir()
            if name == "noisy":
                noisy_pngs(d, args.images)
            elif not generated_pngs(d, args.images):
                continue
            sets[name] = sorted(d.glob("*.png"))
        outs = {s: np.zeros((args.images, s, s, 3), np.uint8) for s in sizes}
        candidates = {}
        for name, paths in sets.items():
            for s in sizes:
                for backend in ("pillow", "dali"):
                    candidates[f"{name}/{backend}_{s}"] = (lambda p=paths, b=backend, s=s: decode_images(
                        p, s, outs[s], backend=b, workers=workers))
        results = time_interleaved(candidates, warmup=1, reps=args.reps)
        kib = {name: sum(p.stat().st_size for p in paths) / len(paths) / 1024 for name, paths in sets.items()}
    table = {}
    for name in sets:
        for s in sizes:
            keys = [f"{name}/pillow_{s}", f"{name}/dali_{s}"]
            speedup = ratios({k: results[k] for k in keys}, keys[0])
            for k in keys:
                r = results[k]
                table[k] = {"images_per_s": args.images / r["median_s"],
                            "images_per_s_iqr": [args.images / r["q3_s"], args.images / r["q1_s"]],
                            "speedup_vs_pillow": speedup[k], "mean_png_kib": round(kib[name], 1)}
    payload = {"what": "decode + resize of 480x320 RGBA PNGs to SxS RGB uint8, images/s (median of reps)",
               "images_per_set": args.images, "workers": workers, "results": table, "raw": results}
    path = write_results("preprocess", payload)
    for k, row in table.items():
        print(f"{k:22s} {row['images_per_s']:8.1f} images/s   x{row['speedup_vs_pillow']:.2f} vs Pillow"
              f"   ({row['mean_png_kib']} KiB PNGs)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
