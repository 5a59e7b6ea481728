"""The GPU suite's own measurements (benchmarks/gpu_suite.py parts b and e), each a subcommand.

    python benchmarks/gpu_suite_parts.py fused-op --json OUT.json [--max-seconds S]
    python benchmarks/gpu_suite_parts.py decode --json OUT.json
    python benchmarks/gpu_suite_parts.py {fused-op,decode} --dry-run     # on a CPU: imports and code paths

fused-op: bn_film_relu_residual's Triton backend against the unfused expression, eager and
torch.compile'd, and a copy of the same bytes, timed with triton.testing.do_bench (median and
quartiles; it clears L2 between runs, so nothing is served from cache across calls). GB/s is
on the bytes the op must move at least (forward: y, residual, out; backward adds dout, y, dy),
so `of_copy` is the fraction of copy bandwidth reached. Cases run most important first (bf16,
channels_last, training forward+backward, at both shapes) and the JSON is rewritten after
each, so a cut-off keeps what was measured.

decode: a few images made by fastfilm's generator (480x320 PNG, as CLEVR's) and JPEG copies,
decoded to 224x224 by Pillow, DALI on the CPU and DALI's `mixed` pipeline (JPEG decoded by
nvJPEG on the GPU; PNG still decoded on the CPU by nvImageCodec, then resized on the GPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The op benchmark's candidates and inputs, measured here at the GPU suite's shapes.
from bench_bn_film_relu_residual import closure, copy_closure, fused, min_bytes, unfused  # noqa: E402
from harness import machine  # noqa: E402

from fastfilm.atomic import write_json  # noqa: E402
from fastfilm.errors import UserError  # noqa: E402

# --------------------------------------------------------------------------- fused op

SHAPES = ((64, 128, 14, 14), (256, 128, 28, 28))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "contiguous")
MODES = ("train_fwd_bwd", "train_fwd", "eval_fwd")


def cases() -> list[tuple]:
    """(shape, dtype name, layout, mode), most important first: the model's default on a GPU
    (bf16, channels_last, training step) at both shapes, then the rest."""
    return [(s, d, lay, m) for d in DTYPES for lay in LAYOUTS for m in MODES for s in SHAPES]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_timer(call) -> tuple[float, float, float]:
    """(median, q1, q3) ms of 5 calls: the dry run's stand-in for do_bench."""
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[2], samples[1], samples[3]


def measure(case_list, candidates: dict, device: str, bench, max_seconds: float, json_path: Path | None,
            what: str) -> list[dict]:
    """Times every candidate and a same-bytes copy on each case; `bench(call)` returns
    (median, q1, q3) in ms. Rewrites `json_path` after each case."""
    deadline = time.monotonic() + max_seconds
    results = []
    for shape, dname, layout, mode in case_list:
        if time.monotonic() > deadline:
            print(f"fused-op: {max_seconds:.0f} s reached, {len(results)} of {len(case_list)} cases measured")
            break
        dtype = DTYPES[dname]
        nbytes = min_bytes(shape, dtype, mode)
        calls = {name: closure(fn, shape, dtype, layout, mode, device) for name, fn in candidates.items()}
        calls["copy"] = copy_closure(nbytes, dtype, device)
        first = {}
        for name, call in calls.items():  # compilation, JIT and autotuning outside the timing
            t0 = time.perf_counter()
            call()
            _sync(device)
            first[name] = round(time.perf_counter() - t0, 3)
        times = {}
        for name, call in calls.items():
            med, q1, q3 = bench(call)
            times[name] = {"median_ms": med, "q1_ms": q1, "q3_ms": q3}
        gbs = {name: nbytes / (t["median_ms"] / 1e3) / 1e9 for name, t in times.items()}
        results.append({"shape": list(shape), "dtype": dname, "layout": layout, "mode": mode, "min_bytes": nbytes,
                        "times": times, "first_call_s": first, "gb_per_s": {k: round(v, 1) for k, v in gbs.items()},
                        "of_copy": {k: round(v / gbs["copy"], 3) for k, v in gbs.items()},
                        "speedup_over_eager": {k: round(times["eager_unfused"]["median_ms"] / t["median_ms"], 2)
                                               for k, t in times.items()}})
        r = results[-1]
        print(f"{'x'.join(map(str, shape))} {dname} {layout} {mode}: " + ", ".join(
            f"{k} {r['gb_per_s'][k]} GB/s ({r['of_copy'][k]:.0%} of copy)" for k in calls), flush=True)
        if json_path:
            write_json(json_path, {"machine": machine(), "what": what, "cases": results})
    return results


def fused_op(args) -> int:
    if args.dry_run:
        # Every code path on the CPU at a small shape: the torch backend stands in for Triton
        # and eager for torch.compile (compiling here would only time the CPU's compiler).
        small = [((2, 4, 3, 3), d, lay, m) for _, d, lay, m in cases()]
        stand_ins = {"triton": fused("torch"), "eager_unfused": unfused, "compiled_unfused": unfused}
        measure(small, stand_ins, "cpu", _cpu_timer, 600, args.json, "DRY RUN on the CPU: stand-ins, not a result")
        print(f"fused-op: {len(cases())} cases, candidates triton / eager_unfused / compiled_unfused / copy")
        return 0
    if not torch.cuda.is_available():
        raise UserError("fused-op: needs a CUDA device (use --dry-run on a CPU)")
    from triton.testing import do_bench

    torch._dynamo.config.recompile_limit = 64  # one compiled graph per case: never fall back to eager
    # Static shapes: after a shape change dynamo would otherwise compile a dynamic-shape kernel.
    compiled = torch.compile(unfused, fullgraph=True, dynamic=False)
    candidates = {"triton": fused("triton"), "eager_unfused": unfused, "compiled_unfused": compiled}
    measure(cases(), candidates, "cuda", lambda call: tuple(do_bench(call, quantiles=[0.5, 0.25, 0.75])),
            args.max_seconds, args.json,
            "GB/s on the op's minimum bytes; of_copy: fraction of a same-bytes copy's GB/s; triton.testing.do_bench")
    return 0


# --------------------------------------------------------------------------- decode

def _images(root: Path, count: int, width: int, height: int) -> tuple[list[Path], list[Path]]:
    """`count` generated PNGs and their JPEG copies (quality 95)."""
    from PIL import Image

    from fastfilm.config import GenerateConfig
    from fastfilm.data.generate import run as generate

    out = root / "clevr"
    cfg = GenerateConfig(out=str(out), train_images=count, val_images=0, questions_per_image=1,
                         image_width=width, image_height=height, seed=0, workers=1)
    if generate(cfg) != 0:
        raise RuntimeError("the generator failed")
    pngs = sorted((out / "images" / "train").glob("*.png"))[:count]
    jpgs = []
    for p in pngs:
        jpg = root / (p.stem + ".jpg")
        with Image.open(p) as im:
            im.convert("RGB").save(jpg, quality=95)
        jpgs.append(jpg)
    return pngs, jpgs


def decode(args) -> int:
    import statistics

    import numpy as np

    from fastfilm.data.decode import DaliDecoder, dali_available, decode_images, default_workers, read_encoded

    if not dali_available():
        raise UserError("decode: nvidia-dali is not installed (pip install nvidia-dali-cuda120)")
    gpu = torch.cuda.is_available()
    if not gpu and not args.dry_run:
        raise UserError("decode: needs a CUDA device (use --dry-run on a CPU)")
    count, (width, height), size = (2, (48, 32), 16) if args.dry_run else (args.images, (480, 320), 224)
    backends = [("pillow", "cpu"), ("dali", "cpu")] + ([("dali", "gpu")] if gpu else [])
    results = []
    with tempfile.TemporaryDirectory(prefix="fastfilm_gpu_decode_") as tmp:
        pngs, jpgs = _images(Path(tmp), count, width, height)
        for fmt, paths in (("png", pngs), ("jpeg", jpgs)):
            encoded = [read_encoded(p) for p in paths]
            ref = None
            for backend, device in backends:
                out = np.zeros((len(paths), size, size, 3), np.uint8)
                build_s = 0.0
                if backend == "pillow":
                    def run(out=out, paths=paths):
                        decode_images(paths, size, out, backend="pillow")
                else:  # the pipeline is built once, apart from the timing
                    t0 = time.perf_counter()
                    decoder = DaliDecoder(size, len(paths), default_workers(), device)
                    build_s = time.perf_counter() - t0

                    def run(out=out, decoder=decoder, encoded=encoded):
                        out[:] = decoder(encoded)
                run()  # warm-up
                seconds = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    run()
                    seconds.append(time.perf_counter() - t0)
                ref = out.copy() if ref is None else ref
                results.append({"format": fmt, "backend": backend, "device": device, "images": len(paths),
                                "images_per_s": len(paths) / statistics.median(seconds), "build_s": build_s,
                                "mean_abs_diff_vs_pillow": float(np.abs(out.astype(int) - ref).mean()),
                                "decoded_on": "GPU (nvJPEG)" if (device == "gpu" and fmt == "jpeg") else "CPU"})
                r = results[-1]
                print(f"{fmt} {backend}/{device}: {r['images_per_s']:.0f} images/s, decoded on {r['decoded_on']}, "
                      f"mean |diff| vs Pillow {r['mean_abs_diff_vs_pillow']:.3f}", flush=True)
    what = "median of 3 decodes of all images after a warm-up; DALI pipeline built apart"
    if args.json:
        write_json(args.json, {"machine": machine(), "size": size, "source": f"{width}x{height} generated images",
                               "what": ("DRY RUN on the CPU: " if args.dry_run else "") + what, "results": results})
    if args.dry_run:
        print(f"decode: generator, Pillow and DALI (cpu) ran on {count} images; on a GPU also DALI mixed")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    f = sub.add_parser("fused-op", help="bn_film_relu_residual: Triton vs eager vs torch.compile vs copy")
    f.add_argument("--max-seconds", type=float, default=90, help="stop starting new cases after this long")
    d = sub.add_parser("decode", help="DALI mixed decode of generated images")
    d.add_argument("--images", type=int, default=32, help="generated images to decode")
    for p in (f, d):
        p.add_argument("--json", type=Path, default=None, help="write the results here")
        p.add_argument("--dry-run", action="store_true",
                       help="run every code path on the CPU (small inputs, stand-ins for the GPU candidates)")
    args = ap.parse_args(argv)
    if not args.dry_run and args.json is None:
        ap.error("--json is required (except with --dry-run)")
    try:
        return {"fused-op": fused_op, "decode": decode}[args.part](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
