"""`fastfilm analyze`: the numbers behind the paper's analyses of gamma and beta.

The model is set, not trained: seeded random weights, a FiLM generator far from identity
(negative and near-zero gammas), and batch norm statistics measured on the train split (one
forward with cumulative averaging), so that predictions differ between questions and depend
on gamma and beta. Nothing depends on a training trajectory.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastfilm.config import AnalyzeConfig, FastConfig
from fastfilm.analysis.film_stats import (NONE, FiLMTap, embed, film_statistics, make_ablations, run_pass,
                                          sample_rows)
from fastfilm.checkpoint import save_best
from fastfilm.cli import main
from fastfilm.commands.analyze import load
from fastfilm.config import model_config
from fastfilm.data.cache import load_split, prepare
from fastfilm.data.loader import Loader
from fastfilm.data.vocab import tokenize
from fastfilm.errors import UserError
from fastfilm.model import build_model

SIZE = 32  # the tiny preset's image side


def _save_run(run: Path, cache: Path, arch: str = "film", seed: int = 0) -> Path:
    vocab = json.loads((cache / "vocab.json").read_text())
    cfg = model_config("tiny", arch=arch)
    torch.manual_seed(seed)
    model = build_model(cfg, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]))
    with torch.no_grad():
        if arch == "film":
            # gamma = 1 + N(0, ~several): negative, near-zero and large values, as in a trained model.
            model.film_generator.linear.weight.normal_(0, 1.0)
            model.film_generator.linear.bias.normal_(0, 1.0)
        model.train()
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: the statistics of the one batch below
        train = load_split(cache, "train")
        batch = next(Loader(train, len(train), shuffle=False).epoch(0))
        model(batch.images, batch.questions, batch.lengths)
    save_best(run, model.eval(), {"arch": arch, "model_config": dataclasses.asdict(cfg), "vocab": vocab})
    return run


@pytest.fixture(scope="module")
def cache(generated_clevr):
    return prepare(generated_clevr, SIZE)


@pytest.fixture(scope="module")
def film_run(cache, tmp_path_factory):
    return _save_run(tmp_path_factory.mktemp("run") / "film", cache)


def _loaded(film_run, data, reference: bool, **kw):
    fast = FastConfig(reference=reference, amp="off", compile=False)
    return load(AnalyzeConfig(run=str(film_run), data=str(data), device="cpu", fast=fast, **kw))


def _passes(loaded, names: list[str], noise=(0.5,)):
    """{name: (preds [Q], gamma [Q, F, C], beta [Q, F, C])} for "none" and the named ablations."""
    loader = Loader(loaded.split, 5, shuffle=False)  # 5: several batches, the last one partial
    out = {}
    with FiLMTap(loaded.model, len(loaded.split)) as tap:
        out["none"] = (run_pass(loaded.forward, loader, tap, NONE), tap.gamma.copy(), tap.beta.copy())
        ablations = {a.name: a for a in make_ablations(tap.gamma.mean(0), tap.beta.mean(0), noise, seed=0)}
        for name in names:
            out[name] = (run_pass(loaded.forward, loader, tap, ablations[name]), tap.gamma.copy(), tap.beta.copy())
    return out


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_beta_zero_and_gamma_one_replace_what_the_blocks_get_and_change_predictions(film_run, generated_clevr,
                                                                                  reference):
    loaded = _loaded(film_run, generated_clevr, reference)
    assert type(loaded.model).__name__ == ("FiLMNet" if reference else "FastFiLMNet")
    p = _passes(loaded, ["beta=0", "gamma=1"])
    preds, gamma, beta = p["none"]
    assert (gamma < 0).any() and (np.abs(beta) > 0.5).any()  # non-trivial FiLM parameters to ablate
    p_b, g_b, b_b = p["beta=0"]
    assert (b_b == 0).all() and np.array_equal(g_b, gamma)
    assert (p_b != preds).any()
    p_g, g_g, b_g = p["gamma=1"]
    assert (g_g == 1).all() and np.array_equal(b_g, beta)
    assert (p_g != preds).any()


def test_mean_and_noise_ablations(film_run, generated_clevr):
    loaded = _loaded(film_run, generated_clevr, reference=True)
    p = _passes(loaded, ["gamma,beta=mean", "gamma+noise(0.5)", "beta+noise(0.5)"])
    _, gamma, beta = p["none"]
    _, g_m, b_m = p["gamma,beta=mean"]
    torch.testing.assert_close(g_m, np.broadcast_to(gamma.mean(0), gamma.shape).copy())
    torch.testing.assert_close(b_m, np.broadcast_to(beta.mean(0), beta.shape).copy())
    _, g_n, b_n = p["gamma+noise(0.5)"]
    assert np.array_equal(b_n, beta)
    noise = (g_n - gamma).ravel()  # 16 questions x 2 blocks x 16 channels = 512 draws of N(0, 0.25)
    assert abs(noise.std() - 0.5) < 0.05 and abs(noise.mean()) < 0.07
    _, g_n2, b_n2 = p["beta+noise(0.5)"]
    assert np.array_equal(g_n2, gamma) and not np.array_equal(b_n2, beta)
    # Seeded: the same pass again draws the same noise.
    again = _passes(loaded, ["gamma+noise(0.5)"])["gamma+noise(0.5)"]
    assert np.array_equal(again[1], g_n) and np.array_equal(again[0], p["gamma+noise(0.5)"][0])


def _relu_off_by_hand(model, split) -> np.ndarray:
    """[Q, F] feature maps where ReLU(gamma * BN(conv2(x)) + beta) is 0 everywhere, from the
    reference blocks' batch norm outputs and gamma/beta computed apart from the tap."""
    batch = next(Loader(split, len(split), shuffle=False).epoch(0))
    zs = []
    hooks = [b.bn.register_forward_hook(lambda m, i, o: zs.append(o)) for b in model.blocks]
    with torch.inference_mode():
        gamma, beta = model.film_params(batch.questions, batch.lengths)
        model(batch.images, batch.questions, batch.lengths)
    for h in hooks:
        h.remove()
    out = [torch.relu(gamma[:, j, :, None, None] * z + beta[:, j, :, None, None]).amax((2, 3)) == 0
           for j, z in enumerate(zs)]
    return torch.stack(out, 1).sum(2).numpy()


def test_relu_off_counts_the_maps_the_filmed_relu_shuts(film_run, generated_clevr):
    ref = _loaded(film_run, generated_clevr, reference=True)
    fast = _loaded(film_run, generated_clevr, reference=False)
    expected = _relu_off_by_hand(ref.model, ref.split)
    assert 0 < expected.sum() < expected.size * 16  # some maps shut, not all
    for loaded in (ref, fast):  # the fast model's conv2 feeds the fused op: same counts
        with FiLMTap(loaded.model, len(loaded.split)) as tap:
            run_pass(loaded.forward, Loader(loaded.split, 6, shuffle=False), tap)
        np.testing.assert_array_equal(tap.relu_off, expected)


def _analyze(run, data, out, *extra) -> dict:
    assert main(["analyze", str(run), str(data), "--out", str(out), "--device", "cpu", "--noise", "0.5,2",
                 *extra]) == 0
    return json.loads((out / "analysis.json").read_text())


def _eval(run, data, capsys, *flags) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run), str(data), "--json", "--device", "cpu", *flags]) == 0
    return json.loads(capsys.readouterr().out)


FLAGS = {"reference": ["--reference"], "fast": ["--amp", "off"]}


@pytest.fixture(scope="module")
def analyzed(film_run, generated_clevr, tmp_path_factory) -> dict:
    """{"reference" | "fast": (analysis.json, its directory)}, one full analysis each."""
    out = {}
    for name, flags in FLAGS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (_analyze(film_run, generated_clevr, d, *flags), d)
    return out


@pytest.mark.parametrize("model", list(FLAGS))
def test_analyze_writes_every_number_and_figure(analyzed, film_run, generated_clevr, capsys, model):
    result, out = analyzed[model]
    questions = json.loads((generated_clevr / "questions" / "CLEVR_val_questions.json").read_text())["questions"]
    q, c = len(questions), result["film"]["channels"]
    assert result["questions"] == q == 16 and c == 16 and result["film"]["blocks"] == [0, 1]
    assert result["model"] == ("FiLMNet" if model == "reference" else "FastFiLMNet")
    for block in result["film"]["per_block"]:  # every (question, channel) pair counted once
        for name in ("gamma", "beta"):
            assert sum(block[name]["histogram"]["counts"]) == q * c
        assert 0 < block["relu_off"] < 1
    emb = result["embedding"]
    assert emb["questions"] == list(range(q)) and emb["method"] in ("pca", "tsne")
    assert np.array(emb["coords"]).shape == (2, q, 2) and len(emb["types"]) == len(emb["families"]) == q
    # The 'none' row is `fastfilm eval`'s accuracy (eval without compile: analyze runs eagerly).
    eager = [] if model == "reference" else ["--no-compile"]
    report = _eval(film_run, generated_clevr, capsys, *FLAGS[model], *eager)
    none = result["ablations"]["none"]
    assert none["accuracy"] == report["accuracy"] and none["per_type"] == report["per_type"]
    assert set(result["ablations"]) == {"none", "beta=0", "gamma=1", "beta=mean", "gamma=mean", "gamma,beta=mean",
                                        "gamma+noise(0.5)", "gamma+noise(2)", "beta+noise(0.5)", "beta+noise(2)"}
    assert result["ablations"]["beta=0"]["changed"] > 0
    # Lengths: words and program functions, straight from the questions file.
    words = [str(len(tokenize(x["question"]))) for x in questions]
    assert {k: v["count"] for k, v in result["by_question_length"].items()} == {w: words.count(w) for w in set(words)}
    steps = [str(len(x["program"])) for x in questions]
    assert {k: v["count"] for k, v in result["by_program_length"].items()} == {s: steps.count(s) for s in set(steps)}
    assert sorted(result["figures"]) == ["ablations.png", "accuracy_by_length.png", "film_embedding.png",
                                         "film_histograms.png"]
    for name in result["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_and_fast_agree(analyzed):
    ref, fast = analyzed["reference"][0], analyzed["fast"][0]
    for name in ref["ablations"]:  # the same weights, fp32: the same predictions under every ablation
        assert ref["ablations"][name]["accuracy"] == fast["ablations"][name]["accuracy"], name
    for r, f in zip(ref["film"]["per_block"], fast["film"]["per_block"]):
        assert r["relu_off"] == f["relu_off"]
        for name in ("gamma", "beta"):
            assert r[name]["histogram"]["counts"] == f[name]["histogram"]["counts"]
            assert r[name]["mean"] == pytest.approx(f[name]["mean"], rel=1e-5, abs=1e-6)


def test_data_without_programs(film_run, generated_clevr, tmp_path):
    data = tmp_path / "noprog"
    shutil.copytree(generated_clevr, data, ignore=shutil.ignore_patterns(".fastfilm_cache"))
    val = data / "questions" / "CLEVR_val_questions.json"
    body = json.loads(val.read_text())
    for x in body["questions"]:
        del x["program"]
    val.write_text(json.dumps(body))
    result = _analyze(film_run, data, tmp_path / "a", "--reference", "--no-ablations")
    assert result["by_program_length"] is None and "no question has a program" in result["program_length_note"]
    assert sum(v["count"] for v in result["by_question_length"].values()) == 16
    # Types still come from the families (learned on the train split's programs).
    assert set(result["ablations"]["none"]["per_type"]) <= {"exist", "query_attribute", "compare_attribute"}
    assert "accuracy_by_length.png" in result["figures"]


def test_max_questions_embedding_sample_and_a_cache_as_data(film_run, cache, tmp_path):
    # DATA is the cache (as the quickstart's runs use): programs are read from the data it was built from.
    result = _analyze(film_run, cache, tmp_path / "a", "--reference", "--no-ablations",
                      "--max-questions", "10", "--embed-points", "4", "--bins", "7")
    assert result["questions"] == 10
    assert len(result["embedding"]["questions"]) == 4 and np.array(result["embedding"]["coords"]).shape == (2, 4, 2)
    for block in result["film"]["per_block"]:
        assert len(block["gamma"]["histogram"]["counts"]) == 7
        assert sum(block["gamma"]["histogram"]["counts"]) == 10 * 16
    assert sum(v["count"] for v in result["by_program_length"].values()) == 10


def test_film_statistics_counts():
    gamma = np.array([[[-1.0, 0.05, 2.0, 3.0]], [[0.0, -0.01, 1.0, 4.0]]], np.float32)  # [Q=2, F=1, C=4]
    beta = -gamma
    (s,) = film_statistics(gamma, beta, np.array([[1], [3]]), near_zero=0.1, bins=4)
    assert s["gamma"]["negative"] == 2 / 8 and s["gamma"]["near_zero"] == 3 / 8 and s["beta"]["negative"] == 5 / 8
    assert s["relu_off"] == 4 / 8
    assert s["gamma"]["histogram"]["counts"] == [4, 1, 1, 2] and s["gamma"]["histogram"]["edges"] == [-1, 0.25, 1.5,
                                                                                                    2.75, 4]
    assert (s["gamma"]["min"], s["gamma"]["max"]) == (-1, 4)
    assert film_statistics(gamma, beta, None, near_zero=0.1, bins=4)[0]["relu_off"] is None


def test_pca_embedding_finds_the_direction_questions_vary_along():
    rng = np.random.default_rng(0)
    t = rng.normal(size=40).astype(np.float32)  # one number per question, spread along a fixed direction
    direction = rng.normal(size=(2, 8)).astype(np.float32)
    gamma = (1 + t[:, None, None] * direction[None, :1]).repeat(2, 1)  # [40, 2, 8]
    beta = (t[:, None, None] * direction[None, 1:]).repeat(2, 1)
    coords = embed(gamma, beta, np.arange(40), "pca", seed=0)
    assert coords.shape == (2, 40, 2)
    assert abs(np.corrcoef(coords[0, :, 0], t)[0, 1]) == pytest.approx(1, abs=1e-5)
    assert np.abs(coords[0, :, 1]).max() < 1e-4
    rows = sample_rows(40, 10, seed=3)
    assert len(rows) == 10 and np.array_equal(rows, np.unique(rows)) and np.array_equal(rows, sample_rows(40, 10, 3))


def test_tsne_embedding_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    gamma = np.random.default_rng(0).normal(size=(30, 1, 4)).astype(np.float32)
    coords = embed(gamma, gamma, np.arange(30), "tsne", seed=0)
    assert coords.shape == (1, 30, 2) and np.isfinite(coords).all()


def test_non_film_run_and_missing_matplotlib_are_user_errors(cache, generated_clevr, tmp_path, capsys, monkeypatch):
    qonly = _save_run(tmp_path / "qonly", cache, arch="question_only")
    assert main(["analyze", str(qonly), str(generated_clevr), "--device", "cpu"]) == 2
    assert "analyze needs a FiLM model" in capsys.readouterr().err
    from fastfilm.analysis import figures

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(UserError, match=r"pip install 'fastfilm\[plot\]'"):
        figures.require()
