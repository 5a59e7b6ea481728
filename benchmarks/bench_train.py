"""Issue 5's end-to-end benchmark: the reference model (eager fp32) against the fast path.

    python benchmarks/bench_train.py --preset cpu --device cpu --json 'benchmarks/results/train_{kind}.json'
    python benchmarks/bench_train.py --preset paper --device cuda --epoch-questions 700000 \\
        --json 'benchmarks/results/train_{kind}.json'

`{kind}` in --json becomes the machine kind (hardware.machine_kind: cpu-amx, cpu-avx2,
cuda-sm90, ...), so that each kind of machine keeps its own results file; any other path is
written exactly as given. The results record the CPU's ISA (AMX, AVX-512 BF16, AVX2) and
the matmul peaks measured in the run (`matmul_peak_tflops`, `matmul_peak_n`), next to
harness.machine().

One process, one preset, the same synthetic batches (nanoGPT-style: no data loader) for every
candidate, timed interleaved by benchmarks/harness.py so machine noise hits all alike:
training questions/s, inference questions/s at the training batch size and batch-1 latency,
peak memory of a training step, and MFU against bf16/fp32 matmul peaks measured in the same
run. "fast" is the fast path as this machine kind's defaults resolve it (engine/options.py);
the ablation flips one of its switches at a time (fused op, AMP, channels_last, compile):
"-x" turns a piece that is on by default off, "+x" one that is off on. "fast frozen" is
inference as `fastfilm eval` runs it (Predictor(frozen=True): weights frozen into the graph).
The file records the machine kind and ISA; --json writes exactly the path given.
`--cuda-graphs` runs every fast candidate with CUDA graphs (on a GPU; elsewhere they run
without, with a note). `--group K` adds the fast path, compiled and eager, trained on
batches whose questions come K per image (`--group-questions K`: one stem pass per image).
Compile time (first call minus a steady call) is reported apart.
By default compiles start from an empty inductor cache, so compile times are cold ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ratios, time_interleaved, write_results_to  # noqa: E402

VOCAB, ANSWERS, MAX_LENGTH = 93, 28, 46  # CLEVR: 93 question tokens, 28 answers, 46 tokens at most


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help="model preset (fastfilm.config.PRESETS)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--steps", type=int, default=10, help="timed calls per candidate (after warm-up)")
    p.add_argument("--batch-size", type=int, default=64, help="questions per training/inference step (paper: 64)")
    p.add_argument("--epoch-questions", type=int, default=700_000,
                   help="extrapolate seconds per epoch of this many questions (CLEVR train: 700k)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-ablation", action="store_true", help="time only the reference and the full fast path")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the fast candidates replay CUDA graphs (fastfilm's --cuda-graphs; CUDA only)")
    p.add_argument("--group", type=int, default=4,
                   help="also time training on batches of K questions per image, sharing the stem (0: skip)")
    p.add_argument("--warm-cache", action="store_true", help="reuse the inductor cache (compile times are then warm)")
    p.add_argument("--json", default="", metavar="PATH",
                   help="write the results to exactly PATH; '{kind}' in it becomes the machine kind "
                        "(e.g. 'benchmarks/results/train_{kind}.json')")
    return p.parse_args(argv)


def results_path(arg: str, kind: str) -> Path | None:
    """Where --json writes: PATH as given, with '{kind}' replaced by the machine kind; None without --json."""
    return Path(arg.replace("{kind}", kind)) if arg else None


def save(args: argparse.Namespace, payload: dict, device: torch.device) -> Path | None:
    """Write {machine, **payload} to --json's path (exactly it); the path, or None without --json."""
    from fastfilm.hardware import machine_kind

    path = results_path(args.json, machine_kind(device))
    if path is not None:
        write_results_to(path, payload, device=str(device))
    return path


def synthetic_batches(n: int, batch_size: int, image_size: int, device: torch.device, seed: int = 0) -> list:
    """n batches (images [B, 3, S, S] uint8 channels_last, questions [B, L] with L the batch's length
    bucket, lengths [B], answers [B]); question lengths roughly like CLEVR's (6..46, mean ~20)."""
    from fastfilm.engine.batching import bucket_length

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, generator=g)
        lengths = (torch.randn(batch_size, generator=g) * 7 + 20).round().long().clamp(6, MAX_LENGTH)
        width = bucket_length(int(lengths.max()), MAX_LENGTH)
        questions = torch.randint(4, VOCAB, (batch_size, width), generator=g)
        questions[torch.arange(width)[None] >= lengths[:, None]] = 0
        answers = torch.randint(0, ANSWERS, (batch_size,), generator=g)
        out.append([images.permute(0, 3, 1, 2).to(device), questions.to(device), lengths.to(device),
                    answers.to(device)])
    return out


def matmul_peak(dtype: torch.dtype, device: torch.device) -> dict:
    """Best FLOP/s of a square matmul (n >= 1024 on CPU, 4096 on GPU, grown until a call
    takes >= 20 ms); the best of 5 calls, since a peak is what the hardware can reach."""
    n = 4096 if device.type == "cuda" else 1024
    while True:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        t = time_interleaved({"mm": lambda: a @ b}, warmup=1, reps=1)["mm"]["median_s"]
        if t >= 0.02 or n >= 8192:
            break
        n *= 2
    best = min(time_interleaved({"mm": lambda: a @ b}, warmup=0, reps=5)["mm"]["samples_s"])
    return {"n": n, "tflops": 2 * n ** 3 / best / 1e12}


def model_flops(model_cfg, batch: list, train: bool) -> float:
    """FLOPs of one reference forward (and backward when train) on `batch` ([images, questions,
    lengths, answers(, image_index)]), counted per aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastfilm.model import build_model

    model = build_model(model_cfg, VOCAB, ANSWERS).to(batch[0].device).train(train)
    with FlopCounterMode(display=False) as counter:
        if train:
            torch.nn.functional.cross_entropy(model(*batch[:3], *batch[4:]), batch[3]).backward()
        else:
            with torch.no_grad():
                model(*batch[:3])
    return float(counter.get_total_flops())


def peak_memory(fn, device: torch.device) -> float:
    """Peak bytes allocated during one call of fn above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return float(peak)


def candidates(ablation: bool, group: int, device: torch.device, cuda_graphs: bool = False) -> dict:
    """name -> (FastConfig, questions per image in the training batches). "fast" is the fast path
    as this machine kind's defaults resolve it (engine/options.py), with CUDA graphs when
    `cuda_graphs`; the ablation flips one switch of it at a time: "fast -x" turns a default-on
    piece off, "fast +x" a default-off piece on."""
    from fastfilm.config import FastConfig
    from fastfilm.engine.options import resolve

    fast = FastConfig(cuda_graphs=cuda_graphs)
    ex = resolve(fast, device)
    out = {"reference": (FastConfig(reference=True, amp="off", compile=False, fused=False, channels_last=False), 1),
           "fast": (fast, 1)}
    if ablation:
        on = {"fused": ex.fused, "amp": ex.dtype is not None, "channels_last": ex.channels_last, "compile": ex.compile}
        for name, value in on.items():
            flipped = ("off" if value else "bf16") if name == "amp" else not value
            out[f"fast {'-' if value else '+'}{name}"] = (dataclasses.replace(fast, **{name: flipped}), 1)
    if group > 1:
        # Each grouped candidate is compared with its ungrouped twin, so the other-compile twin
        # is timed even without the ablation.
        twin = f"fast {'-' if ex.compile else '+'}compile"
        out.setdefault(twin, (dataclasses.replace(fast, compile=not ex.compile), 1))
        out.update({f"fast +group{group}": (fast, group), f"{twin} +group{group}": (out[twin][0], group)})
    return out


def grouped(batch: list, group: int) -> list:
    """The batch with `group` questions per image: images [ceil(B / group), ...] and image_index [B]."""
    images, questions, lengths, answers = batch
    index = torch.arange(len(questions), device=questions.device) // group
    return [images[: -(-len(questions) // group)], questions, lengths, answers, index]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastfilm_bench_inductor_")
    from tqdm import tqdm

    from fastfilm.config import model_config
    from fastfilm.engine.options import resolve
    from fastfilm.engine.predictor import Predictor
    from fastfilm.engine.step import TrainStep
    from fastfilm.engine.build import build_optimizer
    from fastfilm.hardware import cpu_isa, machine_kind, resolve_device
    from fastfilm.model import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = model_config(args.preset)
    batches = synthetic_batches(8, args.batch_size, cfg.image_size, device)
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    flops_train = model_flops(cfg, batches[0], train=True)
    flops_infer = model_flops(cfg, batches[0], train=False)
    # Built once, outside the timed calls (no per-step arange or slicing in what is measured).
    grouped_batches = [grouped(batch, args.group) for batch in batches] if args.group > 1 else []
    flops_grouped = model_flops(cfg, grouped_batches[0], train=True) if grouped_batches else 0.0

    # Every candidate starts from the same weights; effective duplicates (e.g. "-amp" where bf16
    # already fell back to fp32) are timed once.
    torch.manual_seed(0)
    init = build_model(cfg, VOCAB, ANSWERS).to(device).state_dict()
    runs, same_as, effective = {}, {}, {}
    for name, (fast_cfg, group) in candidates(not args.no_ablation, args.group, device, args.cuda_graphs).items():
        opts = resolve(fast_cfg, device)
        key = (opts.reference, opts.dtype, opts.compile, opts.fused, opts.channels_last, opts.cuda_graphs, group)
        if key in effective:
            same_as[name] = effective[key]
            continue
        effective[key] = name
        model = build_model(cfg, VOCAB, ANSWERS, fast=not opts.reference, fused=opts.fused,
                            channels_last=opts.channels_last).to(device)
        model.load_state_dict(init)
        runs[name] = {"opts": opts, "amp": str(key[1] or "fp32").replace("torch.", ""),
                      "step": TrainStep(model, build_optimizer(model, 3e-4, 1e-5, opts), opts),
                      "predict": Predictor(model, opts), "i": 0, "group": group}
    # Inference as `fastfilm eval` runs it: the fast path's model frozen into the compiled graph
    # (Predictor(frozen=True)); timed as its own inference candidate on the "fast" model.
    infer_only = {}
    if runs["fast"]["opts"].compile:
        fast_run = runs["fast"]
        infer_only["fast frozen"] = {**fast_run, "predict": Predictor(fast_run["predict"].model, fast_run["opts"],
                                                                      frozen=True)}

    def train_fn(r):
        def call():
            r["i"] += 1
            if r["group"] == 1:
                return r["step"](*batches[r["i"] % len(batches)])
            *tensors, index = grouped_batches[r["i"] % len(grouped_batches)]
            return r["step"](*tensors, image_index=index)
        return call

    def infer_fn(r, b=None):
        return lambda: r["predict"](*[t[:b] for t in batches[r["i"] % len(batches)][:3]])

    first = {}
    for name, r in tqdm(runs.items(), desc="first calls (compile)", file=sys.stderr):
        t0 = time.perf_counter()
        train_fn(r)()
        t1 = time.perf_counter()
        infer_fn(r)()
        first[name] = (t1 - t0, time.perf_counter() - t1)
    for name, r in infer_only.items():
        t0 = time.perf_counter()
        infer_fn(r)()
        first[name] = (0.0, time.perf_counter() - t0)
    load = [os.getloadavg()[0]]
    train = time_interleaved({n: train_fn(r) for n, r in runs.items()}, warmup=2, reps=args.steps)
    load.append(os.getloadavg()[0])
    infer = time_interleaved({n: infer_fn(r) for n, r in {**runs, **infer_only}.items()}, warmup=2, reps=args.steps)
    load.append(os.getloadavg()[0])
    lat_runs = {n: runs[n] for n in ("reference", "fast")}
    for r in lat_runs.values():
        infer_fn(r, 1)()  # batch 1 is its own static shape: compile it before timing
    latency = time_interleaved({n: infer_fn(r, 1) for n, r in lat_runs.items()}, warmup=2, reps=args.steps, inner=3)

    b = args.batch_size
    results = {}
    for name, r in runs.items():
        t_train, t_infer = train[name]["median_s"], infer[name]["median_s"]
        peak = peaks["bf16" if r["amp"] == "bfloat16" else "fp32"]["tflops"] * 1e12
        results[name] = {
            "amp": r["amp"], "compile": r["opts"].compile, "fused": r["opts"].fused,
            "channels_last": r["opts"].channels_last, "cuda_graphs": r["opts"].cuda_graphs,
            "questions_per_image": r["group"],
            "train_qps": b / t_train, "train_step_s": train[name], "infer_qps": b / t_infer, "infer_step_s": infer[name],
            "train_compile_s": max(0.0, first[name][0] - t_train), "infer_compile_s": max(0.0, first[name][1] - t_infer),
            "train_mfu": (flops_train if r["group"] == 1 else flops_grouped) / t_train / peak,
            "infer_mfu": flops_infer / t_infer / peak,
            "train_peak_memory_mb": peak_memory(train_fn(r), device) / 2 ** 20,
            "epoch_s": args.epoch_questions / (b / t_train),
        }
        if name in latency:
            results[name]["batch1_latency_ms"] = latency[name]["median_s"] * 1e3
    for name, twin in same_as.items():
        results[name] = {**results[twin], "same_as": twin}

    train_x, infer_x = ratios(train, "reference"), ratios(infer, "reference")
    frozen = {name: {"infer_qps": b / infer[name]["median_s"], "infer_step_s": infer[name],
                     "infer_speedup": infer_x[name],
                     "infer_compile_s": max(0.0, first[name][1] - infer[name]["median_s"]),
                     "infer_mfu": flops_infer / infer[name]["median_s"] / (
                         peaks["bf16" if runs["fast"]["amp"] == "bfloat16" else "fp32"]["tflops"] * 1e12)}
              for name in infer_only}
    ref, fast = results["reference"], results["fast"]
    ablation = {name: {"train_qps": results[name]["train_qps"], "infer_qps": results[name]["infer_qps"],
                       "fast_train_speedup_over_this": fast["train_qps"] / results[name]["train_qps"],
                       "fast_infer_speedup_over_this": fast["infer_qps"] / results[name]["infer_qps"],
                       **({"same_as": results[name]["same_as"]} if "same_as" in results[name] else {})}
                for name in results if name.startswith(("fast -", "fast +")) and "+group" not in name}
    # Sharing the stem among an image's questions, against the same path without it.
    group_gain = {name: {"train_qps": results[name]["train_qps"],
                         "speedup_over_ungrouped": train_x[name] / train_x[name.replace(f" +group{args.group}", "")],
                         "speedup_over_reference": train_x[name]}
                  for name in results if "+group" in name}
    from fastfilm.engine.options import describe
    from fastfilm.hardware import cpu_isa, machine_kind

    payload = {
        "preset": args.preset, "device": str(device), "batch_size": b, "steps": args.steps,
        "cuda_graphs": args.cuda_graphs,
        "isa": cpu_isa() if device.type == "cpu" else None, "machine_kind": machine_kind(device),
        "fast_is": describe(runs["fast"]["opts"]), "load_1min_before_train_infer_end": load,
        "threads": torch.get_num_threads(), "cold_compile": not args.warm_cache,
        "reference_train_qps": ref["train_qps"], "fast_train_qps": fast["train_qps"],
        "train_speedup": train_x["fast"],
        "reference_infer_qps": ref["infer_qps"], "fast_infer_qps": fast["infer_qps"],
        "infer_speedup": infer_x["fast"],
        "reference_batch1_latency_ms": ref["batch1_latency_ms"], "fast_batch1_latency_ms": fast["batch1_latency_ms"],
        "epoch_questions": args.epoch_questions, "reference_epoch_s": ref["epoch_s"], "fast_epoch_s": fast["epoch_s"],
        "matmul_peak_tflops": {k: v["tflops"] for k, v in peaks.items()},
        "matmul_peak_n": {k: v["n"] for k, v in peaks.items()},  # square matmul side that reached the peak
        "model_gflop_per_step": {"train": flops_train / 1e9, "infer": flops_infer / 1e9,
                                 f"train_group{args.group}": flops_grouped / 1e9},
        "ablation": ablation, "questions_per_image": group_gain, "candidates": results, "inference_only": frozen,
    }
    print(f"{args.preset} preset on {device}, {machine_kind(device)} (ISA {cpu_isa()}, {torch.get_num_threads()} "
          f"threads), batch {b}; "
          f"matmul peak fp32 {peaks['fp32']['tflops'] * 1e3:.0f} GFLOP/s, bf16 {peaks['bf16']['tflops'] * 1e3:.0f}")
    print(f"{'candidate':22} {'amp':>8} {'train q/s':>10} {'x ref':>6} {'infer q/s':>10} {'x ref':>6} "
          f"{'MFU tr':>7} {'mem MB':>7} {'compile s':>10}")
    for name, r in results.items():
        twin = same_as.get(name, name)
        print(f"{name:22} {r['amp']:>8} {r['train_qps']:10.1f} {train_x[twin]:6.2f} {r['infer_qps']:10.1f} "
              f"{infer_x[twin]:6.2f} "
              f"{r['train_mfu']:7.1%} {r['train_peak_memory_mb']:7.0f} "
              f"{r['train_compile_s'] + r['infer_compile_s']:10.1f}" + (f"  (= {twin})" if name in same_as else ""))
    for name, r in frozen.items():
        print(f"{name:22} {runs['fast']['amp']:>8} {'':>10} {'':>6} {r['infer_qps']:10.1f} {r['infer_speedup']:6.2f} "
              f"{'':>7} {'':>7} {r['infer_compile_s']:10.1f}")
    print(f"machine kind {payload['machine_kind']}: fast = {payload['fast_is']}; 1-min load {load}")
    print(f"batch-1 latency: reference {ref['batch1_latency_ms']:.1f} ms, fast {fast['batch1_latency_ms']:.1f} ms; "
          f"epoch of {args.epoch_questions} questions: reference {ref['epoch_s']:.0f} s, fast {fast['epoch_s']:.0f} s")
    path = save(args, payload, device)
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
