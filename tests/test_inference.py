"""`fastfilm eval` and `fastfilm answer` on RGBA PNGs, and refusing mismatched data."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from fastfilm.cli import main
from fastfilm.config import GenerateConfig
from fastfilm.data.generate import run as generate
from fastfilm.errors import UserError

TRAIN = ["--preset", "tiny", "--epochs", "1", "--batch-size", "16", "--reference", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(generated_clevr, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "film"
    assert main(["train", str(generated_clevr), "--out", str(run), *TRAIN]) == 0
    return run


def test_eval_json_reports_overall_per_type_and_family(trained, generated_clevr, tmp_path, capsys):
    preds = tmp_path / "preds.txt"
    capsys.readouterr()
    assert main(["eval", str(trained), str(generated_clevr), "--split", "val", "--json", "--reference",
                 "--predictions", str(preds)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "val" and 0 <= report["accuracy"] <= 1
    assert report["count"] == 16 and report["per_type"] and report["per_family"]
    questions = json.loads((generated_clevr / "questions" / "CLEVR_val_questions.json").read_text())["questions"]
    answers = json.loads((trained / "vocab.json").read_text())["answer_token_to_idx"]
    lines = preds.read_text().splitlines()
    assert len(lines) == len(questions) and set(lines) <= set(answers)
    # The file agrees with the reported accuracy: predictions are in question order.
    correct = sum(p == q["answer"] for p, q in zip(lines, questions))
    assert correct / len(questions) == pytest.approx(report["accuracy"])


def test_eval_fast_path_agrees_with_reference(trained, generated_clevr, capsys):
    capsys.readouterr()
    main(["eval", str(trained), str(generated_clevr), "--json", "--reference"])
    ref = json.loads(capsys.readouterr().out)
    main(["eval", str(trained), str(generated_clevr), "--json", "--no-compile", "--amp", "off"])
    fast = json.loads(capsys.readouterr().out)
    assert fast["accuracy"] == pytest.approx(ref["accuracy"])


def test_answer_on_rgba_png_explains_unknown_words(trained, generated_clevr, tmp_path, capsys):
    image = next((generated_clevr / "images" / "val").glob("*.png"))
    assert Image.open(image).mode == "RGBA"
    big = tmp_path / "big.png"  # another size, still RGBA: resized like the cache
    Image.open(image).resize((300, 200)).save(big)
    capsys.readouterr()
    assert main(["answer", str(trained), "--image", str(big), "--question", "What color is the zorblax?",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "zorblax" in out and "<UNK>" in out
    # Answer lines look like "   41.2%  yes".
    probs = [float(line.split("%")[0]) for line in out.splitlines() if line.startswith("  ") and "%" in line]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True)


def test_answer_on_a_corrupt_image_names_the_file(trained, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["answer", str(trained), "--image", str(bad), "--question", "what color is it"]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_checkpoint_refuses_data_with_another_answer_set(trained, tmp_path):
    other = tmp_path / "other"
    generate(GenerateConfig(out=str(other), train_images=3, val_images=2, questions_per_image=3, image_width=48,
                            image_height=32, min_objects=3, max_objects=4, families="zero_hop_count", seed=3,
                            workers=1))
    from fastfilm.config import EvalConfig
    from fastfilm.commands.eval import run

    with pytest.raises(UserError, match="answer set does not match"):
        run(EvalConfig(checkpoint=str(trained), data=str(other), reference=True))
