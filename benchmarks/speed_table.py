"""The README's end-to-end speed table, one row group per machine kind, from whichever
benchmarks/results/train_*.json files exist (written by bench_train.py):

    python benchmarks/speed_table.py [--results DIR]

Each group's heading says the machine (CPU model, ISA, threads), the matmul peaks measured in
the same run and the commit; rows are bench_train's candidates with training and inference
questions/s, the speed-up over the reference measured in the same run, and training MFU.
Files written before bench_train recorded the machine kind get it from their CPU flags when
recorded, else are labelled by processor only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def kind_of(record: dict) -> str:
    """The machine kind a results file was measured on (hardware.machine_kind's names)."""
    machine = record.get("machine", {})
    kind = record.get("machine_kind") or machine.get("machine_kind")
    if kind:
        return kind
    flags = machine.get("cpu_flags")
    if not str(record.get("device", "cpu")).startswith("cpu"):
        return str(record.get("device"))
    if not flags:
        return "cpu (kind not recorded)"
    for isa, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flags.get(flag):
            return f"cpu-{isa}"
    return "cpu-other"


def heading(record: dict, source: Path) -> str:
    m = record.get("machine", {})
    peaks = record.get("matmul_peak_tflops", {})
    peak = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in peaks.items())
    isa = record.get("isa") or m.get("isa") or "ISA not recorded"
    return (f"**{kind_of(record)}**: {m.get('processor', '?')}, {isa}, {record.get('threads', m.get('threads', '?'))} "
            f"thread(s), torch {m.get('torch', '?')}; matmul peak GFLOP/s {peak or 'not recorded'}; "
            f"{record.get('preset', '?')} preset, batch {record.get('batch_size', '?')}; commit "
            f"{m.get('commit', '?')}{' (dirty tree)' if m.get('dirty') else ''} (`{source.as_posix()}`)")


def rows(record: dict) -> list[str]:
    """Markdown rows: candidate | amp | train q/s | x ref | infer q/s | x ref | train MFU."""
    cands = record["candidates"]
    ref = cands["reference"]
    out = []
    for name, c in cands.items():
        group = c.get("questions_per_image", 1) > 1
        infer = "" if group else f"{c['infer_qps']:.0f}"
        infer_x = "" if group else f"{c['infer_qps'] / ref['infer_qps']:.2f}x"
        same = f" (= {c['same_as']})" if "same_as" in c else ""
        out.append(f"| {name}{same} | {c['amp']} | {c['train_qps']:.0f} | {c['train_qps'] / ref['train_qps']:.2f}x | "
                   f"{infer} | {infer_x} | {c['train_mfu']:.0%} |")
    return out


HEADER = ["| candidate | amp | train q/s | x ref | inference q/s | x ref | train MFU |",
          "|---|---|---|---|---|---|---|"]


def table(directory: Path) -> str:
    """Markdown: per machine kind (sorted), per results file, a heading line and its rows."""
    files = sorted(directory.glob("train_*.json"))
    if not files:
        raise SystemExit(f"{directory}: no train_*.json results (python benchmarks/bench_train.py --json ...)")
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for f in files:
        record = json.loads(f.read_text())
        groups.setdefault(kind_of(record), []).append((f, record))
    blocks = []
    for kind in sorted(groups):
        for f, record in groups[kind]:
            shown = f.resolve().relative_to(REPO) if REPO in f.resolve().parents else f
            blocks.append("\n".join([heading(record, shown), "", *HEADER, *rows(record)]))
    return "\n\n".join(blocks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="directory of train_*.json (default: %(default)s)")
    print(table(p.parse_args(argv).results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
