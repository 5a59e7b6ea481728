"""benchmarks/gpu_budget.py: hand-checked FLOPs and bytes, parameter counts, and the roofline sums."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_budget  # noqa: E402

from fastfilm.config import PRESETS, model_config  # noqa: E402
from fastfilm.model import build_model  # noqa: E402


def _row(ops, name):
    (op,) = [op for op in ops if op.name == name]
    return op


def test_stem_conv2_by_hand():
    """conv 4x4 stride 2, 128 -> 128 channels, 112 -> 56 px, batch 64."""
    op = _row(gpu_budget.training_step(model_config("paper")), "conv2 128->128 112->56 fwd")
    assert op.flops == 2 * 64 * 56 * 56 * 128 * 128 * 16 == 105_226_698_752
    x, y, w = 64 * 128 * 112 * 112, 64 * 128 * 56 * 56, 128 * 128 * 16
    assert op.bytes == 2 * (x + y + w) == 257_425_408
    # 105 GFLOP at 989.4 TFLOP/s is 106.4 us, more than 257 MB at 3.35 TB/s (76.8 us): FLOP-bound.
    assert op.bound(gpu_budget.GPUS["H100"]) == pytest.approx(105_226_698_752 / 989.4e12)


def test_gru_recurrence_by_hand():
    """46 tokens of [64, 4096] x [4096, 12288] in bf16: each reads W_hh (100.7 MB) from HBM."""
    op = _row(gpu_budget.training_step(model_config("paper")), "GRU h W_hh^T, per token")
    assert op.count == 46
    assert op.flops == 46 * 2 * 64 * 12288 * 4096 == 296_352_743_424
    per_token = 2 * (64 * 4096 + 4096 * 12288 + 64 * 12288)
    assert op.bytes == 46 * per_token == 4_726_980_608
    # Bandwidth-bound: 4.73 GB / 3.35 TB/s = 1.411 ms, against 0.30 ms of FLOPs.
    assert op.bound(gpu_budget.GPUS["H100"]) == pytest.approx(1.4110e-3, rel=1e-4)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameters_match_the_model(preset):
    cfg = model_config(preset)
    with torch.device("meta"):
        model = build_model(cfg, gpu_budget.VOCAB, gpu_budget.ANSWERS)
    assert gpu_budget.parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_totals_are_the_sum_of_the_rows():
    result = gpu_budget.budget(model_config("paper"))
    for name in gpu_budget.GPUS:
        step_ms = sum(r[f"{name}_us"] for r in result["rows"]) / 1e3
        assert result["totals"][name]["step_ms"] == pytest.approx(step_ms)
        assert result["totals"][name]["epoch_s"] == pytest.approx(step_ms / 1e3 * 10_938)
    # Each row is bounded by the slower of its two resources, so the sum is at least each alone.
    h100 = result["totals"]["H100"]
    assert h100["step_ms"] >= max(h100["compute_only_ms"], h100["bytes_only_ms"])


def test_rejects_models_it_does_not_describe():
    with pytest.raises(ValueError, match="raw pixels"):
        gpu_budget.training_step(model_config("paper", input="features"))


def test_grouped_questions_share_the_stem():
    """--group-questions 4: the stem sees 16 images for 64 questions; the rest is unchanged."""
    cfg = model_config("paper")
    one = {op.name: op for op in gpu_budget.training_step(cfg, group=1)}
    four = {op.name: op for op in gpu_budget.training_step(cfg, group=4)}
    assert four["conv2 128->128 112->56 fwd"].flops == one["conv2 128->128 112->56 fwd"].flops / 4
    assert four["GRU h W_hh^T, per token"] == one["GRU h W_hh^T, per token"]
    assert four["conv2 3x3 fwd"] == one["conv2 3x3 fwd"]
    assert "stem output per question (gather fwd, index-add bwd)" in four
