"""`fastfilm plot`: learning curves read from metrics.jsonl, several runs overlaid; the
quickstart's per-type bar chart."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastfilm.config import PlotConfig
from fastfilm.analysis.figures import per_type_bars
from fastfilm.cli import main
from fastfilm.commands.plot import plot, read_metrics
from fastfilm.errors import UserError


def _line(epoch: int, step: int, acc: float, complete: bool = True) -> dict:
    """A metrics.jsonl line as the trainer writes it."""
    return {"epoch": epoch, "step": step, "complete_epoch": complete, "train_loss": 2.0 - acc,
            "train_accuracy": acc + 0.05, "val_accuracy": acc,
            "val_per_type": {"exist": acc + 0.1, "query_attribute": acc - 0.1},
            "train_questions_per_s": 100.0 * epoch + step, "elapsed_s": 10.0 * step}


def _run(path: Path, lines: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _assert_lines(ax, expected: dict[str, list[float]]) -> None:
    """The y data of each line of `ax`, by label, equal the expected values."""
    got = {line.get_label(): line.get_ydata() for line in ax.lines}
    assert set(got) == set(expected)
    for label, values in expected.items():
        np.testing.assert_allclose(got[label], values, err_msg=label)


def _axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_runs_are_overlaid_with_their_numbers(tmp_path):
    a = _run(tmp_path / "film", [_line(1, 10, 0.4), _line(2, 20, 0.5), _line(3, 30, 0.6)])
    # Stopped by --max-minutes 4 steps into its third epoch: that line sits at epoch 2.4.
    b = _run(tmp_path / "cnn_gru", [_line(1, 10, 0.3), _line(2, 20, 0.35), _line(2, 24, 0.36, complete=False)])
    fig = plot(PlotConfig(runs=[str(a), str(b)]))
    axes = _axes_by_title(fig)
    assert set(axes) == {"accuracy", "loss", "training questions/s", "val accuracy: Exist",
                         "val accuracy: Query Attribute"}
    acc = {line.get_label(): line for line in axes["accuracy"].lines}
    assert set(acc) == {"film train", "film val", "cnn_gru train", "cnn_gru val"}
    np.testing.assert_allclose(acc["film val"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(acc["film val"].get_ydata(), [40, 50, 60])  # in %
    np.testing.assert_allclose(acc["cnn_gru train"].get_xdata(), [1, 2, 2.4])
    np.testing.assert_allclose(acc["cnn_gru train"].get_ydata(), [35, 40, 41])
    assert acc["film val"].get_linestyle() == "--" and acc["film train"].get_linestyle() == "-"
    assert acc["film val"].get_color() != acc["cnn_gru val"].get_color()
    _assert_lines(axes["loss"], {"film train": [1.6, 1.5, 1.4], "cnn_gru train": [1.7, 1.65, 1.64]})
    _assert_lines(axes["training questions/s"], {"film": [110, 220, 330], "cnn_gru": [110, 220, 224]})
    _assert_lines(axes["val accuracy: Exist"], {"film": [50, 60, 70], "cnn_gru": [40, 45, 46]})
    _assert_lines(axes["val accuracy: Query Attribute"], {"film": [30, 40, 50], "cnn_gru": [20, 25, 26]})
    assert [t.get_text() for t in axes["val accuracy: Exist"].get_legend().get_texts()] == ["film", "cnn_gru"]


def test_val_loss_is_drawn_where_recorded(tmp_path):
    lines = [{**_line(1, 5, 0.5), "val_loss": 1.2}, {**_line(2, 10, 0.6), "val_loss": 1.1}]
    fig = plot(PlotConfig(runs=str(_run(tmp_path / "r", lines))))
    _assert_lines(_axes_by_title(fig)["loss"], {"r train": [1.5, 1.4], "r val": [1.2, 1.1]})


def test_run_without_metrics_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "empty_run")
    assert main(["plot", str(tmp_path / "empty_run"), "--out", str(tmp_path / "x.png")]) == 2
    assert "empty_run: no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    bad = _run(tmp_path / "bad", [_line(1, 1, 0.5)])
    (bad / "metrics.jsonl").write_text((bad / "metrics.jsonl").read_text() + "{not json\n")
    with pytest.raises(UserError, match="metrics.jsonl, line 2: not JSON"):
        read_metrics(bad)


def test_plot_a_trained_run_from_the_cli(generated_clevr, tmp_path):
    run = tmp_path / "film"
    assert main(["train", str(generated_clevr), "--out", str(run), "--preset", "tiny", "--epochs", "2",
                 "--batch-size", "16", "--reference", "--device", "cpu"]) == 0
    out = tmp_path / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot(PlotConfig(runs=str(run)))
    val = next(x for x in _axes_by_title(fig)["accuracy"].lines if x.get_label() == "film val")
    written = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(val.get_ydata(), [100 * x["val_accuracy"] for x in written])
    np.testing.assert_allclose(val.get_xdata(), [1, 2])


def test_quickstart_bar_chart_heights_are_the_table():
    rows = {"Q-type": {"accuracy": 0.25, "per_type": {"exist": 0.5, "count": 0.1}},
            "CNN+GRU+FiLM": {"accuracy": 0.75, "per_type": {"exist": 0.9, "count": 0.6, "compare_attribute": 0.55}}}
    ax = per_type_bars(rows, "title").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Q-type", "CNN+GRU+FiLM"]
    np.testing.assert_allclose([p.get_height() for p in ax.containers[0]], [25, 50, 10])
    np.testing.assert_allclose([p.get_height() for p in ax.containers[1]], [75, 90, 60, 55])
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["Overall", "Exist", "Count"]
