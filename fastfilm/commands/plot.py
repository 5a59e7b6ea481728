"""`fastfilm plot RUN [RUN ...] --out FILE.png`: learning curves of runs, overlaid.

Reads each run's metrics.jsonl (one line per epoch, written by `fastfilm train`; the source
of truth) and draws accuracy, loss, training questions/s and per-type validation accuracy
against epochs, one colour per run (legend: the run directory's name).
"""
from __future__ import annotations

import json
from pathlib import Path

from fastfilm.analysis import figures
from fastfilm.config import PlotConfig
from fastfilm.errors import UserError


def read_metrics(run: str | Path) -> list[dict]:
    """The lines of RUN/metrics.jsonl, each with "x": epochs done at that line. A line written
    when training stopped inside an epoch (complete_epoch false) is placed at the share of the
    epoch's steps it ran, so that it does not sit on top of the previous epoch."""
    path = Path(run) / "metrics.jsonl" if Path(run).is_dir() or not Path(run).exists() else Path(run)
    if not path.exists():
        raise UserError(f"{run}: no metrics.jsonl (a run directory written by `fastfilm train` has one per run)")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(line, dict) or not isinstance(line.get("epoch"), int):
            raise UserError(f"{path}, line {number}: not a metrics line (no integer 'epoch')")
        lines.append(line)
    if not lines:
        raise UserError(f"{path}: empty; the run has not finished an epoch or a validation yet")
    complete = [ln for ln in lines if ln.get("complete_epoch", True) and ln["epoch"] > 0 and "step" in ln]
    steps_per_epoch = complete[-1]["step"] / complete[-1]["epoch"] if complete else None
    prev_step = 0
    for ln in lines:
        if ln.get("complete_epoch", True) or steps_per_epoch is None or "step" not in ln:
            ln["x"] = ln["epoch"] if ln.get("complete_epoch", True) else ln["epoch"] + 0.5
        else:
            ln["x"] = ln["epoch"] + min((ln["step"] - prev_step) / steps_per_epoch, 1.0)
        prev_step = ln.get("step", prev_step)
    return lines


def _names(runs: tuple[str, ...]) -> list[str]:
    """Legend names: each run directory's name, with its parent where two names clash."""
    paths = [Path(r).resolve() for r in runs]
    names = [p.name if p.is_dir() or not p.suffix else p.parent.name for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def plot(cfg: PlotConfig):
    """The Figure of cfg.runs (matplotlib.figure.Figure)."""
    if not cfg.runs:
        raise UserError("give at least one run directory")
    figures.require()
    return figures.learning_curves({name: read_metrics(run) for name, run in zip(_names(cfg.runs), cfg.runs)})


def run(cfg: PlotConfig) -> int:
    out = figures.save(plot(cfg), cfg.out)
    print(f"wrote {out}")
    return 0
