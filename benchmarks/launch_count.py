"""Kernel launches per training step and per inference batch: reference, fast (eager and
compiled) and fast + CUDA graphs, counted with torch.profiler.

    python benchmarks/launch_count.py                                   # results/launch_count_cpu.json
    python benchmarks/launch_count.py --device cuda --full-size          # results/launch_count_cuda.json

At the paper's batch of 64 a GPU step is bound by launches rather than bandwidth (issue 13):
this counts them, so that what CUDA graphs remove is a number, not a guess.

What is counted, per call (one training step: zero_grad, forward, loss, backward, Adam; one
inference batch: the Predictor's forward), after warm-up calls (compilation, and the CUDA
graphs' warm-up and recording):
- CUDA: `launches`, the host's calls that put work on the GPU (cudaLaunchKernel, cuLaunchKernel*,
  cudaMemcpyAsync, cudaMemsetAsync, cudaGraphLaunch: a replayed graph is one), by API;
  `gpu_kernels`, the kernels the GPU ran (a graph's kernels still run, unlaunched one by one);
  `host_syncs`, the calls that make the host wait for the GPU (cudaStreamSynchronize,
  cudaDeviceSynchronize, cudaEventSynchronize, blocking cudaMemcpy).
- CPU: `kernels`, the calls that do work: each call of an ATen or extension op (`ns::name`)
  that does not hand its work to another such op, leaving out views, allocations and host
  reads (VIEWS below), plus every C++ kernel inductor generated (recorded by its
  `cpp.enable_kernel_profile`). A compiled graph fuses pointwise ops into such kernels.
- Both: `host_reads`, tensor values read on the host (.item(), bool(): a sync when the tensor
  is on the GPU; on the CPU, torch's fused Adam reads each parameter's step count this way),
  with the op that read them; and `gru`, the part of `kernels`/`launches` issued inside the
  GRU op (fastfilm::gru_last_state and its backward).

The model: the preset's structure (layers, blocks, question length) at its own widths with
--full-size, else at small widths (16 channels, 32 GRU units, 64 px): the same ops in the same
number, cheap enough for a shared CPU. Questions are 46 tokens wide (CLEVR's longest, the
bucket most batches of 64 fall in): the GRU's count grows with that length.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ANSWERS, MAX_LENGTH, VOCAB, synthetic_batches  # noqa: E402
from harness import write_results  # noqa: E402

# Ops that do no work of their own: views and metadata, allocations, conjugate/negative bits.
VIEWS = frozenset(f"aten::{n}" for n in (
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "view_as", "_unsafe_view",
    "_reshape_alias", "reshape", "as_strided", "as_strided_", "t", "transpose", "permute", "expand", "expand_as",
    "slice", "select", "unsqueeze", "squeeze", "detach", "detach_", "alias", "lift_fresh", "resolve_conj",
    "resolve_neg", "unbind", "split", "split_with_sizes", "chunk", "narrow", "contiguous", "resize_", "set_",
    "result_type", "flatten", "unflatten", "movedim", "to", "_to_copy", "numpy_T", "is_nonzero", "item",
    "_has_compatible_shallow_copy_type", "record_stream", "size", "stride", "numel", "dim", "align_tensors"))
HOST_READS = frozenset({"aten::_local_scalar_dense"})
READ_WRAPPERS = frozenset({"aten::item", "aten::is_nonzero", "aten::_local_scalar_dense"})
GRU_OPS = ("fastfilm::gru_last_state", "fastfilm::gru_last_state_backward")
LAUNCH_APIS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
               "cudaMemsetAsync", "cudaGraphLaunch", "cudaLaunchCooperativeKernel")
SYNC_APIS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def _is_op(name: str) -> bool:
    """An operator call (ATen, an extension, a custom op) or an inductor-generated C++ kernel."""
    return ("::" in name and not name.startswith(("autograd::", "torch::autograd"))) or "cpp_fused" in name


def _does_work(name: str) -> bool:
    return _is_op(name) and name not in VIEWS and name not in HOST_READS


def _under(event, pred) -> bool:
    """Whether an enclosing event (the profiler nests events by time on their thread) satisfies pred(name)."""
    e = event.cpu_parent
    while e is not None:
        if pred(e.name):
            return True
        e = e.cpu_parent
    return False


def _in_gru(event) -> bool:
    return _under(event, lambda name: name in GRU_OPS)


def _source(event) -> str:
    """The nearest enclosing event that is not a host read's own wrapper (aten::item, ...)."""
    e = event.cpu_parent
    while e is not None and e.name in READ_WRAPPERS:
        e = e.cpu_parent
    return e.name if e is not None else "(top level)"


def classify(events, device: torch.device) -> dict:
    """Counts from torch.profiler's events of one call (see the module docstring)."""
    reads = [e for e in events if e.name in HOST_READS]
    host_reads = {"count": len(reads), "from": dict(collections.Counter(_source(e) for e in reads))}
    if device.type == "cuda":
        launches = [e for e in events if e.name in LAUNCH_APIS]
        by_api = collections.Counter(e.name for e in launches)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset"))]
        return {"launches": len(launches), "by_api": dict(by_api), "gpu_kernels": len(kernels),
                # Syncs issued by ops (an .item(), a blocking copy), not the profiler's own synchronize.
                "host_syncs": sum(e.name in SYNC_APIS and _under(e, _is_op) for e in events),
                "host_sync_sources": dict(collections.Counter(_source(e) for e in events
                                                              if e.name in SYNC_APIS and _under(e, _is_op))),
                "host_reads": host_reads, "gru": sum(_in_gru(e) for e in launches),
                "top": collections.Counter(e.name for e in kernels).most_common(8)}
    work = set()
    for e in events:
        if _does_work(e.name):
            work.add(id(e))
    # An op that hands its work to another op (aten::linear -> aten::addmm) is not counted itself.
    counted = []
    for e in events:
        if id(e) not in work:
            continue
        stack, inner = list(e.cpu_children), False
        while stack and not inner:
            child = stack.pop()
            inner = id(child) in work
            stack.extend(child.cpu_children)
        if not inner:
            counted.append(e)
    return {"kernels": len(counted), "host_reads": host_reads, "gru": sum(_in_gru(e) for e in counted),
            "top": collections.Counter(e.name for e in counted).most_common(8)}


def profile_call(fn, device: torch.device) -> dict:
    """classify() of one call of fn, run under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()  # so that every kernel of the call is in the trace
    return classify(prof.events(), device)


def small(cfg):
    """cfg's structure at small widths: the same ops in the same number."""
    return dataclasses.replace(cfg, image_size=2 ** (cfg.stem_layers + 2), channels=16, embed_dim=16, rnn_dim=32,
                               classifier_proj=32, classifier_fc=32, feature_channels=16)


def candidates() -> dict:
    from fastfilm.config import FastConfig

    fast = FastConfig()
    return {"reference": FastConfig(reference=True, amp="off", compile=False, fused=False, channels_last=False),
            "fast_eager": dataclasses.replace(fast, compile=False),
            "fast": fast,
            "fast_cuda_graphs": dataclasses.replace(fast, cuda_graphs=True)}


def count_all(model_cfg, device: torch.device, batch_size: int, warmup: int = 3) -> dict:
    """{candidate: {"train_step": counts, "inference_batch": counts}}; CUDA-graph candidates off
    CUDA are {"skipped": reason}."""
    from fastfilm.engine.build import build_optimizer
    from fastfilm.engine.options import resolve
    from fastfilm.engine.predictor import Predictor
    from fastfilm.engine.step import TrainStep
    from fastfilm.model import build_model

    # Inductor's C++ kernels show in the profile only when compiled with this on.
    torch._inductor.config.cpp.enable_kernel_profile = True
    images, questions, lengths, answers = synthetic_batches(1, batch_size, model_cfg.image_size, device)[0]
    questions = torch.nn.functional.pad(questions, (0, MAX_LENGTH - questions.shape[1]))  # every batch 46 wide
    torch.manual_seed(0)
    init = build_model(model_cfg, VOCAB, ANSWERS).state_dict()
    out = {}
    for name, fast_cfg in candidates().items():
        if fast_cfg.cuda_graphs and device.type != "cuda":
            out[name] = {"skipped": "CUDA graphs need CUDA"}
            continue
        ex = resolve(fast_cfg, device)
        model = build_model(model_cfg, VOCAB, ANSWERS, fast=not ex.reference, fused=ex.fused,
                            channels_last=ex.channels_last).to(device)
        model.load_state_dict(init)
        step = TrainStep(model, build_optimizer(model, 3e-4, 1e-5, ex), ex)
        predictor = Predictor(model, ex, batch_size=batch_size)

        def train():
            return step(images, questions, lengths, answers)

        def infer():
            return predictor(images, questions, lengths)

        for _ in range(warmup):  # compile; CUDA graphs: warm-up, record, replay
            train()
            infer()
        out[name] = {"execution": {"dtype": str(ex.dtype or torch.float32).replace("torch.", ""),
                                   "compile": ex.compile, "fused": ex.fused, "channels_last": ex.channels_last,
                                   "cuda_graphs": ex.cuda_graphs},
                     "train_step": profile_call(train, device), "inference_batch": profile_call(infer, device)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", help="model preset whose structure is counted (default: paper)")
    p.add_argument("--full-size", action="store_true", help="the preset's own widths (default: small widths)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=64, help="questions per step (paper: 64)")
    p.add_argument("--json", default="", help="output file (default: benchmarks/results/launch_count_<device>.json)")
    args = p.parse_args(argv)
    from fastfilm.config import model_config
    from fastfilm.hardware import resolve_device

    device = resolve_device(args.device)
    cfg = model_config(args.preset)
    cfg = cfg if args.full_size else small(cfg)
    counts = count_all(cfg, device, args.batch_size)
    key = "launches" if device.type == "cuda" else "kernels"
    print(f"{key} per call, {args.preset} structure{'' if args.full_size else ' at small widths'}, batch "
          f"{args.batch_size}, questions {MAX_LENGTH} tokens, on {device}")
    print(f"{'candidate':18} {'train step':>11} {'(GRU)':>7} {'inference':>10} {'(GRU)':>7} {'host reads':>11}")
    for name, c in counts.items():
        if "skipped" in c:
            print(f"{name:18} skipped: {c['skipped']}")
            continue
        t, i = c["train_step"], c["inference_batch"]
        reads = t["host_reads"]["count"] + i["host_reads"]["count"]
        print(f"{name:18} {t[key]:11d} {t['gru']:7d} {i[key]:10d} {i['gru']:7d} {reads:11d}")
    default = Path(__file__).resolve().parent / "results" / f"launch_count_{device.type}.json"
    out = Path(args.json) if args.json else default
    payload = {"preset": args.preset, "full_size": args.full_size, "model_config": dataclasses.asdict(cfg),
               "device": str(device), "batch_size": args.batch_size, "question_tokens": MAX_LENGTH,
               "counted": key, "candidates": counts}
    print(f"wrote {write_results(out.stem, payload, out.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
