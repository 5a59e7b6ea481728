"""The quickstart end to end at toy scale: data, Q-type, three trained models, the table."""
import json

from fastfilm.cli import main


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
