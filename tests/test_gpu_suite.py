"""benchmarks/gpu_suite.py: the dry run (every part's imports and arguments, on a CPU), the
runner's handling of failing, slow and over-budget parts, and the README section."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_suite  # noqa: E402

from fastfilm.data.decode import dali_available  # noqa: E402


def test_plan_order_and_budget(tmp_path):
    parts = gpu_suite.plan(tmp_path)
    assert [p.key for p in parts] == ["a_tests", "b_fused_op", "c_train", "c_train_graphs", "d_gru", "e_decode",
                                      "f_launches"]
    assert sum(p.cap_s for p in parts) <= gpu_suite.BUDGET_S
    for p in parts:
        assert p.command and p.check and p.output.startswith("gpu_")
        assert not p.skip or p.key in ("c_train_graphs", "d_gru"), p
    # The graphs run is planned exactly when bench_train.py offers the flag.
    help_text = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--help"], capture_output=True,
                               text=True).stdout
    graphs = next(p for p in parts if p.key == "c_train_graphs")
    assert (graphs.skip == "") == ("--cuda-graphs" in help_text)
    assert "--cuda-graphs" in graphs.command


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dry run")
def test_dry_run_checks_every_part():
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--dry-run"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in ("a_tests", "b_fused_op", "c_train", "c_train_graphs", "d_gru", "e_decode", "f_launches"):
        assert f"{key}:" in proc.stdout
    # Every script and flag the suite runs is there now: nothing is planned to be skipped.
    assert proc.stdout.count("check: ok") == 7 and "will be skipped" not in proc.stdout, proc.stdout


def test_dry_run_fails_on_a_bad_argument(tmp_path, monkeypatch, capsys):
    """A check that cannot pass makes the dry run fail (and says which)."""
    real_plan = gpu_suite.plan

    def broken(out):
        parts = real_plan(out)
        parts[2].check[parts[2].check.index("--steps")] = "--no-such-flag"
        return parts[2:3]

    monkeypatch.setattr(gpu_suite, "plan", broken)
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path)]) == 1
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().out


def _part(key, code, cap_s=30):
    return gpu_suite.Part(key, f"part {key}", cap_s, [sys.executable, "-c", code], ["true"], f"gpu_{key}.json")


def test_failures_are_recorded_and_the_next_part_runs(tmp_path):
    decode = {"results": [{"format": "jpeg", "backend": "dali", "device": "gpu", "decoded_on": "GPU (nvJPEG)",
                           "images_per_s": 1234.5, "mean_abs_diff_vs_pillow": 0.125}]}
    parts = [
        _part("a_tests", "raise SystemExit(3)"),
        _part("b_fused_op", "import time; time.sleep(60)", cap_s=2),
        _part("e_decode", f"import json; json.dump({decode!r}, open({str(tmp_path / 'gpu_e_decode.json')!r}, 'w'))"),
        _part("d_gru", "print('never runs')"),
    ]
    parts[3].skip = "not there yet"
    summary = gpu_suite.run(parts, tmp_path, budget_s=120)
    status = {p["key"]: p["status"] for p in summary["parts"]}
    assert status == {"a_tests": "failed (exit 3)", "b_fused_op": "timed out after 2 s", "e_decode": "ok",
                      "d_gru": "skipped"}
    assert summary["parts"][1]["seconds"] < 30  # killed at its cap, not waited for
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["parts"][2]["status"] == "ok"
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| jpeg | dali/gpu | GPU (nvJPEG) | 1,234 | 0.125 |" in md
    assert "not there yet" in md


def test_budget_spent_skips_the_rest(tmp_path):
    parts = [_part("a_tests", "import time; time.sleep(60)", cap_s=3), _part("e_decode", "print(1)")]
    summary = gpu_suite.run(parts, tmp_path, budget_s=12)
    assert summary["parts"][0]["status"] == "timed out after 3 s"
    assert summary["parts"][1]["status"] == "skipped" and "budget" in summary["parts"][1]["reason"]


def test_readme_section_from_bench_train_json(tmp_path, capsys):
    train = {"fast_train_qps": 5120.0, "reference_train_qps": 1280.0, "train_speedup": 4.0, "fast_infer_qps": 20000.0,
             "reference_infer_qps": 6000.0, "fast_epoch_s": 136.7, "matmul_peak_tflops": {"bf16": 700.0},
             "candidates": {"fast": {"train_mfu": 0.123, "train_peak_memory_mb": 2048.0, "train_compile_s": 50.0,
                                     "infer_compile_s": 10.0}}}
    summary = {"machine": {"device": "NVIDIA H200", "cuda": "12.8", "torch": "2.13", "commit": "abc", "date": "d"},
               "budget_s": 480, "seconds": 400.0,
               "parts": [{"key": "c_train", "title": "bench_train.py, paper preset", "status": "ok", "seconds": 140.0,
                          "figures": gpu_suite.figures("c_train", train)}]}
    path = tmp_path / "gpu_suite.json"
    path.write_text(json.dumps(summary))
    assert gpu_suite.main(["--readme", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("## GPU results (NVIDIA H200")
    assert "| training questions/s, fast (reference) | 5,120 (1,280), 4.00x |" in text
    assert "| seconds per 700k-question epoch, fast | 137 |" in text
    assert "12.3% (700)" in text


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest"><testcase classname="t" name="ok"/>'
                   '<testcase classname="t" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="t" name="skip"><skipped message="y"/></testcase></testsuite></testsuites>')
    gpu_suite.junit_to_json(xml, tmp_path / "j.json")
    assert json.loads((tmp_path / "j.json").read_text()) == {"total": 3, "failed": 1, "skipped": 1, "passed": 1,
                                                             "failures": ["t::bad"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_without_cuda_it_says_so(tmp_path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_check_script_sees_function_local_imports(tmp_path):
    """bench_train.py imports fastfilm's engine inside main(): a moved module must fail the check."""
    script = tmp_path / "bench_x.py"
    body = "import argparse\n\ndef parse_args(argv):\n    return argparse.ArgumentParser().parse_args(argv)\n\n"
    script.write_text(body + "def main():\n    from fastfilm.config import model_config\n")
    gpu_suite.check_script(script, [])
    script.write_text(body + "def main():\n    from fastfilm.config import no_such_name\n")
    with pytest.raises(ImportError):
        gpu_suite.check_script(script, [])
    script.write_text(body + "def main():\n    import fastfilm.no_such_module\n")
    with pytest.raises(ModuleNotFoundError):
        gpu_suite.check_script(script, [])


def test_own_parts_dry_runs_feed_the_summary(tmp_path):
    """Parts b and e run every code path on the CPU with --dry-run; their JSON renders."""
    import gpu_suite_parts

    assert gpu_suite_parts.main(["fused-op", "--dry-run", "--json", str(tmp_path / "b.json")]) == 0
    lines = gpu_suite.figures("b_fused_op", json.loads((tmp_path / "b.json").read_text()))
    assert len(lines) == 2 + len(gpu_suite_parts.cases()) == 26
    assert lines[2].startswith("| 2x4x3x3 | bf16 | channels_last | train_fwd_bwd |")
    if not dali_available():
        pytest.skip("nvidia-dali is not installed")
    assert gpu_suite_parts.main(["decode", "--dry-run", "--json", str(tmp_path / "e.json")]) == 0
    lines = gpu_suite.figures("e_decode", json.loads((tmp_path / "e.json").read_text()))
    rows = {tuple(line.split(" | ")[:2]) for line in lines[2:]}
    assert {("| png", "pillow/cpu"), ("| png", "dali/cpu"), ("| jpeg", "pillow/cpu"), ("| jpeg", "dali/cpu")} <= rows
