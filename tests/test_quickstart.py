"""The quickstart end to end at toy scale: data, Q-type, three trained models, the table."""
import json

from fastfilm.cli import main
from fastfilm.config import QuickstartConfig
from fastfilm.commands.quickstart import film_minutes


def test_quickstart_prints_the_table_and_writes_results(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--train-images", "8", "--val-images", "3",
                 "--questions-per-image", "4", "--image-width", "48", "--image-height", "32",
                 "--preset", "tiny", "--film-minutes", "0.02", "--cnn-gru-minutes", "0.01", "--question-only-minutes", "0.01", "--epochs", "1",
                 "--reference"])
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("Q-type", "GRU (question only)", "CNN+GRU", "CNN+GRU+FiLM"):
        assert row in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"Q-type", "GRU (question only)", "CNN+GRU", "CNN+GRU+FiLM"}
    for row in results["rows"].values():
        assert 0 <= row["accuracy"] <= 1
    assert (out / "runs" / "film" / "metrics.json").exists()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the table as a bar chart


def test_film_budget_is_cut_to_end_within_the_total():
    cfg = QuickstartConfig(film_minutes=6.0, max_total_minutes=9.5)
    assert film_minutes(cfg, elapsed_s=60) == 6.0  # on time: the full budget
    late = film_minutes(cfg, elapsed_s=4.5 * 60)  # slow data or baselines: what is left
    assert late < 6.0 and 4.5 + late < 9.5 and late > 4.5
    assert film_minutes(cfg, elapsed_s=20 * 60) > 0  # past the total: FiLM still trains briefly
    assert film_minutes(QuickstartConfig(film_minutes=6.0, max_total_minutes=0), elapsed_s=20 * 60) == 6.0
