"""Where the time of one training step and one inference step goes, reference vs fast path.

    python benchmarks/profile_step.py --preset cpu --device cpu --batch-size 64 --threads 1 \\
        --md docs/profile_cpu_amx.md --json benchmarks/results/profile_cpu-amx.json

Each candidate (the fp32 eager reference, and the fast path as the machine's defaults resolve
it, plus any `--fast KEY=VALUE,...` variants) is warmed up (compiled), then, candidates taking
turns for `--rounds` rounds (the median round is reported), `--steps` training steps and
`--steps` inference calls on the same synthetic batch 64 as bench_train are run under
torch.profiler (CPU activities; inductor's generated kernels are recorded too). Every recorded
op's *self* time is put in one group (GROUPS below); an op nested inside a GRU op, the fused op,
or the optimizer step counts for that op's group, whatever it is. Inference runs as `fastfilm
eval` does (compiled candidates frozen: Predictor(frozen=True)). "Python/dispatcher
overhead" is the wall time of the profiled steps minus the self time of every recorded op: the
interpreter, the dispatcher, autograd bookkeeping, and the profiler's own cost (which inflates
it: read that row as an upper bound).
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
from bench_train import ANSWERS, VOCAB, synthetic_batches  # noqa: E402
from harness import machine  # noqa: E402

from fastfilm.atomic import atomic_write, write_json  # noqa: E402

# (group, name fragments), first match wins. Ops are matched on their lower-cased names.
# "claims" groups take every op nested inside them (a matmul inside the GRU op is GRU time).
CLAIMS = (
    ("GRU op", ("fastfilm::gru_last_state", "aten::gru", "aten::mkldnn_rnn", "rnn")),
    ("fused BN+FiLM+ReLU+residual op", ("fastfilm::bn_film_relu_residual",)),
    ("optimizer (Adam step, zero_grad)", ("optimizer.step", "optimizer.zero_grad", "_fused_adam", "adam")),
)
GROUPS = (
    # First: inductor's kernels are named after every op fused into them ("..._to_copy_relu_4").
    ("inductor fused kernels (pointwise, BN statistics, casts, loss)", ("cpp_fused", "kernel_cpp")),
    ("convolutions (fwd+bwd)", ("conv", "mkldnn::_convolution")),
    ("batch norm (fwd+bwd)", ("batch_norm", "var_mean")),
    ("matmul / linear", ("addmm", "aten::mm", "aten::bmm", "linear", "matmul")),
    ("casts / layout reorders / copies", ("aten::to", "_to_copy", "copy_", "contiguous", "clone", "reorder",
                                          "to_dense", "to_mkldnn", "aten::_reshape_copy")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
)
OTHER = "other aten ops (pointwise, indexing, allocation)"
OVERHEAD = "Python / dispatcher / autograd overhead (wall - op self time)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help="model preset (fastfilm.config.PRESETS)")
    p.add_argument("--device", default="cpu", help="cpu (CUDA kernels are not grouped here)")
    p.add_argument("--batch-size", type=int, default=64, help="questions per step")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per candidate, mode and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of taking turns; the median round is reported")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--fast", action="append", default=[], metavar="KEY=VALUE,...",
                   help="another fast-path candidate: FastConfig fields, e.g. fused=true,amp=off (repeatable)")
    p.add_argument("--md", default="", help="write the markdown table here (e.g. docs/profile_cpu_amx.md)")
    p.add_argument("--json", default="", help="write the JSON results here")
    return p.parse_args(argv)


def _parse_fast(spec: str):
    from fastfilm.config import FastConfig

    values = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        values[key] = {"true": True, "false": False}.get(value.lower(), value)
    return FastConfig(**values)


def _group(event, parents: dict) -> str:
    """The group of one recorded op: the nearest enclosing claiming op's, else its own name's."""
    node = event
    while node is not None:
        name = node.name.lower()
        for group, keys in CLAIMS:
            if any(k in name for k in keys):
                return group
        node = parents.get(id(node))
    name = event.name.lower()
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return OTHER


def _is_scope(event) -> bool:
    """A user/torch scope (record_function: 'ProfilerStep', 'Torch-Compiled Region', ...), not an op:
    its self time is Python running inside it, counted as overhead."""
    name = event.name
    # Inductor's kernels are recorded as e.g. "graph_0_cpp_fused_add_relu_3".
    return "::" not in name and "cpp_fused" not in name and "kernel_cpp" not in name and "Optimizer" not in name


def profile(fn, steps: int) -> dict:
    """Self time per group of `steps` calls of fn, in ms per call, and the wall time per call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t0) / steps
    events = list(prof.events())
    parents = {id(e): e.cpu_parent for e in events}
    groups: dict[str, float] = {}
    ops = 0.0
    for e in events:
        if _is_scope(e) and _group(e, parents) not in {g for g, _ in CLAIMS}:
            continue
        ms = e.self_cpu_time_total / 1e3 / steps
        g = _group(e, parents)
        groups[g] = groups.get(g, 0.0) + ms
        ops += ms
    groups[OVERHEAD] = max(0.0, wall * 1e3 - ops)
    top = sorted(((e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()), key=lambda kv: -kv[1])
    return {"wall_ms": wall * 1e3, "groups_ms": groups, "top_ops_ms": dict(top[:12])}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastfilm_profile_inductor_"))
    import torch._inductor.config as inductor_config

    from fastfilm.config import FastConfig, model_config
    from fastfilm.engine.build import build_optimizer
    from fastfilm.engine.options import resolve
    from fastfilm.engine.predictor import Predictor
    from fastfilm.engine.step import TrainStep
    from fastfilm.hardware import cpu_isa, machine_kind, resolve_device
    from fastfilm.model import build_model

    inductor_config.cpp.enable_kernel_profile = True  # generated kernels appear in the profile
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = model_config(args.preset)
    batch = synthetic_batches(1, args.batch_size, cfg.image_size, device)[0]
    candidates = {"reference": FastConfig(reference=True, amp="off", compile=False, fused=False,
                                          channels_last=False),
                  "fast": FastConfig()}
    candidates.update({f"fast {spec}": _parse_fast(spec) for spec in args.fast})
    torch.manual_seed(0)
    init = build_model(cfg, VOCAB, ANSWERS).to(device).state_dict()
    calls, results = {}, {}
    for name, fast_cfg in candidates.items():
        ex = resolve(fast_cfg, device)
        model = build_model(cfg, VOCAB, ANSWERS, fast=not ex.reference, fused=ex.fused,
                            channels_last=ex.channels_last).to(device)
        model.load_state_dict(init)
        step = TrainStep(model, build_optimizer(model, 3e-4, 1e-5, ex), ex)
        predictor = Predictor(model, ex, frozen=ex.compile)  # as `fastfilm eval` runs it
        calls[name] = {"train": lambda step=step: step(*batch), "infer": lambda p=predictor: p(*batch[:3])}
        for _ in range(3):  # compile and warm up
            calls[name]["train"]()
            calls[name]["infer"]()
        results[name] = {"execution": {k: str(v) for k, v in dataclasses.asdict(ex).items()}, "load_1min": [],
                         "rounds": {"train": [], "infer": []}}
    # Candidates take turns (A, B, A, B, ...), so that a shared machine's load hits them alike;
    # the round with the median wall time of each candidate and mode is reported.
    for _ in range(args.rounds):
        for name, r in results.items():
            r["load_1min"].append(os.getloadavg()[0])
            for mode in ("train", "infer"):
                r["rounds"][mode].append(profile(calls[name][mode], args.steps))
    for name, r in results.items():
        for mode in ("train", "infer"):
            r[mode] = sorted(r["rounds"][mode], key=lambda p: p["wall_ms"])[len(r["rounds"][mode]) // 2]
        print(f"{name}: train {r['train']['wall_ms']:.1f} ms, infer {r['infer']['wall_ms']:.1f} ms "
              f"(load {r['load_1min']})", file=sys.stderr)

    command = "python benchmarks/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": command, "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
               "rounds": args.rounds,
               "isa": cpu_isa(), "machine_kind": machine_kind(device), "threads": torch.get_num_threads(),
               "candidates": results}
    mach = machine()
    if args.json:
        write_json(Path(args.json), {"machine": mach, **payload})
    text = markdown(payload, mach)
    print(text)
    if args.md:
        atomic_write(Path(args.md), lambda tmp: Path(tmp).write_text(text))
    return 0


def markdown(payload: dict, mach: dict) -> str:
    """The profile as a markdown page: command and ISA first, then one table per mode."""
    names = list(payload["candidates"])
    lines = [f"# Where a step's time goes: {payload['machine_kind']}", "",
             f"ISA: **{payload['isa']}** ({mach['processor']}, {payload['threads']} threads, torch {mach['torch']}, "
             f"commit {mach['commit']}{' + uncommitted changes' if mach['dirty'] else ''}).", "",
             "Regenerate:", "", f"    {payload['command']}", "",
             f"{payload['preset']} preset, batch {payload['batch_size']}, mean of {payload['steps']} profiled calls "
             f"after warm-up, candidates taking turns for {payload['rounds']} rounds, the median round shown; "
             "self time per op group in ms per call (share of the wall time). Ops nested inside the "
             "GRU op, the fused op or the optimizer count for those; compiled inference is frozen, as `fastfilm "
             "eval` runs it. The overhead row is wall time minus op time and includes the profiler's own cost.", ""]
    for mode, title in (("train", "Training step (forward, loss, backward, Adam)"), ("infer", "Inference step")):
        lines += [f"## {title}", "", "| group | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        groups = sorted({g for n in names for g in payload["candidates"][n][mode]["groups_ms"]},
                        key=lambda g: -payload["candidates"][names[0]][mode]["groups_ms"].get(g, 0.0))
        for g in groups:
            cells = []
            for n in names:
                r = payload["candidates"][n][mode]
                ms = r["groups_ms"].get(g, 0.0)
                cells.append(f"{ms:.2f} ({ms / r['wall_ms']:.0%})" if ms else "-")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        lines.append("| **wall** | " + " | ".join(f"**{payload['candidates'][n][mode]['wall_ms']:.2f}**"
                                                   for n in names) + " |")
        lines.append("")
    lines += ["Execution of each candidate: " + "; ".join(
        f"{n}: " + ", ".join(f"{k}={v}" for k, v in payload["candidates"][n]["execution"].items() if k != "device")
        for n in names) + ".", "",
        "Machine load (1-min average) at each round: " + ", ".join(
        f"{n} {'/'.join(f'{x:.1f}' for x in payload['candidates'][n]['load_1min'])}" for n in names) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
