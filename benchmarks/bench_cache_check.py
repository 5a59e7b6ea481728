"""Cost of the stale-cache check on the images: one stat per image file, every `preprocess`,
`train` and `eval` that reuses a cache.

A CLEVR-layout directory of `--images` small files (CLEVR train has 70k images, val 15k)
is written to a temp dir; `record` is what a build stores (`image_stats`), `check` what a
reuse runs (`_changed_images`: read images.json and the recorded stats, stat every file,
compare). The files were just written, so their inodes are in the kernel's cache, as they
are after a build or any recent read; a cold first check after a reboot pays disk seeks.

    python benchmarks/bench_cache_check.py [--images 70000] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import time_interleaved, write_results  # noqa: E402

from fastfilm.data.cache import _STATS, _changed_images, image_stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=70_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        images = data / "images" / "train"
        images.mkdir(parents=True)
        files = [f"train/CLEVR_train_{i:06d}.png" for i in range(args.images)]
        for f in files:
            (data / "images" / f).write_bytes(b"\x89PNG")
        (cache / "train").mkdir(parents=True)
        (cache / "train" / "images.json").write_text(json.dumps(files))
        np.save(cache / "train" / _STATS, image_stats(data, files))
        assert _changed_images(cache, data, ["train"], unrecorded=None) is None
        results = time_interleaved({
            "record": lambda: image_stats(data, files),
            "check": lambda: _changed_images(cache, data, ["train"], unrecorded=None),
        }, warmup=1, reps=args.reps)
    for name, r in results.items():
        print(f"{name}: {r['median_s']:.3f} s for {args.images} images "
              f"({1e6 * r['median_s'] / args.images:.1f} us/image, IQR {r['q1_s']:.3f}-{r['q3_s']:.3f} s)")
    write_results("cache_check", {"what": "stale-cache image check: seconds per call (median of reps), warm inodes",
                                  "images": args.images, "results": results})


if __name__ == "__main__":
    main()
