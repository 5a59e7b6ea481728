"""Fine-tuning from a trained run: --init-from, --train-only, the recipes of docs/finetuning.md
(CoGenT A -> B, a CLEVR-Humans-style reworded set) run end to end on generated data."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastfilm import checkpoint as ckpt
from fastfilm.cli import main
from fastfilm.config import ModelConfig, TrainConfig, model_config
from fastfilm.data.cache import load_split, load_vocab, prepare
from fastfilm.data.reword import reword_file
from fastfilm.data.vocab import Vocab
from fastfilm.engine import distributed, finetune
from fastfilm.engine import trainer as train_mod
from fastfilm.engine.options import Execution
from fastfilm.engine.step import TrainStep
from fastfilm.errors import UserError
from fastfilm.model import build_model

TINY = ["--preset", "tiny", "--batch-size", "16", "--device", "cpu", "--no-compile", "--amp", "off"]
TUNED = ("question.", "film_generator.")  # what --train-only film_generator trains


# Tiny tensors on a shared 2-core machine: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_run(generated_clevr, tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", str(generated_clevr), "--out", str(run), "--epochs", "2", *TINY]) == 0
    return run


def best_state(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / ckpt.BEST))


def last_state(run) -> dict[str, torch.Tensor]:
    return torch.load(run / ckpt.LAST, weights_only=True)["model"]


def assert_frozen_identical(before: dict, after: dict, tuned: tuple[str, ...]) -> None:
    """Every parameter and buffer outside `tuned` bit-identical; every tuned tensor changed."""
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith(tuned):
            if k != finetune.EMBEDDING:  # its new rows make the shapes differ
                assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------ vocabulary


def test_extend_vocab_keeps_every_id_and_appends_new_words_sorted():
    base = Vocab.from_tokens(["what", "color", "cube"], ["red", "blue"])
    data = Vocab.from_tokens(["what", "hue", "box", "cube"], ["blue"])
    merged = finetune.extend_vocab(base, data, "DATA", "RUN")
    assert {w: merged.question_token_to_idx[w] for w in base.question_token_to_idx} == base.question_token_to_idx
    assert finetune.new_words(base, merged) == ["box", "hue"]
    assert [merged.question_token_to_idx[w] for w in ("box", "hue")] == [len(base), len(base) + 1]
    assert merged.answer_token_to_idx == base.answer_token_to_idx
    q, a = finetune.id_maps(data, merged)
    for word, i in data.question_token_to_idx.items():
        assert merged.question_token_to_idx[word] == q[i]
    assert a[data.answer_token_to_idx["blue"]] == base.answer_token_to_idx["blue"]
    with pytest.raises(UserError, match=r"'green', 'maybe'"):
        finetune.extend_vocab(base, Vocab.from_tokens(["what"], ["maybe", "green", "red"]), "DATA", "RUN")


# ------------------------------------------------------------------ freezing


@pytest.mark.parametrize("train_only, tuned", [("film_generator", TUNED), ("question", ("question.",))])
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast-fused"])
def test_frozen_parts_keep_weights_and_batch_norm_statistics(train_only, tuned, fast):
    """A few optimizer steps in training mode: the frozen parts stay in eval mode (running
    statistics used, never updated) and get no update, whatever TrainStep's model.train() does."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = build_model(cfg, 20, 7, fast=fast)
    model.train()
    for _ in range(2):  # statistics that are not the initial ones, so that eval mode matters
        model(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.randint(1, 20, (6, 5)),
              torch.full((6,), 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = finetune.freeze(model, train_only)
    assert frozen and all(not p.requires_grad for n in frozen for p in model.get_submodule(n).parameters())
    ex = Execution(torch.device("cpu"), reference=not fast, fused=fast, channels_last=fast)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, torch.optim.Adam(params, lr=1e-2, weight_decay=1e-5), ex)
    for _ in range(3):
        step(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.randint(1, 20, (6, 5)),
             torch.full((6,), 5), torch.randint(0, 7, (6,)))
        assert model.training and all(not model.get_submodule(n).training for n in frozen)
    assert_frozen_identical(before, model.state_dict(), tuned)


def test_train_only_film_generator_needs_a_generator(tmp_path):
    model = build_model(model_config("tiny", arch="cnn_gru"), 10, 5)
    with pytest.raises(UserError, match="no film_generator"):
        finetune.freeze(model, "film_generator")


# ------------------------------------------------------------------ recipes, end to end


@pytest.mark.parametrize("path", [[], ["--reference"]], ids=["fast", "reference"])
def test_cogent_a_to_b_recipe(tmp_path, path, capsys):
    """docs/finetuning.md, CoGenT: train on condition A, fine-tune the question pipeline and
    FiLM generator on B. Everything else stays bit-identical to A's best weights, buffers
    included, and `eval` of the tuned run on B's val split agrees with its training record."""
    gen = ["--train-images", "30", "--val-images", "6", "--questions-per-image", "4", "--image-width", "32",
           "--image-height", "32", "--max-objects", "4", "--workers", "1",
           "--families", "zero_hop_exist,zero_hop_query_color,zero_hop_query_shape"]
    a, b = tmp_path / "cogent_a", tmp_path / "cogent_b"
    assert main(["generate", str(a), "--cogent", "A", *gen]) == 0
    assert main(["generate", str(b), "--cogent", "B", "--seed", "1", *gen]) == 0
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    assert main(["train", str(a), "--out", str(run_a), "--epochs", "1", *TINY, *path]) == 0
    assert main(["train", str(b), "--out", str(run_b), "--init-from", str(run_a), "--train-only", "film_generator",
                 "--epochs", "2", *TINY, *path]) == 0
    assert_frozen_identical(best_state(run_a), last_state(run_b), TUNED)
    capsys.readouterr()
    assert main(["eval", str(run_b), str(b), "--json", *path, "--no-compile", "--amp", "off"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(json.loads((run_b / "metrics.json").read_text())["val_accuracy"])


def humans_style(src, dst, seed: int = 0):
    """A copy of DATA whose questions are reworded with words outside its vocabulary."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".fastfilm_cache"))
    for split in ("train", "val"):
        f = dst / "questions" / f"CLEVR_{split}_questions.json"
        assert reword_file(f, f, rate=0.5, seed=seed + (split == "val")) > 0
    return dst


def test_humans_style_new_words_get_rows_and_old_rows_are_kept(generated_clevr, base_run, tmp_path, capsys):
    data = humans_style(generated_clevr, tmp_path / "humans")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "tuned"), init_from=str(base_run),
                      train_only="film_generator", epochs=1, batch_size=16, device="cpu", reference=True)
    trainer = train_mod.Trainer(cfg, ModelConfig(), distributed.Dist(device=torch.device("cpu")), progress=False)
    base = Vocab.load(base_run / "vocab.json")
    data_vocab = load_vocab(prepare(data, 32))
    added = finetune.new_words(base, trainer.vocab)
    assert added and added == sorted(set(data_vocab.question_token_to_idx) - set(base.question_token_to_idx))
    assert trainer.model_cfg == ckpt.model_config_from(json.loads((base_run / "best.json").read_text()))
    # Old words keep their ids and rows, new ones get rows of their own after them.
    embed = trainer.model.question.embed.weight.detach()
    old = best_state(base_run)[finetune.EMBEDDING]
    assert embed.shape[0] == len(base) + len(added)
    torch.testing.assert_close(embed[:len(base)], old, rtol=0, atol=0)
    # The training questions, cached with DATA's ids, now read the same words in the model's.
    cached = load_split(prepare(data, 32), "train")
    words = {i: w for w, i in trainer.vocab.question_token_to_idx.items()}
    data_words = {i: w for w, i in data_vocab.question_token_to_idx.items()}
    for row in range(len(cached)):
        n = int(cached.lengths[row])
        assert [words[int(t)] for t in trainer.train_split.questions[row, :n]] == \
            [data_words[int(t)] for t in cached.questions[row, :n]]
    np.testing.assert_array_equal(
        [trainer.vocab.idx_to_answer[a] for a in trainer.train_split.answers],
        [data_vocab.idx_to_answer[a] for a in cached.answers])
    trainer.run()
    # `eval` serves the reworded val split to the tuned run through the same re-encoding.
    capsys.readouterr()
    assert main(["eval", cfg.out, str(data), "--json", "--reference"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(json.loads((tmp_path / "tuned" / "metrics.json").read_text())["val_accuracy"])


def test_resume_of_a_finetuning_run_equals_uninterrupted(generated_clevr, base_run, tmp_path):
    data = humans_style(generated_clevr, tmp_path / "humans")

    def cfg(out, **kw):
        return TrainConfig(**{**dict(data=str(data), out=str(tmp_path / out), init_from=str(base_run),
                                     train_only="film_generator", epochs=2, batch_size=8, device="cpu",
                                     reference=True, patience=0), **kw})
    train_mod.train(cfg("straight"), ModelConfig(), progress=False)
    m = train_mod.train(cfg("cut", max_minutes=1e-9), ModelConfig(), progress=False)
    assert m["stopped"] == "max_minutes"
    train_mod.train(cfg("ignored", resume=str(tmp_path / "cut")), ModelConfig(), progress=False)
    a, b = last_state(tmp_path / "straight"), last_state(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------ refusals


def test_answers_the_run_cannot_give_stop_with_exit_2_naming_them(base_run, tmp_path, capsys):
    counting = tmp_path / "counting"
    assert main(["generate", str(counting), "--train-images", "3", "--val-images", "1", "--questions-per-image", "3",
                 "--image-width", "32", "--image-height", "32", "--max-objects", "4", "--families", "zero_hop_count",
                 "--workers", "1"]) == 0
    answers = {q["answer"] for q in json.loads((counting / "questions" / "CLEVR_train_questions.json").read_text())
               ["questions"]}
    capsys.readouterr()
    assert main(["train", str(counting), "--out", str(tmp_path / "x"), "--init-from", str(base_run), *TINY]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "was not trained to give" in err
    assert all(repr(a) in err for a in answers)


@pytest.mark.parametrize("flags, match", [
    (["--train-only", "question"], "--train-only question: needs --init-from"),
    (["--init-from", "BASE", "--channels", "64"], r"drop --channels 64 \(RUN has 16\)"),
    (["--init-from", "BASE", "--channels", "16", "--input", "features"], r"drop --input 'features'"),
])
def test_inconsistent_flags_exit_2(generated_clevr, base_run, tmp_path, capsys, flags, match):
    flags = [str(base_run) if f == "BASE" else f for f in flags]
    assert main(["train", str(generated_clevr), "--out", str(tmp_path / "x"), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
