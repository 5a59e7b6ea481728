"""benchmarks/bench_learning.py's own logic: ad hoc recipes parsed into typed TrainConfig
overrides, and the summary's stability figures on a hand-made curve."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_learning as bl  # noqa: E402


def test_ad_hoc_recipe_is_typed_overrides():
    got = bl.recipe("batch_size=128+lr=2e-3+weight_decay=0+lr_schedule=linear+warmup=5%")
    assert got == {"batch_size": 128, "lr": 2e-3, "weight_decay": 0.0, "lr_schedule": "linear", "warmup": "5%"}
    assert isinstance(got["batch_size"], int) and isinstance(got["lr"], float)
    assert bl.recipe("linear") == bl.RECIPES["linear"]
    for bad in ("lr", "learning_rate=1e-3", "lr=1e-3+nope=2"):
        with pytest.raises(SystemExit, match="neither a recipe"):
            bl.recipe(bad)


def point(val, train, gap, complete=True):
    return {"val_accuracy": val, "train_accuracy": train, "eval_gap": gap, "complete_epoch": complete,
            "questions": 0}


def test_stability_counts_falls_only_while_training_accuracy_rises():
    curve = [point(0.40, 0.40, 0.01), point(0.45, 0.45, -0.02),
             point(0.42, 0.46, 0.005),   # -3 points while train rose: counted
             point(0.35, 0.44, 0.0),     # -7 points while train fell: not the case
             point(0.30, 0.50, 0.03, complete=False)]  # a cut epoch is not an epoch
    got = bl._stability([{"curve": curve}])
    assert got["worst_val_drop_pts"] == pytest.approx(3.0)
    assert got["max_abs_eval_gap_pts"] == pytest.approx(2.0)
    assert got["max_eval_gap_pts"] == pytest.approx(1.0)
    assert got["mean_abs_eval_gap_pts"] == pytest.approx((1 + 2 + 0.5 + 0) / 4)


def test_summary_means_over_seeds_and_datasets():
    def run(data, recipe, val, questions):
        return {"data": data, "recipe": recipe, "final_val": val, "questions": questions,
                "curve": [point(val, val, 0.0)]}
    runs = [run("a", "x", 0.5, 100), run("a", "x", 0.7, 300), run("b", "x", 0.9, 50), run("a", "y", 0.2, 10)]
    s = bl._summary(runs)
    assert s["final_val"]["a"]["x"]["mean"] == pytest.approx(0.6)
    assert s["final_val"]["a"]["x"]["mean_questions"] == 200
    assert s["mean_over_datasets"] == {"x": pytest.approx(0.75), "y": pytest.approx(0.2)}
