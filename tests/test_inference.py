"""`fastfilm eval` and `fastfilm answer` on RGBA PNGs, and refusing mismatched data."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from PIL import Image

from fastfilm import checkpoint as ckpt
from fastfilm.cli import main
from fastfilm.config import GenerateConfig
from fastfilm.data.generate import run as generate
from fastfilm.data.types import type_of_program
from fastfilm.errors import UserError
from fastfilm.config import FastConfig
from fastfilm.engine.options import resolve
from fastfilm.engine.predictor import Predictor
from helpers import assert_sensitive, load_model, sensitive_checkpoint, split_batch

TRAIN = ["--preset", "tiny", "--epochs", "1", "--batch-size", "16", "--reference", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(generated_clevr, tmp_path_factory):
    """A run whose best.safetensors (what `eval RUN` and `answer RUN` load) has answers that
    depend on the image and the question (helpers.sensitive_checkpoint): one epoch of
    training alone may answer every question alike, and agreeing predictions prove nothing."""
    run = tmp_path_factory.mktemp("run") / "film"
    assert main(["train", str(generated_clevr), "--out", str(run), *TRAIN]) == 0
    sensitive_checkpoint(run / ckpt.BEST, generated_clevr)
    return run


def _eval(capsys, *args: str) -> dict:
    """`fastfilm eval ... --json` on the CPU: its exit code must be 0; the printed report."""
    capsys.readouterr()
    assert main(["eval", *args, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_json_reports_overall_per_type_and_family(trained, generated_clevr, tmp_path, capsys):
    preds = tmp_path / "preds.txt"
    report = _eval(capsys, str(trained), str(generated_clevr), "--split", "val", "--reference",
                   "--predictions", str(preds))
    questions = json.loads((generated_clevr / "questions" / "CLEVR_val_questions.json").read_text())["questions"]
    answers = json.loads((trained / "vocab.json").read_text())["answer_token_to_idx"]
    lines = preds.read_text().splitlines()
    # One line per question, in question order: the checkpoint's answers computed here.
    model, meta = load_model(trained / ckpt.BEST, torch.device("cpu"))
    logits = assert_sensitive(model, split_batch(generated_clevr, meta["model_config"]["image_size"], "val"))
    idx_to_answer = {i: a for a, i in answers.items()}
    assert lines == [idx_to_answer[int(i)] for i in logits.argmax(1)] and len(lines) == len(questions) == 16
    # The report is the predictions file (in question order) scored against the question file,
    # overall, per question type (from each program's last function) and per family.
    hits = [p == q["answer"] for p, q in zip(lines, questions)]
    by_type, by_family = defaultdict(list), defaultdict(list)
    for hit, q in zip(hits, questions):
        by_type[type_of_program(q["program"])].append(hit)
        by_family[str(q["question_family_index"])].append(hit)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731  (a correctly rounded quotient, as numpy's)
    # How the checkpoint's batch-norm statistics were computed travels with the report.
    assert report.pop("bn_stats")["method"] in ("precise", "running")
    assert report == {"split": "val", "accuracy": mean(hits), "count": 16,
                      "per_type": {k: mean(v) for k, v in by_type.items()},
                      "per_family": {k: mean(v) for k, v in by_family.items()}}


def test_eval_fast_path_agrees_with_reference(trained, generated_clevr, tmp_path, capsys):
    """`eval` on the fast path (fused op, channels_last; fp32, eager) gives every question the
    reference model's answer, and the same logits."""
    reports, preds = {}, {}
    for path, flags in {"reference": ["--reference"], "fast": ["--no-compile", "--amp", "off"]}.items():
        reports[path] = _eval(capsys, str(trained), str(generated_clevr), "--predictions",
                              str(tmp_path / f"{path}.txt"), *flags)
        preds[path] = (tmp_path / f"{path}.txt").read_text().splitlines()
    assert preds["fast"] == preds["reference"]
    assert reports["fast"] == reports["reference"]

    cpu, opts = torch.device("cpu"), FastConfig(compile=False, amp="off")
    reference, meta = load_model(trained / ckpt.BEST, cpu)
    fast, _ = load_model(trained / ckpt.BEST, cpu, opts)
    batch = split_batch(generated_clevr, meta["model_config"]["image_size"], "val")
    # Answers that vary with image and question, none a near tie: agreeing answers mean something.
    want = assert_sensitive(reference, batch)
    got = Predictor(fast, resolve(opts, cpu))(batch.images, batch.questions, batch.lengths)
    torch.testing.assert_close(got, want)


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
