"""benchmarks/bench_train.py's command line and results file, without running a benchmark:
--json PATH writes exactly PATH (a path without .json used to become PATH.json's sibling
STEM.json), '{kind}' names the machine kind, and the record says which machine it was."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fastfilm.hardware import cpu_isa, machine_kind

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_train():
    sys.path.insert(0, str(BENCH))  # bench_train imports its sibling harness.py
    try:
        spec = importlib.util.spec_from_file_location("bench_train", BENCH / "bench_train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("given", ["results/train_run", "results/train.v2", "results/train_cpu.json", "out"])
def test_json_path_is_written_exactly(bench_train, tmp_path, given):
    args = bench_train.parse_args(["--json", str(tmp_path / given)])
    path = bench_train.save(args, {"train_speedup": 1.5}, torch.device("cpu"))
    assert path == tmp_path / given
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [given]
    assert json.loads(path.read_text())["train_speedup"] == 1.5


def test_kind_placeholder_names_the_machine_kind(bench_train, tmp_path):
    args = bench_train.parse_args(["--json", str(tmp_path / "train_{kind}.json")])
    path = bench_train.save(args, {}, torch.device("cpu"))
    kind = machine_kind(torch.device("cpu"))
    assert path == tmp_path / f"train_{kind}.json" and path.exists()
    assert bench_train.results_path("r/train_{kind}.json", "cuda-sm90") == Path("r/train_cuda-sm90.json")


def test_no_json_writes_nothing(bench_train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench_train.parse_args([]).json == ""
    assert bench_train.save(bench_train.parse_args([]), {}, torch.device("cpu")) is None
    assert not any(tmp_path.iterdir())


def test_record_says_which_machine(bench_train, tmp_path):
    path = bench_train.save(bench_train.parse_args(["--json", str(tmp_path / "r.json")]), {}, torch.device("cpu"))
    machine = json.loads(path.read_text())["machine"]
    assert machine["isa"] == cpu_isa() and machine["machine_kind"] == machine_kind(torch.device("cpu"))
    assert set(machine["cpu_flags"] or {}) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
