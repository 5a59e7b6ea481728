"""benchmarks/speed_table.py: one row group per machine kind from the results files present."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_table.py"


@pytest.fixture(scope="module")
def speed_table():
    spec = importlib.util.spec_from_file_location("speed_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(train: dict[str, float], **top) -> dict:
    cands = {name: {"amp": "bfloat16", "train_qps": q, "infer_qps": 2 * q, "train_mfu": 0.25,
                    "questions_per_image": 4 if "group" in name else 1} for name, q in train.items()}
    return {"preset": "cpu", "batch_size": 64, "threads": 2, "matmul_peak_tflops": {"fp32": 0.09, "bf16": 0.7},
            "candidates": cands, **top}


def test_one_group_per_machine_kind(speed_table, tmp_path):
    (tmp_path / "train_cpu-amx.json").write_text(json.dumps(_record(
        {"reference": 1000.0, "fast": 4000.0, "fast +group4": 5000.0}, machine_kind="cpu-amx", isa="amx",
        machine={"processor": "Intel Xeon", "commit": "abc1234"})))
    # Written before machine kinds were recorded: the kind comes from the CPU flags.
    (tmp_path / "train_cpu.json").write_text(json.dumps(_record(
        {"reference": 700.0, "fast": 1260.0}, machine={"processor": "AMD EPYC", "cpu_flags": {"avx2": True}})))
    (tmp_path / "loader.json").write_text("{}")  # not a train_*.json: ignored
    groups: list[list[str]] = []
    for line in speed_table.table(tmp_path).splitlines():
        if line.startswith("**"):
            groups.append([])
        groups[-1].append(line)
    assert [g[0].split("**")[1] for g in groups] == ["cpu-amx", "cpu-avx2"]
    amx = groups[0]
    assert "Intel Xeon" in amx[0] and "fp32 90, bf16 700" in amx[0] and "abc1234" in amx[0]
    assert "| fast | bfloat16 | 4000 | 4.00x | 8000 | 4.00x | 25% |" in amx
    assert "| fast +group4 | bfloat16 | 5000 | 5.00x |  |  | 25% |" in amx  # inference is not grouped
    assert "| fast | bfloat16 | 1260 | 1.80x | 2520 | 1.80x | 25% |" in groups[1]


def test_kind_of_legacy_records(speed_table):
    assert speed_table.kind_of({"machine": {"cpu_flags": {"avx2": True, "avx512f": True}}}) == "cpu-avx512"
    assert speed_table.kind_of({"machine": {"cpu_flags": None}}) == "cpu (kind not recorded)"
    assert speed_table.kind_of({"machine": {"machine_kind": "cuda-sm90"}}) == "cuda-sm90"


def test_no_results_is_an_error(speed_table, tmp_path):
    with pytest.raises(SystemExit, match="no train_"):
        speed_table.table(tmp_path)
