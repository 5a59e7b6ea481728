"""`fastfilm analyze RUN DATA [--split val] --out DIR`: the paper's analyses of a trained FiLM run.

DIR (default RUN/analysis_SPLIT) gets:
    analysis.json            every number behind the figures
    film_histograms.png      gamma and beta of each FiLM-ed block over the split's questions; how often
                             gamma is negative or near zero and the FiLM-ed ReLU shuts a feature map off
    film_embedding.png       each question's (gamma, beta) per block in 2-D (t-SNE, or PCA without
                             scikit-learn), coloured by question type and by family
    ablations.png            test-time ablations: beta := 0, gamma := 1, means, Gaussian noise
    accuracy_by_length.png   accuracy by question length and by program length (where programs exist)
Works on the reference model and the fast path alike (fastfilm/analysis/film_stats.py).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch.nn as nn

from fastfilm.analysis import figures
from fastfilm.config import AnalyzeConfig
from fastfilm.analysis.film_stats import (NONE, FiLMTap, accuracy_by, embed, film_statistics, make_ablations,
                                          resolve_embedding, run_pass, sample_rows)
from fastfilm.analysis.steps import program_lengths, question_words
from fastfilm.data.cache import SplitData
from fastfilm.data.loader import Loader
from fastfilm.engine.build import load as load_checkpoint_model
from fastfilm.engine.build import split_for
from fastfilm.engine.metrics import accuracy_report, format_table
from fastfilm.engine.options import resolve
from fastfilm.engine.predictor import Predictor
from fastfilm.errors import UserError
from fastfilm.hardware import resolve_device


@dataclasses.dataclass
class Loaded:
    model: nn.Module      # eval mode, on `device`
    meta: dict            # the checkpoint's meta: model_config, vocab, arch, ...
    split: SplitData
    forward: object       # (images, questions, lengths) -> logits [B, A]: eval, inference_mode, autocast
    device: object


def load(cfg: AnalyzeConfig) -> Loaded:
    """Checkpoint -> model, DATA -> cached split, and the eager forward."""
    device = resolve_device(cfg.device)
    # Eager: the hooks that observe and replace (gamma, beta) run Python that compile would not keep.
    ex = resolve(dataclasses.replace(cfg.fast, compile=False), device)
    loaded = load_checkpoint_model(cfg.run, ex)
    model, meta = loaded.model, loaded.meta
    if getattr(model, "film_generator", None) is None:
        raise UserError(f"{cfg.run}: a {meta.get('arch', '?')} model without FiLM-ed blocks; analyze needs a FiLM "
                        "model (--arch film with at least one FiLM-ed block)")
    return Loaded(model, meta, split_for(loaded, cfg.data, cfg.split), Predictor(model, ex, vocab=loaded.vocab), device)


def _noise_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--noise {text!r}: give comma-separated numbers, e.g. 0.1,0.5,1") from None
    if any(s <= 0 for s in scales):
        raise UserError(f"--noise {text!r}: standard deviations must be > 0")
    return scales


def analyze(cfg: AnalyzeConfig, loaded: Loaded, *, progress: bool = False) -> dict:
    """Every number of the analysis (what analysis.json holds; see the module docstring)."""
    from tqdm import tqdm

    from fastfilm.data.vocab import Vocab

    noise = _noise_scales(cfg.noise)
    method = resolve_embedding(cfg.embedding)
    split, model = loaded.split, loaded.model
    loader = Loader(split, cfg.batch_size, shuffle=False, device=loaded.device, limit=cfg.max_questions)
    n = loader.num_questions
    answers, types, families = (np.asarray(a[:n]) for a in (split.answers, split.types, split.families))
    answered = bool((answers >= 0).any())
    num_ablations = (5 + 2 * len(noise)) if cfg.ablations and answered else 0
    blocks = [i for i, f in enumerate(model.filmed) if f]
    with FiLMTap(model, n) as tap, tqdm(total=len(loader) * (1 + num_ablations), desc="analyze: none",
                                        disable=not progress, leave=False) as bar:
        preds = run_pass(loaded.forward, loader, tap, NONE, lambda: bar.update(1))
        stats = film_statistics(tap.gamma, tap.beta, tap.relu_off, near_zero=cfg.near_zero, bins=cfg.bins)
        rows = sample_rows(n, cfg.embed_points, cfg.seed)
        bar.set_description(f"analyze: {method} embedding")
        coords = embed(tap.gamma, tap.beta, rows, method, cfg.seed)
        out: dict = {
            "run": str(cfg.run), "data": str(cfg.data), "split": split.name, "questions": n,
            "model": type(model).__name__, "amp": cfg.fast.amp,
            "film": {"blocks": blocks, "channels": int(tap.gamma.shape[2]), "near_zero": cfg.near_zero,
                     "per_block": [{"block": b, **s} for b, s in zip(blocks, stats)],
                     "relu_off_note": "" if tap.relu_off is not None else
                     "not measured: FiLM does not sit right before the ReLU (film_position != after_bn)"},
            "embedding": {"method": method, "questions": rows.tolist(), "types": types[rows].tolist(),
                          "families": families[rows].tolist(), "coords": np.round(coords, 4).tolist()},
            "ablations": {}, "ablations_note": "",
        }
        if not answered:
            out["ablations_note"] = f"split {split.name!r} has no answers: no accuracies"
        elif not cfg.ablations:
            out["ablations_note"] = "skipped (--no-ablations)"
        if answered:
            out["ablations"]["none"] = {**accuracy_report(preds, answers, types, families), "changed": 0.0}
        if num_ablations:
            for ablation in make_ablations(tap.gamma.mean(0), tap.beta.mean(0), noise, cfg.seed)[1:]:
                bar.set_description(f"analyze: {ablation.name}")
                p = run_pass(loaded.forward, loader, tap, ablation, lambda: bar.update(1))
                out["ablations"][ablation.name] = {
                    **accuracy_report(p, answers, types, families), "changed": float((p != preds).mean()),
                    "noise_on": ablation.noise_on, "noise_std": ablation.noise_std}
    out["by_question_length"] = accuracy_by(question_words(split, n), preds, answers)
    steps, why = program_lengths(cfg.data, split, Vocab(**loaded.meta["vocab"]), n, progress)
    out["by_program_length"] = accuracy_by(steps, preds, answers) if steps is not None else None
    out["program_length_note"] = why
    return out


def write_figures(result: dict, out: Path) -> list[Path]:
    """The PNGs of an analysis.json result, into `out`."""
    film = result["film"]
    emb = result["embedding"]
    drawn = [("film_histograms.png", figures.film_histograms(film["per_block"], film["blocks"])),
             ("film_embedding.png", figures.film_embedding(np.array(emb["coords"]), np.array(emb["types"]),
                                                           np.array(emb["families"]), film["blocks"], emb["method"]))]
    if result["ablations"]:
        drawn.append(("ablations.png", figures.ablation_chart(result["ablations"])))
    if result["by_question_length"]:
        drawn.append(("accuracy_by_length.png",
                      figures.accuracy_by_length(result["by_question_length"], result["by_program_length"])))
    return [figures.save(fig, out / name) for name, fig in drawn]


def _summary(result: dict) -> str:
    lines = [f"{result['split']}: {result['questions']} questions, {result['model']}"]
    for b in result["film"]["per_block"]:
        g, be = b["gamma"], b["beta"]
        off = f", ReLU off for {100 * b['relu_off']:.1f}% of feature maps" if b["relu_off"] is not None else ""
        lines.append(f"  block {b['block']}: gamma {g['min']:.2f}..{g['max']:.2f}, {100 * g['negative']:.1f}% < 0, "
                     f"{100 * g['near_zero']:.1f}% near 0; beta {be['min']:.2f}..{be['max']:.2f}, "
                     f"{100 * be['negative']:.1f}% < 0{off}")
    if result["ablations"]:
        lines += ["", "Test-time ablations, accuracy %:", format_table(result["ablations"])]
    elif result["ablations_note"]:
        lines.append(f"ablations: {result['ablations_note']}")
    if result["program_length_note"]:
        lines.append(f"program lengths: {result['program_length_note']}")
    return "\n".join(lines)


def run(cfg: AnalyzeConfig) -> int:
    from fastfilm.atomic import write_json

    figures.require()  # before minutes of work whose figures would then fail
    if cfg.bins < 1 or cfg.batch_size < 1:
        raise UserError("--bins and --batch-size must be >= 1")
    run_path = Path(cfg.run)
    out = Path(cfg.out) if cfg.out else (run_path if run_path.is_dir() else run_path.parent) / f"analysis_{cfg.split}"
    loaded = load(cfg)
    result = analyze(cfg, loaded, progress=sys.stderr.isatty())
    paths = write_figures(result, out)
    result["figures"] = [p.name for p in paths]
    write_json(out / "analysis.json", result)
    print(_summary(result))
    print(f"\nwrote {out / 'analysis.json'} and " + ", ".join(p.name for p in paths))
    return 0
