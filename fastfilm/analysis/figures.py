"""Figures of the analyses and of training runs, drawn from the numbers that go into JSON.

Every function returns a matplotlib Figure built with the object-oriented API (no pyplot, no
global backend switch), so callers and tests can read its axes; `save` writes a PNG atomically.
matplotlib is the `plot` extra: it is imported when a figure is drawn, and its absence is a
UserError that says how to install it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fastfilm.atomic import atomic_write
from fastfilm.data.types import QUESTION_TYPES, TYPE_TITLES
from fastfilm.errors import UserError


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure  # the `plot` extra
    except ImportError:
        raise UserError("figures need matplotlib: pip install 'fastfilm[plot]' (or pip install matplotlib)") from None
    return Figure(figsize=(width, height), layout="constrained")


def require() -> None:
    """Raise the UserError about a missing matplotlib now, before long work whose figures need it."""
    _figure(1, 1)


def save(fig, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (temp file, then rename)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _type_title(name: str) -> str:
    return TYPE_TITLES.get(name, name)


# ---------------------------------------------------------------- analyze

def film_histograms(stats: list[dict], blocks: list[int]) -> object:
    """One row per FiLM-ed block: gamma's and beta's histograms over every (question, channel).
    stats: film_stats.film_statistics(...); blocks: the ResBlock index of each entry."""
    fig = _figure(9, 2.4 * len(stats))
    axes = fig.subplots(len(stats), 2, squeeze=False)
    for row, (entry, block) in zip(axes, zip(stats, blocks)):
        for ax, name in zip(row, ("gamma", "beta")):
            s = entry[name]
            edges, counts = np.array(s["histogram"]["edges"]), np.array(s["histogram"]["counts"])
            ax.stairs(counts, edges, fill=True, color="tab:blue" if name == "gamma" else "tab:orange")
            ax.axvline(0, color="black", linewidth=0.6)
            note = f"{100 * s['negative']:.0f}% < 0"
            if name == "gamma":
                note += f", {100 * s['near_zero']:.0f}% near 0"
                if entry["relu_off"] is not None:
                    note += f", ReLU off for {100 * entry['relu_off']:.0f}% of maps"
            ax.set_title(f"block {block}: {name} ({note})", fontsize=9)
            ax.set_ylabel("(question, channel) pairs", fontsize=8)
    return fig


def film_embedding(coords: np.ndarray, types: np.ndarray, families: np.ndarray, blocks: list[int],
                   method: str) -> object:
    """Each question's (gamma, beta) of each block in 2-D, coloured by type (left) and family (right).
    coords: [F, N, 2]; types, families: [N] ids (-1 unknown); method: 'tsne' or 'pca'."""
    label = "t-SNE" if method == "tsne" else "PCA (scikit-learn not installed: no t-SNE)"
    fig = _figure(10, 4 * len(blocks))
    from matplotlib import colormaps  # after _figure, which explains a missing matplotlib
    fig.suptitle(f"{label} of each question's FiLM parameters (gamma, beta), {coords.shape[1]} questions")
    axes = fig.subplots(len(blocks), 2, squeeze=False)
    tab = colormaps["tab10"]
    fams = np.unique(families)
    for (ax_type, ax_fam), xy, block in zip(axes, coords, blocks):
        for k, t in enumerate([*QUESTION_TYPES, "unknown"]):
            sel = types == (k if t != "unknown" else -1)
            if sel.any():
                ax_type.scatter(xy[sel, 0], xy[sel, 1], s=6, color=tab(k), label=_type_title(t))
        ax_type.set_title(f"block {block}: by question type", fontsize=9)
        ax_type.legend(fontsize=7, markerscale=2)
        # Families (90 in CLEVR) get a colour each from a continuous map, without a legend.
        rank = np.searchsorted(fams, families)
        ax_fam.scatter(xy[:, 0], xy[:, 1], s=6, c=rank, cmap="nipy_spectral", vmin=0, vmax=max(len(fams) - 1, 1))
        ax_fam.set_title(f"block {block}: by family ({len(fams)} families)", fontsize=9)
    return fig


def ablation_chart(ablations: dict[str, dict]) -> object:
    """Overall accuracy under each replacement ablation (left) and against the noise's std (right).
    ablations: name -> {"accuracy", "noise_on", "noise_std", ...}, "none" included."""
    fig = _figure(11, 4)
    left, right = fig.subplots(1, 2)
    fixed = {k: v for k, v in ablations.items() if not v.get("noise_on")}
    names = list(fixed)
    bars = left.barh(names, [100 * fixed[k]["accuracy"] for k in names], color="tab:gray")
    left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("accuracy, %")
    left.set_title("test-time ablations")
    base = 100 * ablations["none"]["accuracy"]
    for which, color in (("gamma", "tab:blue"), ("beta", "tab:orange")):
        rows = sorted((v["noise_std"], 100 * v["accuracy"]) for v in ablations.values() if v.get("noise_on") == which)
        if rows:
            x, y = zip(*[(0.0, base), *rows])
            right.plot(x, y, marker="o", color=color, label=f"noise on {which}")
    right.set_xlabel("std of the Gaussian noise added")
    right.set_ylabel("accuracy, %")
    right.set_title("noise on gamma or beta")
    if right.lines:
        right.legend()
    return fig


def accuracy_by_length(by_words: dict[str, dict], by_program: dict[str, dict] | None) -> object:
    """Accuracy (line) and question count (bars) per question length, and per program length if known.
    by_*: {length: {"accuracy", "count"}}."""
    panels = [("question length, words", by_words)] + ([("program length, functions", by_program)]
                                                        if by_program else [])
    fig = _figure(5.5 * len(panels), 3.8)
    for ax, (xlabel, groups) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        x = [int(k) for k in groups]
        counts = ax.twinx()
        counts.bar(x, [g["count"] for g in groups.values()], color="tab:gray", alpha=0.3)
        counts.set_ylabel("questions", color="tab:gray")
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot(x, [100 * g["accuracy"] for g in groups.values()], marker="o", color="tab:blue")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy, %")
    return fig


# ---------------------------------------------------------------- runs

# metrics.jsonl keys -> panel title; val_loss is drawn only where a run recorded it.
_CURVES = (("accuracy", ("train_accuracy", "val_accuracy")), ("loss", ("train_loss", "val_loss")),
           ("training questions/s", ("train_questions_per_s",)))


def learning_curves(runs: dict[str, list[dict]]) -> object:
    """Runs overlaid, one colour each (legend: the run's name): accuracy and loss (train solid, val
    dashed), training questions/s, and one panel per question type with its val accuracy.
    runs: name -> metrics.jsonl lines, each with "x" (epochs done, fractional for a cut epoch)."""
    types = sorted({t for lines in runs.values() for line in lines for t in line.get("val_per_type") or {}},
                   key=lambda t: QUESTION_TYPES.index(t) if t in QUESTION_TYPES else len(QUESTION_TYPES))
    n_panels = len(_CURVES) + len(types)
    cols = 3
    fig = _figure(13, 3.4 * -(-n_panels // cols))
    from matplotlib import colormaps  # after _figure, which explains a missing matplotlib
    from matplotlib.ticker import MaxNLocator
    axes = fig.subplots(-(-n_panels // cols), cols, squeeze=False).ravel()
    tab = colormaps["tab10"]
    for k, (name, lines) in enumerate(runs.items()):
        color = tab(k % 10)
        x = [line["x"] for line in lines]
        for ax, (title, keys) in zip(axes, _CURVES):
            for key in keys:
                scale = 100 if key.endswith("accuracy") else 1
                pts = [(xi, scale * line[key]) for xi, line in zip(x, lines) if line.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), color=color, marker=".", linestyle="--" if key.startswith("val") else "-",
                            label=f"{name} {key.split('_')[0]}" if len(keys) > 1 else name)
            ax.set_title(title, fontsize=10)
        for ax, t in zip(axes[len(_CURVES):], types):
            pts = [(xi, 100 * line["val_per_type"][t]) for xi, line in zip(x, lines)
                   if t in (line.get("val_per_type") or {})]
            if pts:
                ax.plot(*zip(*pts), color=color, marker=".", linestyle="--", label=name)
            ax.set_title(f"val accuracy: {_type_title(t)}", fontsize=10)
    for k, ax in enumerate(axes[:n_panels]):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if k == 0 or k >= len(_CURVES):  # accuracy panels
            ax.set_ylabel("accuracy, %")
            ax.set_ylim(0, 100)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig


def per_type_bars(rows: dict[str, dict], title: str = "") -> object:
    """Grouped bars: for each model (legend) its accuracy overall and per question type, in %.
    rows: model name -> {"accuracy", "per_type"} (the quickstart's results.json rows)."""
    cols = ["overall", *QUESTION_TYPES]
    titles = ["Overall", *[TYPE_TITLES[t] for t in QUESTION_TYPES]]
    fig = _figure(11, 4)
    from matplotlib import colormaps  # after _figure, which explains a missing matplotlib
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    tab = colormaps["tab10"]
    for k, (name, report) in enumerate(rows.items()):
        values = [report.get("accuracy") if c == "overall" else (report.get("per_type") or {}).get(c) for c in cols]
        x = [i + (k - (len(rows) - 1) / 2) * width for i, v in enumerate(values) if v is not None]
        ax.bar(x, [100 * v for v in values if v is not None], width, label=name, color=tab(k % 10))
    ax.set_xticks(range(len(cols)), titles)
    ax.set_ylabel("accuracy, %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig
