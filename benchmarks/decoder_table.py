"""The table `fastfilm preprocess --decoder auto` chooses by: fastfilm/data/decoder_speeds.json,
derived from the decode benchmarks committed in benchmarks/results/:

    python benchmarks/decoder_table.py           # rewrite the table
    python benchmarks/decoder_table.py --check   # exit 1 if the committed table is not what the results say

Sources: `preprocess_<kind>*.json`, written by `pytest benchmarks/bench_preprocess.py
--benchmark-json ...` (one or several runs per machine kind, e.g. one per size with -k; a
(size, image set) group is taken from the file that ran it, so each ratio compares decoders
timed in one session; where two files ran the same group, the later by name wins), and LEGACY files from before results recorded a machine kind.
For each kind and output size the table holds each decoder's rate relative to Pillow's, the
geometric mean over the image sets measured (the generator's clean PNGs and CLEVR-sized noisy
ones), rounded to 3 digits.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TABLE = REPO / "fastfilm" / "data" / "decoder_speeds.json"
# preprocess.json was written at commit 35ad42f on the AMD EPYC of docs/data.md (AVX2 only),
# in the end-to-end layout, before results recorded a machine kind; it timed `dali` (decode
# and resize in the pipeline, the same pipeline as today) and `pillow` at 64 and 224 px.
LEGACY = {"preprocess.json": "cpu-avx2"}


def _from_pytest_benchmark(record: dict) -> tuple[str, dict, dict]:
    """(kind, about, {(size, image_set): {backend: vs_pillow}}) of a pytest-benchmark JSON."""
    info = record["machine_info"]["fastfilm"]
    ratios: dict = {}
    timers = set()
    for b in record["benchmarks"]:
        p, extra = b["params"], b["extra_info"]
        if "vs_baseline" not in extra:
            continue  # a run whose Pillow baseline was not selected, or ran disabled
        ratios.setdefault((int(p["size"]), p["image_set"]), {})[p["backend"]] = extra["vs_baseline"]
        timers.add(b["options"]["timer"])
    about = {"processor": info.get("processor"), "commit": info.get("commit"), "dirty": info.get("dirty"),
             "threads": info.get("threads"), "timer": ", ".join(sorted(timers))}
    return info["machine_kind"], about, ratios


def _from_legacy(record: dict) -> tuple[dict, dict]:
    m = record["machine"]
    ratios: dict = {}
    for key, r in record["results"].items():
        image_set, _, rest = key.partition("/")
        backend, _, size = rest.rpartition("_")
        ratios.setdefault((int(size), image_set), {})[backend] = r["speedup_vs_pillow"]
    about = {"processor": m.get("processor"), "commit": m.get("commit"), "dirty": None,
             "threads": record.get("workers"), "timer": "perf_counter (wall)"}
    return about, ratios


def build(results: Path = RESULTS) -> dict:
    machines: dict = {}
    files = sorted(results.glob("preprocess_*.json")) + [results / f for f in LEGACY if (results / f).exists()]
    for f in files:
        record = json.loads(f.read_text())
        if f.name in LEGACY:
            kind, (about, ratios) = LEGACY[f.name], _from_legacy(record)
        else:
            kind, about, ratios = _from_pytest_benchmark(record)
        entry = machines.setdefault(kind, {"sources": [], "sizes": {}, "measured_in": {}, "_sets": {}})
        name = f.relative_to(REPO).as_posix()
        entry["sources"].append({"file": name, **about})
        for (size, image_set), by_backend in ratios.items():
            entry["_sets"].setdefault(size, {})[image_set] = by_backend
            entry["measured_in"].setdefault(str(size), [])
            if name not in entry["measured_in"][str(size)]:
                entry["measured_in"][str(size)].append(name)
    for entry in machines.values():
        for size, sets in sorted(entry.pop("_sets").items()):
            backends = set.intersection(*(set(b) for b in sets.values()))
            entry["sizes"][str(size)] = {
                b: round(math.exp(sum(math.log(s[b]) for s in sets.values()) / len(sets)), 3) for b in sorted(backends)}
            entry["image_sets"] = sorted(set(entry.get("image_sets", [])) | set(sets))
        entry["measured_in"] = {size: ", ".join(files) for size, files in
                                sorted(entry["measured_in"].items(), key=lambda kv: int(kv[0]))}
    return {"about": "decode + resize rate of each decoder relative to Pillow's, per machine kind and output side; "
                     "written by benchmarks/decoder_table.py from the files named in each entry's sources "
                     "(do not edit by hand)",
            "machines": dict(sorted(machines.items()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the committed table instead of writing it")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=TABLE)
    args = p.parse_args(argv)
    text = json.dumps(build(args.results), indent=2) + "\n"
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not what {args.results} says: run python benchmarks/decoder_table.py",
                  file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
