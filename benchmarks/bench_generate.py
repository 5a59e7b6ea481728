"""Generator throughput: what `fastfilm generate` costs per image and in total on this machine.

Microbenchmarks (pytest-benchmark, one core, BATCH images per round):
- `test_scene_render`: scene sampling + render, with the re-draws of scenes that hide an object,
  at 480x320 (CLEVR's), 128x96 and 96x64 with 3-6 objects (quickstart-sized), and 128x96 with
  --supersample 2;
- `test_png`: encoding the RGBA images, generate.png_bytes against Pillow's default zlib level
  (the baseline; extra_info gives the bytes per image of each);
- `test_question_pools`: the 10-question pools of an image (scenes of 3-10 and of 3-6 objects);
- `test_scalar_draws`: the draws the question samplers make (random() and a choice of one of 8),
  with Python's random.Random as generate uses it and with numpy's Generator (the baseline).

    pytest benchmarks/bench_generate.py --benchmark-json benchmarks/results/generate.json

End to end (a script, timed by harness.time_interleaved): `generate.run` on every core, N
images x 10 questions with files written, the sizes interleaved; images/s and questions/s
as measured and the CPU time per image, which gives the rate on idle cores (a shared
machine's wall times also count the time other jobs held the cores; the load average is
recorded). Then the time for 10,000 images x ~10 questions at 480x320, extrapolated from
one measured run of --big images (said so in the JSON).

    python benchmarks/bench_generate.py [--images 60] [--reps 3] [--big 500] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, time_interleaved, write_results  # noqa: E402

from fastfilm.config import GenerateConfig  # noqa: E402
from fastfilm.data import generate  # noqa: E402
from fastfilm.data.questions import FAMILIES, question_pools  # noqa: E402

SIZES = {
    "480x320": dict(image_width=480, image_height=320),
    "128x96": dict(image_width=128, image_height=96, max_objects=6),
    "96x64": dict(image_width=96, image_height=64, max_objects=6),
    "128x96_ss2": dict(image_width=128, image_height=96, max_objects=6, supersample=2),
}
BATCH = 8  # images per round of a stage (different scenes, so sizes of scenes average out)
DRAWS = 1000  # draws per round of test_scalar_draws


def config(size: str, images: int = BATCH) -> GenerateConfig:
    return GenerateConfig(out="", val_images=0, train_images=images, **SIZES[size])


@pytest.fixture(scope="module")
def made() -> dict:
    """(scene, RGBA image) of BATCH images, per size, memoised."""
    cache: dict[str, list] = {}

    def get(size: str) -> list:
        if size not in cache:
            cache[size] = [generate.make_image(config(size), "train", i) for i in range(BATCH)]
        return cache[size]

    return get


@pytest.mark.parametrize("size", SIZES)
def test_scene_render(benchmark, throughput, quick, size):
    cfg = config(size)
    benchmark.group = "generate scene+render"
    benchmark.pedantic(lambda: [generate.make_image(cfg, "train", i) for i in range(BATCH)],
                       rounds=1 if quick else 5, warmup_rounds=0 if quick else 1)
    throughput(BATCH, "images")


def _pil_default(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("encoder", ["png_bytes", "pil_default"])
def test_png(benchmark, throughput, quick, made, encoder):
    images = [img for _, img in made("480x320")]
    encode = generate.png_bytes if encoder == "png_bytes" else _pil_default
    benchmark.group = "generate png 480x320"
    benchmark.extra_info["bytes_per_image"] = sum(len(encode(img)) for img in images) / len(images)
    benchmark.pedantic(lambda: [encode(img) for img in images], rounds=1 if quick else 5, warmup_rounds=0)
    throughput(len(images), "images", baseline=encoder == "pil_default")


@pytest.mark.parametrize("size", ["480x320", "128x96"])  # 3-10 and 3-6 objects: pools depend on the objects only
def test_question_pools(benchmark, throughput, quick, made, size):
    scenes = [scene for scene, _ in made(size)]
    benchmark.group = "generate question pools"
    benchmark.pedantic(lambda: [question_pools(scene, list(FAMILIES), random.Random(i), 10)
                                for i, scene in enumerate(scenes)], rounds=1 if quick else 5, warmup_rounds=0)
    throughput(len(scenes), "images")


@pytest.mark.parametrize("rng", ["python_random", "numpy_generator"])
def test_scalar_draws(benchmark, throughput, rng):
    values = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
    if rng == "python_random":
        r = random.Random(0)
        draw = lambda: (r.random(), r.choice(values))  # noqa: E731
    else:
        g = np.random.default_rng(0)
        draw = lambda: (g.random(), values[g.integers(len(values))])  # noqa: E731
    benchmark.group = "generate scalar draws"
    benchmark(lambda: [draw() for _ in range(DRAWS)])
    throughput(DRAWS, "draws", baseline=rng == "numpy_generator")


# ------------------------------------------------------------------ end to end (script)

def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def end_to_end(cfg: GenerateConfig) -> dict:
    """Run `generate.run` into a fresh temp dir: wall and CPU seconds, images, questions.

    CPU seconds are what the run costs whatever else the machine is doing; wall seconds
    on a shared machine also count the time other people's jobs held the cores.
    """
    with tempfile.TemporaryDirectory() as d:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        generate.run(dataclasses.replace(cfg, out=d))
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        questions = len(json.loads((Path(d) / "questions" / "CLEVR_train_questions.json").read_text())["questions"])
    return {"seconds": seconds, "cpu_seconds": cpu, "images": cfg.train_images, "questions": questions,
            "load_average_1min_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60, help="images per end-to-end run of each size")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--big", type=int, default=500,
                        help="images of the run the 10k figure is extrapolated from (0: skip)")
    parser.add_argument("--json", default=str(RESULTS / "generate_end_to_end.json"), help="results file")
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    cfgs = {name: config(name, args.images) for name in SIZES}

    runs: dict[str, list] = {name: [] for name in cfgs}
    candidates = {name: (lambda name=name: runs[name].append(end_to_end(cfgs[name]))) for name in cfgs}
    e2e = time_interleaved(candidates, warmup=0, reps=args.reps)
    all_cores = {}
    for name, r in e2e.items():
        questions = sum(x["questions"] for x in runs[name]) / len(runs[name])
        cpu_ms = 1000 * min(x["cpu_seconds"] for x in runs[name]) / args.images
        all_cores[name] = {"median_s": r["median_s"], "images": args.images, "questions": questions,
                           "images_per_s": args.images / r["median_s"], "questions_per_s": questions / r["median_s"],
                           "cpu_ms_per_image": cpu_ms, "images_per_s_if_cores_were_idle": workers * 1000 / cpu_ms,
                           "load_average_1min": [x["load_average_1min_after"] for x in runs[name]]}

    payload = {"command": "python " + " ".join(sys.argv), "workers": workers, "questions_per_image": 10,
               "end_to_end_all_cores": all_cores, "end_to_end_samples": e2e}
    if args.big:
        big = end_to_end(dataclasses.replace(cfgs["480x320"], train_images=args.big))
        minutes = 10_000 * big["seconds"] / big["images"] / 60
        payload["clevr_10k"] = {
            "measured": big, "images_per_s": big["images"] / big["seconds"],
            "questions_per_image": big["questions"] / big["images"],
            "extrapolated_minutes_for_10000_images": minutes,
            "minutes_for_10000_images_if_cores_were_idle": 10_000 * big["cpu_seconds"] / big["images"] / workers / 60,
            "note": f"extrapolated linearly from one measured run of {big['images']} images at 480x320, "
                    f"{workers} workers, ~10 questions each; the idle-core figure divides its CPU time by the cores",
        }
    out = Path(args.json)
    path = write_results(out.stem, payload, out.parent)

    print(f"all {workers} cores, end to end ({args.images} images x 10 questions, median of {args.reps}):")
    for name, r in all_cores.items():
        print(f"  {name:12s} {r['images_per_s']:7.1f} images/s {r['questions_per_s']:8.1f} questions/s "
              f"({r['cpu_ms_per_image']:.1f} CPU ms/image: {r['images_per_s_if_cores_were_idle']:.0f} images/s "
              f"if the cores were idle; load {max(r['load_average_1min']):.1f})")
    if args.big:
        c = payload["clevr_10k"]
        minutes, idle = c["extrapolated_minutes_for_10000_images"], c["minutes_for_10000_images_if_cores_were_idle"]
        print(f"10,000 images x ~{c['questions_per_image']:.0f} questions at 480x320: ~{minutes:.1f} min measured, "
              f"~{idle:.1f} min if the cores were idle ({c['note']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
