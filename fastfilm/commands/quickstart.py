"""`fastfilm quickstart`: generate a small CLEVR-style dataset, train FiLM and the Table 1
baselines on it, and print the per-type table. Sized to finish in under 10 minutes on a
2-core CPU (README has the measured table)."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from fastfilm.atomic import write_json
from fastfilm.config import QuickstartConfig, model_config, resolve_preset, validate_training
from fastfilm.data.cache import load_split, prepare
from fastfilm.data.generate import run as generate
from fastfilm.engine.metrics import accuracy_report, format_table
from fastfilm.engine.rundir import check_new_run
from fastfilm.engine.trainer import train
from fastfilm.hardware import resolve_device
from fastfilm.model import QTypeBaseline
from fastfilm.errors import UserError


def _generate(cfg: QuickstartConfig, data: Path) -> None:
    done = data / "questions" / "CLEVR_val_questions.json"
    if done.exists():
        print(f"[quickstart] reusing {data}", file=sys.stderr)
        return
    generate(dataclasses.replace(cfg.generate, out=str(data), seed=cfg.train.seed))


def _qtype(cache: Path) -> dict:
    train_split, val = load_split(cache, "train"), load_split(cache, "val")
    base = QTypeBaseline().fit(train_split.answers, train_split.families, train_split.types)
    preds = base.predict(val.families, val.types)
    return accuracy_report(preds, val.answers, val.types, val.families)


def _bar_chart(rows: dict[str, dict], path: Path, title: str) -> None:
    """The per-type table as grouped bars; without matplotlib (the `plot` extra) a note instead."""
    from fastfilm.analysis.figures import per_type_bars, save

    try:
        save(per_type_bars(rows, title), path)
    except UserError as e:  # the table and results.json are the result; the chart is a view of them
        print(f"[quickstart] no bar chart: {e}", file=sys.stderr)


# The models trained, in training order, with their Table 1 titles.
ARCHS = {"question_only": "GRU (question only)", "cnn_gru": "CNN+GRU", "film": "CNN+GRU+FiLM"}

# Held back from FiLM's budget for what follows its training: the final evaluation and the table.
_FINISH_S = 15.0


def film_minutes(cfg: QuickstartConfig, elapsed_s: float) -> float:
    """FiLM's training budget when it starts after `elapsed_s`: cfg.film_minutes, cut to what
    max_total_minutes leaves (at least a few seconds, so that FiLM still trains a little)."""
    if cfg.max_total_minutes <= 0:
        return cfg.film_minutes
    left = (cfg.max_total_minutes * 60 - elapsed_s - _FINISH_S) / 60
    return max(min(cfg.film_minutes, left), 0.05)


def run(cfg: QuickstartConfig) -> int:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    data = out / "data"
    preset = resolve_preset(cfg.train.preset, resolve_device(cfg.train.device).type)
    # Refused before any work: a model that cannot train at this batch size, runs of an
    # earlier quickstart that --overwrite was not given to replace.
    validate_training(dataclasses.replace(cfg.train, data=str(data)), model_config(preset))
    for arch in ARCHS:
        check_new_run(out / "runs" / arch, cfg.train.overwrite)
    _generate(cfg, data)
    cache = prepare(data, model_config(preset).image_size)
    print(f"[quickstart] data ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    rows: dict[str, dict] = {"Q-type": _qtype(cache)}
    minutes_of = {"question_only": cfg.question_only_minutes, "cnn_gru": cfg.cnn_gru_minutes, "film": cfg.film_minutes}
    runs = [(arch, title, minutes_of[arch]) for arch, title in ARCHS.items()]
    for arch, title, minutes in runs:
        if arch == "film":
            minutes = film_minutes(cfg, time.perf_counter() - t0)
            if minutes < cfg.film_minutes:
                print(f"[quickstart] FiLM gets {minutes:.2f} min instead of {cfg.film_minutes:g} to end within "
                      f"--max-total-minutes {cfg.max_total_minutes:g}", file=sys.stderr)
        tcfg = dataclasses.replace(cfg.train, data=str(cache), out=str(out / "runs" / arch), max_minutes=minutes)
        print(f"[quickstart] training {title} for up to {minutes:g} min", file=sys.stderr)
        metrics = train(tcfg, model_config(preset, arch=arch))
        rows[title] = {"accuracy": metrics["val_accuracy"], "per_type": metrics["per_type"]}

    table = format_table(rows)
    elapsed = time.perf_counter() - t0
    print(f"\nHeld-out (val) accuracy, %, after {elapsed / 60:.1f} min on this machine:\n{table}")
    write_json(out / "results.json", {"rows": rows, "elapsed_s": elapsed, "config": dataclasses.asdict(cfg)})
    _bar_chart(rows, out / "results.png", f"Held-out (val) accuracy after {elapsed / 60:.1f} min")
    film, qonly = rows["CNN+GRU+FiLM"]["accuracy"], rows["GRU (question only)"]["accuracy"]
    print(f"\nFiLM - question-only: {100 * (film - qonly):+.1f} points. Results: {out / 'results.json'}")
    return 0
