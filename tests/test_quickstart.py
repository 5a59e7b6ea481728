"""The quickstart end to end at toy scale: data, Q-type, three trained models, the table."""
import json
from collections import Counter, defaultdict

from fastfilm.cli import main
from fastfilm.config import QuickstartConfig
from fastfilm.data.types import QUESTION_TYPES, TYPE_TITLES
from fastfilm.commands.quickstart import film_minutes

RUNS = {"question_only": "GRU (question only)", "cnn_gru": "CNN+GRU", "film": "CNN+GRU+FiLM"}


def printed_table(printed: str, titles) -> dict[str, dict[str, str]]:
    """The text table's cells by row title and question type ("overall" for the first column)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Held-out (val) accuracy")) + 1
    by_title = {title: key for key, title in TYPE_TITLES.items()}
    columns = ["overall", *(by_title[c.strip()] for c in lines[start].split("|")[1:])]
    assert lines[start].split("|")[0].strip() == "Overall"
    width = len(lines[start]) - len(lines[start].lstrip())
    rows = {}
    for line in lines[start + 1:start + 1 + len(titles)]:
        title, cells = line[:width].strip(), line[width:].split("|")
        rows[title] = dict(zip(columns, (c.strip() for c in cells), strict=True))
    assert set(rows) == set(titles), rows
    return rows


def majority_answers(train: list[dict]) -> dict[int, set[str]]:
    """Each family's most frequent training answers (several on a tie)."""
    counts = defaultdict(Counter)
    for q in train:
        counts[q["question_family_index"]][q["answer"]] += 1
    return {f: {a for a, n in c.items() if n == max(c.values())} for f, c in counts.items()}


def test_quickstart_prints_the_table_and_writes_results(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--train-images", "8", "--val-images", "3",
                 "--questions-per-image", "4", "--image-width", "48", "--image-height", "32",
                 "--preset", "tiny", "--film-minutes", "0.02", "--cnn-gru-minutes", "0.01",
                 "--question-only-minutes", "0.01", "--epochs", "1", "--reference"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert list(rows) == ["Q-type", *RUNS.values()]

    # Each trained row is its run's metrics.json, which `fastfilm eval` of the run's
    # best.safetensors reproduces.
    data = out / "data"
    for arch, title in RUNS.items():
        metrics = json.loads((out / "runs" / arch / "metrics.json").read_text())
        assert metrics["arch"] == arch
        assert rows[title] == {"accuracy": metrics["val_accuracy"], "per_type": metrics["per_type"]}
        capsys.readouterr()
        assert main(["eval", str(out / "runs" / arch), str(data), "--json", "--reference", "--device", "cpu"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["accuracy"], report["per_type"], report["per_family"]) == (
            metrics["val_accuracy"], metrics["per_type"], metrics["per_family"])

    # Q-type answers each question with its family's most frequent training answer.
    questions = {s: json.loads((data / "questions" / f"CLEVR_{s}_questions.json").read_text())["questions"]
                 for s in ("train", "val")}
    majority = majority_answers(questions["train"])
    val_by_family = defaultdict(list)
    for q in questions["val"]:
        val_by_family[q["question_family_index"]].append(q["answer"])
    assert rows["Q-type"]["count"] == len(questions["val"])
    checked = 0
    for family, answers in val_by_family.items():
        if family in majority:  # families never seen in training fall back to their type's majority
            scores = {sum(a == m for a in answers) / len(answers) for m in majority[family]}
            assert rows["Q-type"]["per_family"][str(family)] in scores, (family, majority[family], answers)
            checked += 1
    assert checked >= 3

    # The printed table holds the same numbers, to one decimal, in the paper's column order.
    table = printed_table(printed, rows)
    for title, row in rows.items():
        want = {"overall": row["accuracy"], **{t: row["per_type"].get(t) for t in QUESTION_TYPES}}
        assert table[title] == {k: "-" if v is None else f"{100 * v:.1f}" for k, v in want.items()}, title
    gap = 100 * (rows["CNN+GRU+FiLM"]["accuracy"] - rows["GRU (question only)"]["accuracy"])
    assert f"FiLM - question-only: {gap:+.1f} points." in printed
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the table as a bar chart


def test_film_budget_is_cut_to_end_within_the_total():
    cfg = QuickstartConfig(film_minutes=6.0, max_total_minutes=9.5)
    assert film_minutes(cfg, elapsed_s=60) == 6.0  # on time: the full budget
    late = film_minutes(cfg, elapsed_s=4.5 * 60)  # slow data or baselines: what is left
    assert late < 6.0 and 4.5 + late < 9.5 and late > 4.5
    assert film_minutes(cfg, elapsed_s=20 * 60) > 0  # past the total: FiLM still trains briefly
    assert film_minutes(QuickstartConfig(film_minutes=6.0, max_total_minutes=0), elapsed_s=20 * 60) == 6.0
