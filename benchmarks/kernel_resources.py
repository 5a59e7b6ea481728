"""Registers, shared memory, spills and occupancy bound of every Triton kernel, compiled for sm_80 and sm_90.

    python benchmarks/kernel_resources.py                  # FiLM's shape: every dtype, layout, mode, config
    python benchmarks/kernel_resources.py --all-shapes     # + every shape of kernels/aot.py's cases (slow cold)

No GPU needed: fastfilm.kernels.aot compiles each variant ahead of time (the same code
tests/test_aot_compile.py runs) and cuobjdump reads the cubin. Prints a summary per kernel and
arch, then the per-config table of the model's default launch on a GPU (bf16 autocast,
channels_last, training), and writes every variant to benchmarks/results/kernel_resources.json
and the two tables to kernel_resources.md.

Occupancy bound: the blocks per SM that registers, shared memory (+1 KB reserved per block)
and the 64-warp / 32-block limits allow, as a fraction of the SM's 64 warps; a bound, not a
measurement (a grid with fewer blocks than SMs x that number never reaches it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, machine  # noqa: E402

from fastfilm.atomic import atomic_write, write_json  # noqa: E402
from fastfilm.kernels import aot  # noqa: E402

# The launch a GPU training step makes by default (bf16 autocast, channels_last activations).
DEFAULT_CASE = "64x128x14x14 bfloat16 channels_last train"


def summary(rows: list[dict]) -> list[dict]:
    """Per (kernel, arch): variants, register and occupancy ranges, worst shared memory, spills."""
    out = {}
    for r in rows:
        s = out.setdefault((r["kernel"], r["arch"]), {"kernel": r["kernel"], "arch": r["arch"], "variants": 0,
                                                     "registers": [999, 0], "smem_bytes": 0, "spilling": 0,
                                                     "errors": 0, "occupancy": [1.0, 0.0], "limiters": set()})
        s["variants"] += 1
        s["errors"] += bool(r["error"])
        s["spilling"] += bool(r["spills"])
        if not r["error"]:
            s["registers"] = [min(s["registers"][0], r["registers"]), max(s["registers"][1], r["registers"])]
            s["smem_bytes"] = max(s["smem_bytes"], r["smem_static"] + r["smem_dynamic"])
            s["occupancy"] = [min(s["occupancy"][0], r["occupancy"]), max(s["occupancy"][1], r["occupancy"])]
            s["limiters"].add(r["limiter"])
    return [{**s, "limiters": sorted(s["limiters"])} for s in out.values()]


def markdown(rows: list[dict], summ: list[dict]) -> str:
    lines = ["| kernel | arch | variants | registers | shared memory (B) | spilling | occupancy bound | limited by |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summ:
        errors = f" ({s['errors']} failed to compile)" if s["errors"] else ""
        lines.append(f"| `{s['kernel']}` | {s['arch']} | {s['variants']} | {s['registers'][0]}-{s['registers'][1]} | "
                     f"{s['smem_bytes']} | {s['spilling']}{errors} | {s['occupancy'][0]:.0%}-{s['occupancy'][1]:.0%} | "
                     f"{', '.join(s['limiters'])} |")
    lines += ["", f"Per config, the default GPU launch ({DEFAULT_CASE}; NCHW, other dtypes and eval in the JSON):", "",
              "| kernel | config | arch | registers | shared memory (B) | spills (B) | blocks/SM | occupancy bound |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if DEFAULT_CASE in r["cases"]:
            lines.append(f"| `{r['kernel']}` | {_config(r['config'])} | {r['arch']} | {r['registers']} | "
                         f"{r['smem_static'] + r['smem_dynamic']} | {r['stack'] + r['local']} | {r['blocks_per_sm']} | "
                         f"{r['occupancy']:.0%} |")
    return "\n".join(lines)


def _config(config: str) -> str:
    """The config without the pointer dtypes and the stride specialisations (the case says them)."""
    return " ".join(w for w in config.split() if not w.startswith("ptrs=") and "_s" not in w.split("=")[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all-shapes", action="store_true", help="every shape of kernels/aot.py's cases, not only FiLM's")
    ap.add_argument("--out", type=Path, default=RESULTS / "kernel_resources.json", help="JSON path (.md beside it)")
    ap.add_argument("--workers", type=int, default=0, help="compile processes (0: one per CPU)")
    args = ap.parse_args(argv)
    reason = aot.unavailable()
    if reason:
        print(f"error: cannot compile ahead of time here: {reason}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    specs, missing = aot.all_specs(full=args.all_shapes)
    results = aot.compile_all(specs, args.workers or None)
    rows = aot.rows(specs, results)
    summ = summary(rows)
    text = markdown(rows, summ)
    print(text)
    bad = [r for r in rows if r["error"] or r["spills"]]
    for r in bad:
        print(f"FAILED {r['arch']} {r['kernel']} [{r['config']}]: {r['error'] or 'spills'}", file=sys.stderr)
    import triton

    for r in rows:  # the JSON keeps a count and two examples of the cases each variant serves
        r["cases"], r["case_examples"] = len(r["cases"]), r["cases"][:2]
    write_json(args.out, {"machine": machine(), "triton": triton.__version__,
                          "archs": {k: vars(v) for k, v in aot.ARCHS.items()},
                          "shapes": "all" if args.all_shapes else "FiLM's 64x128x14x14",
                          "compile_s": round(time.perf_counter() - t0, 1), "unlaunched": missing,
                          "summary": summ, "variants": rows}, indent=None)
    md = args.out.with_suffix(".md")
    atomic_write(md, lambda tmp: Path(tmp).write_text(
        f"# Kernel resources ({'all shapes' if args.all_shapes else 'FiLM shape 64x128x14x14'}, Triton "
        f"{triton.__version__}; `python benchmarks/kernel_resources.py`)\n\n{text}\n"))
    print(f"{len(rows)} variants compiled in {time.perf_counter() - t0:.0f} s; wrote {args.out} and {md}")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
