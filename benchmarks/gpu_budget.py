"""A paper-scale time budget on paper: FLOPs and bytes of one training step, per op, against a GPU's peaks.

    python benchmarks/gpu_budget.py                     # markdown table (docs/gpu_budget.md quotes it)
    python benchmarks/gpu_budget.py --json benchmarks/results/gpu_budget.json

The step is the fast path's (fastfilm/model/fast.py) at the paper preset: batch 64, 224 px,
46-token questions, bf16 autocast. Each row is one kernel (or `count` identical ones, e.g. one
per token) with the FLOPs it must do and the bytes it must move at least:
- matmuls and convolutions read each operand once and write their output once (ideal tiling);
  2 FLOPs per multiply-add; backward = dgrad (none for the first conv: pixels need no
  gradient) + wgrad;
- activations are bf16 (2 bytes); weights are fp32 masters that autocast copies to bf16 once a
  step, and whose bf16 gradients it casts back (the "autocast casts" row: 4 + 2 + 2 + 4 bytes
  a parameter); Adam (fused, fp32) reads parameter, gradient, m and v and writes three of them
  (28 bytes a parameter);
- a training batch norm (+ ReLU) is 3 passes forward (statistics, then read and write) and 5
  backward; the fused BN + FiLM + ReLU + residual op 4 and 5 (docs/bn_film_relu_residual.md);
- the GRU runs as the fast path runs it: per token one [B, H] x [H, 3H] matmul and its
  pointwise gates, per token one [B, 3H] x [3H, H] matmul backward, the weight gradient in
  one matmul over all tokens; the input gates are the vocabulary table's projection gathered
  per token. W_hh (4096 x 12288 bf16, 100.7 MB) is larger than an H100's 50 MB L2, so each
  token's matmul reads it from HBM.

A row's time is max(FLOPs / matmul peak, bytes / bandwidth): the roofline of that one kernel,
with no launch overhead and nothing overlapped. Their sum is a lower bound for a step run op
by op; fusion can only lower the bytes, never the FLOPs.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

A = 2        # bytes per activation / bf16 weight element
F32 = 4      # bytes per fp32 element
VOCAB, ANSWERS = 93, 28

# Peak dense bf16 tensor-core rate and HBM bandwidth (NVIDIA datasheets, SXM parts).
GPUS = {
    "H100": {"tflops": 989.4, "tb_per_s": 3.35},
    "H200": {"tflops": 989.4, "tb_per_s": 4.8},
}


@dataclasses.dataclass(frozen=True)
class Op:
    """`count` identical kernels of one training step, FLOPs and bytes summed over them."""
    group: str
    name: str
    flops: float
    bytes: float
    count: int = 1

    def seconds(self, gpu: dict) -> tuple[float, float]:
        """(compute-bound seconds, memory-bound seconds) on `gpu`."""
        return self.flops / (gpu["tflops"] * 1e12), self.bytes / (gpu["tb_per_s"] * 1e12)

    def bound(self, gpu: dict) -> float:
        return max(self.seconds(gpu))


def matmul(group: str, name: str, m: int, n: int, k: int, count: int = 1, out_bytes: int = A) -> Op:
    """[m, k] x [k, n] -> [m, n], `count` times."""
    return Op(group, name, count * 2.0 * m * n * k, count * float((m * k + k * n) * A + m * n * out_bytes), count)


def conv_ops(group: str, name: str, batch: int, c_in: int, c_out: int, size_in: int, kernel: int, stride: int,
             dgrad: bool = True) -> list[Op]:
    """A convolution (padding keeping size_in / stride), forward, dgrad and wgrad, as implicit
    GEMMs: M = batch * out pixels, N = c_out, K = c_in * kernel^2."""
    size_out = size_in // stride
    x, y = batch * c_in * size_in ** 2, batch * c_out * size_out ** 2
    w = c_out * c_in * kernel ** 2
    flops = 2.0 * batch * size_out ** 2 * c_out * c_in * kernel ** 2
    ops = [Op(group, f"{name} fwd", flops, float((x + w + y) * A))]
    if dgrad:
        ops.append(Op(group, f"{name} dgrad", flops, float((y + w + x) * A)))
    ops.append(Op(group, f"{name} wgrad", flops, float((y + x + w) * A)))
    return ops


def pointwise(group: str, name: str, elems: int, passes: int, count: int = 1) -> Op:
    """`passes` full reads or writes of `elems` bf16 elements (FLOPs negligible)."""
    return Op(group, name, 0.0, float(count * passes * elems * A), count)


def parameters(cfg) -> int:
    """Parameters of the model for `cfg` (FiLMNet's and FastFiLMNet's: the same)."""
    c, h, e = cfg.channels, cfg.rnn_dim, cfg.embed_dim
    gru = 3 * h * (e + h) + 2 * 3 * h
    stem = sum((3 if i == 0 else c) * c * 16 + 2 * c for i in range(cfg.stem_layers))  # conv (no bias) + BN
    blocks = cfg.num_blocks * ((c + 2) * c + c + c * c * 9)                           # conv1 (+bias), conv2
    film = h * cfg.num_blocks * 2 * c + cfg.num_blocks * 2 * c
    classifier = ((c + 2) * cfg.classifier_proj + cfg.classifier_proj + 2 * cfg.classifier_proj
                  + cfg.classifier_proj * cfg.classifier_fc + cfg.classifier_fc + 2 * cfg.classifier_fc
                  + cfg.classifier_fc * ANSWERS + ANSWERS)
    return VOCAB * e + gru + stem + blocks + film + classifier


def training_step(cfg, batch: int = 64, length: int = 46, group: int = 1) -> list[Op]:
    """Every kernel of one training step of the paper's FiLM model (pixels input, FiLM after BN);
    group: questions per image (--group-questions), the stem running once per image."""
    if cfg.input != "pixels" or cfg.arch != "film":
        raise ValueError("the budget models the FiLM network on raw pixels")
    b, L, c, h = batch, length, cfg.channels, cfg.rnn_dim
    images = -(-batch // group)
    g = 3 * h
    ops = [
        # Question encoder: input gates = the projected vocabulary table, gathered per token.
        matmul("question", "input projection of the vocabulary (fwd, dgrad, wgrad)", VOCAB, g, cfg.embed_dim, count=3),
        pointwise("question", "input gates gather [L, B, 3H] (fwd write, bwd read)", L * b * g, 2),
        matmul("question", "GRU h W_hh^T, per token", b, g, h, count=L),
        pointwise("question", "GRU gates, per token (read gi, gh; write gates, h)", b * g, 3, count=L),
        pointwise("question", "GRU backward coefficients, all tokens (read gates, gh, h; write)", L * b * g, 4),
        matmul("question", "GRU dh W_hh, per token (bwd)", b, h, g, count=L),
        pointwise("question", "GRU dgh = coef * dh, per token (bwd)", b * g, 2, count=L),
        matmul("question", "GRU dW_hh, all tokens (bwd)", g, h, L * b),
        matmul("film", "FiLM generator fwd", b, cfg.num_blocks * 2 * c, h),
        matmul("film", "FiLM generator dgrad", b, h, cfg.num_blocks * 2 * c),
        matmul("film", "FiLM generator wgrad", cfg.num_blocks * 2 * c, h, b),
    ]
    # Stem: stride-2 4x4 convs, each followed by batch norm and ReLU.
    size = cfg.image_size
    ops.append(Op("stem", "pixels uint8 -> normalised bf16", 0.0, float(images * 3 * size ** 2 * (1 + A))))
    c_in = 3
    for i in range(cfg.stem_layers):
        ops += conv_ops("stem", f"conv{i + 1} {c_in}->{c} {size}->{size // 2}", images, c_in, c, size, 4, 2,
                        dgrad=i > 0)
        size //= 2
        e = images * c * size ** 2
        ops += [pointwise("stem", f"BN+ReLU{i + 1} fwd", e, 3), pointwise("stem", f"BN+ReLU{i + 1} bwd", e, 5)]
        c_in = c
    if group > 1:  # each question's copy of its image's features, and the gradients summed back
        ops.append(pointwise("stem", "stem output per question (gather fwd, index-add bwd)", b * c * size ** 2, 4))
    # ResBlocks at size x size: conv1 1x1 (coordinates as a bias), ReLU, conv2 3x3, fused tail.
    e = b * c * size ** 2
    n = cfg.num_blocks
    for op in conv_ops("resblocks", "conv1 1x1", b, c, c, size, 1, 1) + conv_ops("resblocks", "conv2 3x3", b, c, c,
                                                                                    size, 3, 1):
        ops.append(dataclasses.replace(op, flops=op.flops * n, bytes=op.bytes * n, count=n))
    ops += [pointwise("resblocks", "coords bias + ReLU fwd", e, 2, n),
            pointwise("resblocks", "ReLU bwd + residual gradient add", e, 4, n),
            pointwise("resblocks", "fused BN+FiLM+ReLU+residual fwd", e, 4, n),
            pointwise("resblocks", "fused BN+FiLM+ReLU+residual bwd", e, 5, n)]
    # Classifier: 1x1 conv to classifier_proj, BN, ReLU, global max-pool, MLP.
    p, fc = cfg.classifier_proj, cfg.classifier_fc
    ops += conv_ops("classifier", f"conv 1x1 {c}->{p}", b, c, p, size, 1, 1)
    ep = b * p * size ** 2
    ops += [pointwise("classifier", "BN+ReLU fwd", ep, 3), pointwise("classifier", "BN+ReLU bwd", ep, 5),
            pointwise("classifier", "max-pool fwd (read) + bwd (scatter write)", ep, 2),
            matmul("classifier", "fc1 fwd+dgrad+wgrad", b, fc, p, count=3),
            matmul("classifier", "fc2 fwd+dgrad+wgrad", b, ANSWERS, fc, count=3)]
    params = parameters(cfg)
    ops += [Op("optimizer", "autocast casts (weights to bf16, grads to fp32)", 0.0, float(params * 12)),
            Op("optimizer", "Adam (fused, fp32)", 0.0, float(params * 28))]
    return ops


def budget(cfg, batch: int = 64, length: int = 46, epoch_questions: int = 700_000, group: int = 1) -> dict:
    """Per-op rows and totals on every GPU of GPUS."""
    ops = training_step(cfg, batch, length, group)
    steps = math.ceil(epoch_questions / batch)
    rows = [{"group": op.group, "op": op.name, "count": op.count, "gflop": op.flops / 1e9, "mb": op.bytes / 1e6,
             **{f"{name}_us": op.bound(gpu) * 1e6 for name, gpu in GPUS.items()},
             **{f"{name}_bound_by": "FLOPs" if op.seconds(gpu)[0] >= op.seconds(gpu)[1] else "bytes"
                for name, gpu in GPUS.items()}} for op in ops]
    totals = {}
    for name, gpu in GPUS.items():
        step = sum(op.bound(gpu) for op in ops)
        groups = {}
        for op in ops:
            groups[op.group] = groups.get(op.group, 0.0) + op.bound(gpu)
        totals[name] = {"step_ms": step * 1e3, "epoch_s": step * steps,
                        "compute_only_ms": sum(op.flops for op in ops) / (gpu["tflops"] * 1e12) * 1e3,
                        "bytes_only_ms": sum(op.bytes for op in ops) / (gpu["tb_per_s"] * 1e12) * 1e3,
                        "group_ms": {k: v * 1e3 for k, v in groups.items()}}
    return {"batch": batch, "length": length, "group": group, "epoch_questions": epoch_questions,
            "steps_per_epoch": steps,
            "parameters": parameters(cfg), "gflop_per_step": sum(op.flops for op in ops) / 1e9,
            "gb_per_step": sum(op.bytes for op in ops) / 1e9, "gpus": GPUS, "rows": rows, "totals": totals}


def markdown(result: dict) -> str:
    names = list(GPUS)
    head = (["group", "op", "kernels", "GFLOP", "MB"] + [f"{n} us" for n in names] + ["bound by"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        lines.append("| " + " | ".join([r["group"], r["op"], str(r["count"]), f"{r['gflop']:.1f}", f"{r['mb']:.1f}",
                                        *(f"{r[f'{n}_us']:.1f}" for n in names), r[f"{names[0]}_bound_by"]]) + " |")
    lines += ["", "| per step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    groups = list(result["totals"][names[0]]["group_ms"])
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(f"{result['totals'][n]['group_ms'][g]:.2f} ms" for n in names) + " |")
    for key, label in (("step_ms", "**step, op by op**"), ("compute_only_ms", "FLOPs alone at peak"),
                       ("bytes_only_ms", "bytes alone at peak bandwidth")):
        lines.append(f"| {label} | " + " | ".join(f"{result['totals'][n][key]:.2f} ms" for n in names) + " |")
    lines.append(f"| **epoch of {result['epoch_questions']:,} questions ({result['steps_per_epoch']:,} steps)** | "
                 + " | ".join(f"{result['totals'][n]['epoch_s']:.1f} s" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper", help="model preset (fastfilm.config.PRESETS)")
    ap.add_argument("--batch-size", type=int, default=64, help="questions per step (paper: 64)")
    ap.add_argument("--length", type=int, default=46, help="question tokens (CLEVR's longest: 46)")
    ap.add_argument("--epoch-questions", type=int, default=700_000, help="questions per epoch (CLEVR train: 700k)")
    ap.add_argument("--group", type=int, default=1, help="questions per image sharing one stem pass (1: the paper)")
    ap.add_argument("--summary", action="store_true", help="print only the per-step totals")
    ap.add_argument("--json", default="", help="also write the rows and totals here")
    args = ap.parse_args(argv)
    from fastfilm.atomic import write_json
    from fastfilm.config import model_config

    result = budget(model_config(args.preset), args.batch_size, args.length, args.epoch_questions, args.group)
    text = markdown(result)
    print(text[text.index("| per step"):] if args.summary else text)
    if args.json:
        write_json(Path(args.json), {"preset": args.preset, **result})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
