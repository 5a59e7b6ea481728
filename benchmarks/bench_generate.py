"""Generator throughput: images/s and questions/s of `fastfilm generate` on this machine.

1. Per-image cost of each stage on one core, all sizes interleaved in one run: scene
   sampling + render (with re-draws of scenes that hide an object), PNG encoding, and the
   question pools of 10 questions. Sizes: 480x320 (CLEVR's), 128x96 and 96x64 with 3-6
   objects (quickstart-sized), 128x96 with --supersample 2.
2. End to end: `generate.run` on every core (N images x 10 questions, files written),
   the sizes interleaved; images/s and questions/s as measured, and the CPU time per
   image, which gives the rate on idle cores (a shared machine's wall times also count
   the time other jobs held the cores; the load average is recorded).
3. The time for 10,000 images x ~10 questions at 480x320, extrapolated from one measured
   end-to-end run of --big images (said so in the JSON).

    python benchmarks/bench_generate.py [--images 60] [--reps 3] [--big 500]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would interleave with the report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import time_interleaved, write_results  # noqa: E402

from fastfilm.config import GenerateConfig  # noqa: E402
from fastfilm.data import generate  # noqa: E402
from fastfilm.data.questions import FAMILIES, question_pools  # noqa: E402

SIZES = {
    "480x320": dict(image_width=480, image_height=320),
    "128x96": dict(image_width=128, image_height=96, max_objects=6),
    "96x64": dict(image_width=96, image_height=64, max_objects=6),
    "128x96_ss2": dict(image_width=128, image_height=96, max_objects=6, supersample=2),
}
BATCH = 8  # images per timed call of a stage (different scenes, so sizes of scenes average out)


def stage_candidates(cfgs: dict[str, GenerateConfig]) -> dict:
    """name -> zero-argument function timing one stage on BATCH images."""
    out = {}
    for name, cfg in cfgs.items():
        made = [generate.make_image(cfg, "train", i) for i in range(BATCH)]
        out[f"{name} scene+render"] = lambda cfg=cfg: [generate.make_image(cfg, "train", i) for i in range(BATCH)]
        out[f"{name} png"] = lambda made=made: [generate.png_bytes(img) for _, img in made]
        if name in ("480x320", "128x96"):  # pools depend on the number of objects, not the image size
            out[f"{name} questions"] = lambda made=made: [
                question_pools(scene, list(FAMILIES), random.Random(i), 10) for i, (scene, _) in enumerate(made)]
    return out


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
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    cfgs = {name: GenerateConfig(out="", val_images=0, train_images=args.images, **kw) for name, kw in SIZES.items()}

    stages = time_interleaved(stage_candidates(cfgs), warmup=1, reps=max(args.reps, 5))
    per_image_ms = {name: 1000 * r["median_s"] / BATCH for name, r in stages.items()}
    one_core = {}
    for name in cfgs:
        parts = [per_image_ms[f"{name} scene+render"], per_image_ms[f"{name} png"],
                 per_image_ms[f"{'480x320' if name == '480x320' else '128x96'} questions"]]
        one_core[name] = {"ms_per_image": sum(parts), "images_per_s": 1000 / sum(parts)}

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

    payload = {"workers": workers, "questions_per_image": 10,
               "per_image_ms_one_core": per_image_ms, "one_core": one_core,
               "end_to_end_all_cores": all_cores, "stage_samples": stages, "end_to_end_samples": e2e}
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
    path = write_results("generate", payload)

    print(f"one core, ms per image ({BATCH} images per sample, median of {max(args.reps, 5)}):")
    for name, ms in per_image_ms.items():
        print(f"  {name:28s} {ms:8.2f}")
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
