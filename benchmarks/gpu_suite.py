"""One command for the GPU: every CUDA check and measurement of fastfilm, in about 8 minutes.

    python benchmarks/gpu_suite.py --out benchmarks/results/      # on one H100/H200
    python benchmarks/gpu_suite.py --dry-run                      # anywhere: the plan, imports and arguments checked
    python benchmarks/gpu_suite.py --readme benchmarks/results/gpu_suite.json   # the README's GPU section

Parts run in this order, so that a cut-off still leaves the most important results, each in
its own process under its own time cap (the whole suite under --budget):
  a. the CUDA tests (`pytest -m gpu`), Triton compiled, not interpreted;
  b. the fused op: Triton vs eager vs torch.compile of the unfused expression, fp32/bf16,
     NCHW/channels_last, 64x128x14x14 and 256x128x28x28, GB/s and fraction of a copy
     (gpu_suite_parts.py fused-op);
  c. bench_train.py at the paper preset: training and inference questions/s, MFU against the
     matmul peak measured in the same run, seconds per 700k-question epoch, peak memory; again
     with --cuda-graphs when bench_train.py has that flag;
  d. the GRU op vs nn.GRU (bench_gru_last_state.py under pytest-benchmark, when present);
  e. DALI `mixed` decode of a few generated images (gpu_suite_parts.py decode);
  f. kernel launches per training step and inference batch (launch_count.py).
A part that fails or runs out of time is recorded as such and the next one runs. Each part
writes gpu_<part>.json (and a .log) in --out; gpu_suite.json and gpu_suite.md summarise them
and are rewritten after every part. The time caps were set without a GPU to run on (no session
had one when this was written): after a first run, set them from gpu_suite.json's seconds.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from fastfilm.atomic import atomic_write, write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BUDGET_S = 480  # the 8 minutes the suite must fit on one H100/H200


@dataclasses.dataclass
class Part:
    """One step of the suite: a command with a time cap, and its dry-run check."""
    key: str
    title: str
    cap_s: int
    command: list[str]
    check: list[str]
    output: str                 # JSON file name in --out
    skip: str = ""              # why the part cannot run (it is then recorded as skipped)


def train_args(out: Path, graphs: bool) -> list[str]:
    name = "gpu_c_train_graphs.json" if graphs else "gpu_c_train.json"
    return (["--preset", "paper", "--device", "cuda", "--no-ablation", "--group", "0", "--steps", "10",
             "--epoch-questions", "700000", "--json", str(out / name)] + (["--cuda-graphs"] if graphs else []))


def _has_flag(script: Path, flag: str) -> bool:
    """Whether `script --help` lists `flag`."""
    help_text = subprocess.run([PY, str(script), "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    return flag in help_text


def plan(out: Path) -> list[Part]:
    bench_train = HERE / "bench_train.py"
    check_train = [PY, str(HERE / "gpu_suite.py"), "--check-script", str(bench_train), "--"]
    graphs = _has_flag(bench_train, "--cuda-graphs")
    gru = HERE / "bench_gru_last_state.py"
    # The packed op reads lengths on the host: a CPU path, not what the GPU runs.
    gru_args = ["-p", "no:cacheprovider", "--benchmark-only", f"--benchmark-json={out / 'gpu_d_gru.json'}", "-q",
                "-k", "not op_packed"]
    return [
        # The slow CUDA tests (three inductor compiles for CUDA graphs) would not fit this cap.
        Part("a_tests", "CUDA tests (pytest -m 'gpu and not slow', Triton compiled)", 70,
             [PY, "-m", "pytest", "-m", "gpu and not slow", "-q", "-p", "no:cacheprovider",
              f"--junitxml={out / 'gpu_a_tests.xml'}", "tests"],
             [PY, "-m", "pytest", "-m", "gpu and not slow", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
             "gpu_a_tests.json"),
        Part("b_fused_op", "fused BN+FiLM+ReLU+residual: Triton vs eager vs torch.compile vs copy", 70,
             [PY, str(HERE / "gpu_suite_parts.py"), "fused-op", "--max-seconds", "55", "--json",
              str(out / "gpu_b_fused_op.json")],
             [PY, str(HERE / "gpu_suite_parts.py"), "fused-op", "--dry-run"], "gpu_b_fused_op.json"),
        Part("c_train", "bench_train.py, paper preset", 140, [PY, str(bench_train), *train_args(out, False)],
             [*check_train, *train_args(out, False)], "gpu_c_train.json"),
        # Compiling and recording the paper model's graphs: a longer cap than a plain run's share.
        Part("c_train_graphs", "bench_train.py, paper preset, CUDA graphs", 110,
             [PY, str(bench_train), *train_args(out, True)],
             [*check_train, *train_args(out, True)], "gpu_c_train_graphs.json",
             skip="" if graphs else "bench_train.py has no --cuda-graphs flag yet"),
        Part("d_gru", "GRU op vs nn.GRU (bench_gru_last_state.py)", 40,
             [PY, "-m", "pytest", str(gru), *gru_args], [PY, "-m", "pytest", str(gru), "--collect-only", *gru_args],
             "gpu_d_gru.json", skip="" if gru.exists() else "benchmarks/bench_gru_last_state.py is not there yet"),
        Part("e_decode", "DALI mixed decode of generated images", 20,
             [PY, str(HERE / "gpu_suite_parts.py"), "decode", "--json", str(out / "gpu_e_decode.json")],
             [PY, str(HERE / "gpu_suite_parts.py"), "decode", "--dry-run"], "gpu_e_decode.json"),
        Part("f_launches", "kernel launches per step and batch: reference, fast, fast + CUDA graphs", 30,
             [PY, str(HERE / "launch_count.py"), "--device", "cuda", "--json", str(out / "gpu_f_launches.json")],
             [PY, str(HERE / "launch_count.py"), "--help"], "gpu_f_launches.json"),
    ]


def _env() -> dict:
    """The parts' environment: compiled Triton kernels, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_command(command: list[str], cap_s: float, log: Path | None = None) -> tuple[str, float, str]:
    """(status, seconds, last lines of output) of `command` run for at most cap_s seconds,
    its output to `log` if given. On time-out its whole process group is killed (pytest and
    compile workers included)."""
    t0 = time.monotonic()
    sink = open(log, "w") if log else subprocess.PIPE
    try:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(),
                                start_new_session=True, text=True)
        try:
            output, _ = proc.communicate(timeout=cap_s)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = f"timed out after {cap_s:.0f} s"
    finally:
        if log:
            sink.close()
    output = log.read_text(errors="replace") if log else output
    return status, time.monotonic() - t0, "\n".join(output.strip().splitlines()[-15:])


def junit_to_json(xml: Path, out: Path) -> None:
    """pytest's junit XML -> {passed, failed, errors, skipped, failures: [names]}."""
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = list(suite.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
              or c.find("error") is not None]
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    write_json(out, {"total": len(cases), "failed": len(failed), "skipped": skipped,
                     "passed": len(cases) - len(failed) - skipped, "failures": failed})


# --------------------------------------------------------------------------- summary

def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def figures(key: str, data: dict) -> list[str]:
    """Markdown lines of a part's key figures (whatever of them its JSON holds)."""
    if key == "a_tests":
        lines = [f"{data.get('passed')} passed, {data.get('failed')} failed, {data.get('skipped')} skipped"]
        return lines + [f"failed: `{name}`" for name in data.get("failures", [])]
    if key == "b_fused_op":
        lines = ["| shape | dtype | layout | mode | Triton GB/s (of copy) | eager | torch.compile | copy GB/s |",
                 "|---|---|---|---|---|---|---|---|"]
        for c in data.get("cases", []):
            g, f = c["gb_per_s"], c["of_copy"]
            lines.append(f"| {'x'.join(map(str, c['shape']))} | {c['dtype']} | {c['layout']} | {c['mode']} | "
                         f"{g['triton']} ({f['triton']:.0%}) | {g['eager_unfused']} ({f['eager_unfused']:.0%}) | "
                         f"{g['compiled_unfused']} ({f['compiled_unfused']:.0%}) | {g['copy']} |")
        return lines
    if key.startswith("c_train"):
        fast = _get(data, "candidates", "fast", default={})
        rows = [("training questions/s, fast (reference)", f"{_num(data.get('fast_train_qps'))} "
                 f"({_num(data.get('reference_train_qps'))}), {_num(data.get('train_speedup'), 2)}x"),
                ("inference questions/s, fast (reference)", f"{_num(data.get('fast_infer_qps'))} "
                 f"({_num(data.get('reference_infer_qps'))})"),
                ("seconds per 700k-question epoch, fast", _num(data.get("fast_epoch_s"))),
                ("training MFU (bf16 matmul peak measured: TFLOP/s)",
                 f"{_num(100 * fast['train_mfu'], 1) if 'train_mfu' in fast else 'n/a'}% "
                 f"({_num(_get(data, 'matmul_peak_tflops', 'bf16'))})"),
                ("peak memory of a training step, MB", _num(fast.get("train_peak_memory_mb"))),
                ("compile s (train + infer)",
                 _num((fast.get("train_compile_s") or 0) + (fast.get("infer_compile_s") or 0), 1))]
        return ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    if key == "d_gru":
        lines = ["| benchmark | median ms |", "|---|---|"]
        for b in data.get("benchmarks", []):
            lines.append(f"| {b.get('name')} | {_num(1e3 * _get(b, 'stats', 'median', default=float('nan')), 3)} |")
        return lines
    if key == "e_decode":
        lines = ["| format | backend | decoded on | images/s | mean abs diff vs Pillow |", "|---|---|---|---|---|"]
        for r in data.get("results", []):
            lines.append(f"| {r['format']} | {r['backend']}/{r['device']} | {r['decoded_on']} | "
                         f"{_num(r['images_per_s'])} | {r['mean_abs_diff_vs_pillow']:.3f} |")
        return lines
    return []


def _num(v, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def section(summary: dict) -> str:
    """The README's GPU section from gpu_suite.json."""
    m = summary.get("machine", {})
    lines = [f"## GPU results ({m.get('device', '?')}, CUDA {m.get('cuda', '?')}, torch {m.get('torch', '?')}, "
             f"commit {m.get('commit', '?')}, {m.get('date', '?')})", "",
             f"`python benchmarks/gpu_suite.py --out benchmarks/results/`: {summary.get('seconds', 0):.0f} s "
             f"of a {summary.get('budget_s')} s budget.", ""]
    for p in summary.get("parts", []):
        lines.append(f"### {p['key'][0]}. {p['title']}: {p['status']}" + (f" ({p['seconds']:.0f} s)"
                                                                           if p.get("seconds") else ""))
        if p.get("reason"):
            lines.append(p["reason"])
        lines += [""] + p.get("figures", []) + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver

def check_script(script: Path, args: list[str]) -> None:
    """Imports every module `script` imports, function-local imports included (they run only
    on a GPU), and parses `args` with the script's parse_args. Raises on any failure."""
    tree = ast.parse(script.read_text(), str(script))
    sys.path.insert(0, str(script.parent))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule, or ImportError
    importlib.import_module(script.stem).parse_args(args)


def dry_run(parts: list[Part]) -> int:
    """Prints the plan and runs every part's check (concurrently: each is a process); 0 iff all pass."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(parts)) as pool:
        checks = [None if p.skip else pool.submit(run_command, p.check, 300) for p in parts]
    failed = 0
    for p, check in zip(parts, checks):
        print(f"{p.key}: {p.title} (cap {p.cap_s} s) -> {p.output}")
        print("   $ " + " ".join(p.command))
        if p.skip:
            print(f"   will be skipped: {p.skip}")
            continue
        status, seconds, tail = check.result()
        print(f"   check: {status} in {seconds:.1f} s")
        if status != "ok":
            failed += 1
            print("   " + tail.replace("\n", "\n   "))
    total = sum(p.cap_s for p in parts)
    print(f"time caps add up to {total} s (budget {BUDGET_S} s)")
    return 1 if failed or total > BUDGET_S else 0


def run(parts: list[Part], out: Path, budget_s: float) -> dict:
    sys.path.insert(0, str(HERE))
    from harness import machine

    out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine(), "budget_s": budget_s, "parts": [], "seconds": 0.0}
    t0 = time.monotonic()
    for p in parts:
        left = budget_s - (time.monotonic() - t0)
        entry = {"key": p.key, "title": p.title, "cap_s": p.cap_s, "command": " ".join(p.command),
                 "output": p.output}
        if p.skip or left < 10:
            entry.update(status="skipped", reason=p.skip or f"the suite's {budget_s:.0f} s budget is spent")
        else:
            for stale in (out / p.output, out / "gpu_a_tests.xml"):  # only this run's results count
                stale.unlink(missing_ok=True)
            status, seconds, tail = run_command(p.command, min(p.cap_s, left), out / f"gpu_{p.key}.log")
            entry.update(status=status, seconds=seconds)
            if p.key == "a_tests" and (out / "gpu_a_tests.xml").exists():
                junit_to_json(out / "gpu_a_tests.xml", out / p.output)
            if status != "ok":
                entry["log_tail"] = tail
        path = out / p.output
        if path.exists():
            try:
                entry["figures"] = figures(p.key, json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError) as e:
                entry["figures"] = [f"(could not summarise {p.output}: {type(e).__name__}: {e})"]
        summary["parts"].append(entry)
        summary["seconds"] = time.monotonic() - t0
        took = f" in {entry['seconds']:.0f} s" if "seconds" in entry else ""
        print(f"{p.key}: {entry['status']}{took}", flush=True)
        write_json(out / "gpu_suite.json", summary)
        atomic_write(out / "gpu_suite.md", lambda tmp, text=section(summary) + "\n": Path(tmp).write_text(text))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results", help="directory for the parts' JSON and the summary")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and check every part's imports and arguments")
    ap.add_argument("--readme", type=Path, default=None, metavar="GPU_SUITE_JSON",
                    help="print the README's GPU section from a gpu_suite.json and exit")
    ap.add_argument("--only", default="", help="comma-separated part keys or letters to run (e.g. a,b)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite")
    ap.add_argument("--check-script", type=Path, default=None, metavar="SCRIPT",
                    help="(dry-run helper) import every module SCRIPT imports and parse the arguments after -- "
                         "with its parse_args")
    args, rest = ap.parse_known_args(argv)
    if args.check_script:
        check_script(args.check_script, rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.readme:
        print(section(json.loads(args.readme.read_text())))
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device here; on a CPU use --dry-run", file=sys.stderr)
            return 2
    parts = plan(args.out.resolve())
    if args.only:
        wanted = set(args.only.split(","))
        parts = [p for p in parts if p.key in wanted or p.key[0] in wanted]
    if args.dry_run:
        return dry_run(parts)
    summary = run(parts, args.out.resolve(), args.budget)
    print(f"wrote {args.out / 'gpu_suite.json'} and gpu_suite.md in {summary['seconds']:.0f} s")
    return 0 if all(p["status"] in ("ok", "skipped") for p in summary["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
