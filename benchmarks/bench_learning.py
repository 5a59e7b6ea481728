"""Issue 12's time-to-accuracy benchmark: how much a preset learns per minute, and whether its
evaluations can be trusted.

    python benchmarks/bench_learning.py recipes DATA [DATA ...] --preset cpu --minutes 1.5 --seeds 0,1 \\
        --json benchmarks/results/learning_cpu.json
    python benchmarks/bench_learning.py evaluation DATA [DATA ...] --preset cpu --epochs 5 \\
        --json benchmarks/results/learning_eval_cpu.json
    python benchmarks/bench_learning.py speed DATA --recipes default,batch_size=128 --threads 2 \\
        --max-train-questions 16000 --repeats 3
    python benchmarks/bench_learning.py plot benchmarks/results/learning_cpu.json     # -> .png beside it
    python benchmarks/bench_learning.py summary benchmarks/results/learning_cpu.json  # summary recomputed

`recipes`: every recipe (a name from RECIPES, or ad hoc TrainConfig overrides such as
`batch_size=128+lr=2e-3`; `default` is the preset's own recipe) trains on every dataset for a
time budget, once per seed; each epoch's validation accuracy is recorded against wall-clock
time and against questions seen, with the eval-mode gap and the validation spread, and the
summary gives per dataset and recipe the final accuracy, the questions seen, the largest
eval-mode gap and the largest fall of val accuracy between epochs. --parallel says what runs in
parallel processes (--threads torch threads each): seeds (each through the recipes in order),
recipes, or all, so that a shared machine's load falls on the runs compared alike; the load
average is recorded per run.

`evaluation`: one training run per dataset, evaluated after every epoch in several ways at
once, on the same weights: training's running averages (momentum 0.1, the run's own, and 0.01
and 0.3, replayed from the batch statistics each step left), precise BN from 10, 50 or 200
batches, and an exponential average of the weights with precise BN. For each: validation
accuracy and the eval-mode gap (train-mode minus eval-mode accuracy on 1,024 training
questions), and what it cost. Training itself is the same for all, so the comparison is paired.

`speed`: training questions/s of each recipe, the recipes alternating round by round in one
process, medians and ratios to the first (what a recipe's batch size or grouping costs or buys).

DATA: CLEVR-layout directories (e.g. made by `fastfilm generate`); the name of each is its kind.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402

from fastfilm.atomic import write_json  # noqa: E402

# Every run trains as the quickstart does: the preset's recipe (config.TRAIN_PRESETS), no
# compile, no early stopping; each recipe changes only what it names.
BASE = dict(compile=False, patience=0, epochs=1000)
RECIPES: dict[str, dict] = {
    "default": {},                                               # TRAIN_PRESETS[preset]
    "constant": dict(lr_schedule="constant", warmup="0"),
    "cosine": dict(lr_schedule="cosine", warmup="5%"),
    "linear": dict(lr_schedule="linear", warmup="5%"),
    "cosine-2e-3": dict(lr_schedule="cosine", warmup="5%", lr=2e-3),
}


def recipe(name: str) -> dict:
    """A recipe's TrainConfig overrides: a name from RECIPES, or ad hoc `key=value[+key=value]`
    with TrainConfig field names (`lr=2e-3+lr_schedule=linear`), each value of its field's type."""
    if name in RECIPES:
        return RECIPES[name]
    from fastfilm.config import TrainConfig

    # Each field's type: float for `float | None` (None: the preset's value), str for str.
    types = {name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
             for name, hint in typing.get_type_hints(TrainConfig).items()}
    out = {}
    for part in name.split("+"):
        key, eq, value = part.partition("=")
        if not eq or key not in types:
            raise SystemExit(f"recipe {name!r}: {part!r} is neither a recipe ({', '.join(RECIPES)}) nor "
                             "key=value with a TrainConfig field")
        out[key] = types[key](value)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("recipes", "evaluation", "speed", "plot", "summary"))
    p.add_argument("data", nargs="+", help="datasets (recipes, evaluation) or a results JSON (plot)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--recipes", default="default,constant,cosine,linear",
                   help=f"comma-separated: names from {', '.join(RECIPES)}, or ad hoc key=value[+key=value] "
                        "TrainConfig overrides (lr=2e-3+lr_schedule=linear)")
    p.add_argument("--minutes", type=float, default=1.5, help="time budget of each recipes run")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each evaluation run")
    p.add_argument("--max-train-questions", type=int, default=10000,
                   help="training questions per epoch (small epochs: several points per curve)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--repeats", type=int, default=3, help="speed: alternating rounds per recipe (median reported)")
    p.add_argument("--parallel", choices=("seeds", "recipes", "all"), default="seeds",
                   help="what runs at the same time (recipes: the recipes of one seed share the machine's load; "
                        "all: every recipe and seed at once, so that all runs of a dataset share it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (a loaded 2-core machine: 1)")
    p.add_argument("--json", default="",
                   help="results file (default: benchmarks/results/learning_<part>_<preset>.json)")
    return p.parse_args(argv)


def _load() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- recipes

def _curve(run: Path, batch_size: int) -> list[dict]:
    keep = ("epoch", "step", "elapsed_s", "val_accuracy", "train_accuracy", "eval_gap", "val_spread",
            "val_smoothed", "lr", "train_questions_per_s", "bn_stats_s", "complete_epoch")
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.append({**{k: d.get(k) for k in keep}, "questions": d["step"] * batch_size})
    return out


def _recipes_worker(job: tuple) -> list[dict]:
    seed, datasets, recipes, preset, minutes, limit, threads, tmp = job
    import torch

    from fastfilm.config import TRAIN_PRESETS, TrainConfig, model_config, train_recipe
    from fastfilm.engine.trainer import train

    torch.set_num_threads(threads)
    results = []
    for data in datasets:
        for name in recipes:
            out = Path(tmp) / f"{Path(data).name}-{name}-{seed}"
            cfg = TrainConfig(data=data, out=str(out), preset=preset, seed=seed, max_minutes=minutes,
                              max_train_questions=limit, **{**BASE, **recipe(name)})
            load0 = _load()
            metrics = train(cfg, model_config(preset), progress=False)
            resolved = train_recipe(cfg)
            curve = _curve(out, resolved.batch_size)
            results.append({"data": Path(data).name, "recipe": name, "seed": seed, "overrides": recipe(name),
                            **{k: getattr(resolved, k) for k in TRAIN_PRESETS["paper"]},
                            "final_val": curve[-1]["val_accuracy"], "best_val": metrics["val_accuracy"],
                            "questions": curve[-1]["questions"], "elapsed_s": metrics["elapsed_s"],
                            "load_average": [load0, _load()], "curve": curve})
            print(f"[{seed}] {Path(data).name} {name}: final val {100 * curve[-1]['val_accuracy']:.1f}% "
                  f"after {curve[-1]['questions']} questions", file=sys.stderr, flush=True)
    return results


def _stability(runs: list[dict]) -> dict:
    """The issue's two checks over the complete epochs of `runs`, in points: the eval-mode gap
    (mean and largest |gap|, and the largest positive one: eval mode below train mode), and the
    largest fall of val accuracy from one epoch to the next while training accuracy rose."""
    gaps, drops = [], []
    for r in runs:
        epochs = [p for p in r["curve"] if p.get("complete_epoch", True)]
        gaps += [p["eval_gap"] for p in epochs if p.get("eval_gap") is not None]
        drops += [a["val_accuracy"] - b["val_accuracy"] for a, b in zip(epochs, epochs[1:])
                  if b["train_accuracy"] >= a["train_accuracy"]]
    return {"mean_abs_eval_gap_pts": 100 * sum(map(abs, gaps)) / max(1, len(gaps)),
            "max_abs_eval_gap_pts": 100 * max(map(abs, gaps), default=0.0),
            "max_eval_gap_pts": 100 * max(gaps, default=0.0),  # eval mode below train mode
            "worst_val_drop_pts": 100 * max([0.0, *drops])}


def _summary(runs: list[dict]) -> dict:
    """Per dataset and recipe: mean (and each seed's) final val accuracy and the questions seen
    within the budget; per recipe the mean final val accuracy over datasets."""
    table: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        table.setdefault(r["data"], {}).setdefault(r["recipe"], []).append(r)
    per_data = {d: {k: {"mean": sum(x["final_val"] for x in v) / len(v), "runs": [x["final_val"] for x in v],
                        "mean_questions": sum(x["questions"] for x in v) / len(v), **_stability(v)}
                    for k, v in recipes.items()}
                for d, recipes in table.items()}
    recipes = sorted({r["recipe"] for r in runs})
    overall = {k: sum(per_data[d][k]["mean"] for d in per_data if k in per_data[d]) /
               max(1, sum(k in per_data[d] for d in per_data)) for k in recipes}
    return {"final_val": per_data, "mean_over_datasets": overall}


def run_recipes(args) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        rest = (args.preset, args.minutes, args.max_train_questions, args.threads, tmp)
        if args.parallel == "seeds":  # one process per seed, each through every recipe in order
            jobs, width = [(s, args.data, recipes, *rest) for s in seeds], len(seeds)
        else:  # one process per recipe (and per seed: all), seed by seed
            jobs = [(s, args.data, [r], *rest) for s in seeds for r in recipes]
            width = len(jobs) if args.parallel == "all" else len(recipes)
        with mp.get_context("spawn").Pool(width) as pool:
            runs = [r for part in pool.map(_recipes_worker, jobs, chunksize=1) for r in part]
    return {"part": "recipes", "preset": args.preset, "minutes": args.minutes, "threads_per_run": args.threads,
            "parallel_runs": width, "parallel": args.parallel,
            "max_train_questions": args.max_train_questions, "base": BASE,
            "recipes": {k: recipe(k) for k in recipes}, "summary": _summary(runs), "runs": runs}


# ---------------------------------------------------------------- speed

def run_speed(args) -> dict:
    """Training questions/s of each recipe: one epoch of --max-train-questions each, the recipes
    alternating round by round in this process (--threads threads), so that a shared machine's
    load falls on all of them alike; the median over --repeats rounds, and each one's ratio to
    the first recipe's."""
    import torch

    from fastfilm.config import TrainConfig, model_config
    from fastfilm.engine.trainer import train

    torch.set_num_threads(args.threads)
    recipes, data = args.recipes.split(","), args.data[0]
    samples: dict[str, list[float]] = {r: [] for r in recipes}
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        for i in range(args.repeats):
            for j, name in enumerate(recipes):
                out = Path(tmp) / f"{i}-{j}"
                cfg = TrainConfig(data=data, out=str(out), preset=args.preset, seed=i, eval_gap_questions=0,
                                  max_train_questions=args.max_train_questions, **{**BASE, "epochs": 1, **recipe(name)})
                train(cfg, model_config(args.preset), progress=False)
                line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
                samples[name].append(line["train_questions_per_s"])
                print(f"[{i}] {name}: {line['train_questions_per_s']:.0f} q/s", file=sys.stderr, flush=True)
    median = {k: statistics.median(v) for k, v in samples.items()}
    first = median[recipes[0]]
    return {"part": "speed", "preset": args.preset, "data": Path(data).name, "threads": args.threads,
            "questions_per_round": args.max_train_questions, "base": BASE, "recipes": {k: recipe(k) for k in recipes},
            "summary": {k: {"median_questions_per_s": m, "ratio_to_first": m / first} for k, m in median.items()},
            "samples": samples}


# ---------------------------------------------------------------- evaluation

ALT_MOMENTA = (0.01, 0.3)
PRECISE = (10, 50, 200)
WEIGHT_EMA = 0.998


def _evaluation_run(data: str, args, tmp: str) -> dict:
    import torch

    from fastfilm.config import TrainConfig, model_config
    from fastfilm.engine import bn_stats, distributed
    from fastfilm.engine.predictor import Predictor, predict
    from fastfilm.engine.trainer import Trainer

    class VariantTrainer(Trainer):
        """Trains as `--bn-stats running` does; evaluates every variant on the same weights."""

        def _build_learning(self):
            super()._build_learning()
            self.bns = bn_stats.batch_norms(self.model)
            self.alt = {m: [(bn.running_mean.clone(), bn.running_var.clone()) for bn in self.bns] for m in ALT_MOMENTA}
            self.ema_model = copy.deepcopy(self.model)
            self.log: list[dict] = []
            step = self.step_fn

            def tracked(*a, **kw):
                before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in self.bns]
                out = step(*a, **kw)
                with torch.no_grad():
                    for i, (bn, (m0, v0)) in enumerate(zip(self.bns, before)):
                        # The batch's statistics, from the update momentum 0.1 made.
                        bm = (bn.running_mean - 0.9 * m0) / 0.1
                        bv = (bn.running_var - 0.9 * v0) / 0.1
                        for m, stats in self.alt.items():
                            stats[i][0].lerp_(bm, m)
                            stats[i][1].lerp_(bv, m)
                    for pe, p in zip(self.ema_model.parameters(), self.model.parameters()):
                        pe.lerp_(p, 1 - WEIGHT_EMA)
                return out

            self.step_fn = tracked

        def prepare_evaluation(self):
            return {}

        def _variant(self, model, name, setup) -> dict:
            t0 = time.perf_counter()
            setup()
            cost = time.perf_counter() - t0
            fwd = (lambda b: self._forward_with(model, b))
            ht, he, n = bn_stats.train_vs_eval(model, fwd, self.gap_batches)
            preds = predict(Predictor(model, self.ex, batch_size=self.cfg.eval_batch_size), self.val_loader,
                            self.dctx.device)
            val = float((preds == self.val_split.answers).mean())
            return {"variant": name, "val_accuracy": val, "eval_gap": (ht - he) / n,
                    "train_mode_accuracy": ht / n, "eval_mode_accuracy": he / n, "setup_s": cost}

        def _forward_with(self, model, batch):
            image_index = batch.image_index if self.cfg.group_questions > 1 else None
            with self.ex.autocast():
                return model(batch.images, batch.questions, batch.lengths, image_index).float()

        def evaluate(self):
            own = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in self.bns]

            def put(stats):
                for bn, (m, v) in zip(self.bns, stats):
                    bn.running_mean.copy_(m)
                    bn.running_var.copy_(v)

            def precise(model, n):
                batches = [b for _, b in zip(range(n), self.stats_loader.epoch(1 + self.progress.epoch))]
                return lambda: bn_stats.recompute(model, lambda b: self._forward_with(model, b), batches)

            rows = [self._variant(self.model, "running 0.1", lambda: put(own))]
            rows += [self._variant(self.model, f"running {m}", lambda m=m: put(self.alt[m])) for m in ALT_MOMENTA]
            rows += [self._variant(self.model, f"precise {n}", precise(self.model, n)) for n in PRECISE]
            rows.append(self._variant(self.ema_model, f"weight EMA {WEIGHT_EMA} + precise 50",
                                      precise(self.ema_model, 50)))
            put(own)  # training goes on with its own running averages
            self.log.append({"epoch": self.progress.epoch, "step": self.progress.step, "variants": rows})
            return super().evaluate()

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(data=data, out=str(Path(tmp) / Path(data).name), preset=args.preset, seed=0,
                      max_train_questions=args.max_train_questions, bn_stats="running",
                      **{**BASE, "epochs": args.epochs})
    with distributed.session("cpu") as dctx:
        trainer = VariantTrainer(cfg, model_config(args.preset), dctx, progress=False)
        load0 = _load()
        trainer.run()
    train_acc = [json.loads(line)["train_accuracy"]
                 for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return {"data": Path(data).name, "epochs": trainer.log, "train_accuracy": train_acc,
            "load_average": [load0, _load()]}


def _evaluation_summary(runs: list[dict]) -> dict:
    """Per variant: mean |eval gap| over epochs and datasets, the largest drop of val accuracy
    between consecutive epochs, and mean val accuracy."""
    out: dict[str, dict] = {}
    for run in runs:
        names = [v["variant"] for v in run["epochs"][0]["variants"]]
        for i, name in enumerate(names):
            vals = [e["variants"][i]["val_accuracy"] for e in run["epochs"]]
            gaps = [e["variants"][i]["eval_gap"] for e in run["epochs"]]
            s = out.setdefault(name, {"abs_gap": [], "max_drop": [], "val": [], "setup_s": []})
            s["abs_gap"] += [abs(g) for g in gaps]
            s["max_drop"].append(max([a - b for a, b in zip(vals, vals[1:])] + [0.0]))
            s["val"] += vals
            s["setup_s"] += [e["variants"][i]["setup_s"] for e in run["epochs"]]
    return {k: {"mean_abs_eval_gap": sum(v["abs_gap"]) / len(v["abs_gap"]),
                "max_abs_eval_gap": max(v["abs_gap"]),
                "worst_epoch_to_epoch_drop": max(v["max_drop"]),
                "mean_val_accuracy": sum(v["val"]) / len(v["val"]),
                "mean_setup_s": sum(v["setup_s"]) / len(v["setup_s"])} for k, v in out.items()}


def run_evaluation(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_learning_") as tmp:
        with mp.get_context("spawn").Pool(len(args.data)) as pool:  # one process per dataset
            runs = pool.starmap(_evaluation_run, [(d, args, tmp) for d in args.data])
    return {"part": "evaluation", "preset": args.preset, "epochs": args.epochs, "threads_per_run": args.threads,
            "parallel_runs": len(args.data),
            "max_train_questions": args.max_train_questions, "base": BASE, "summary": _evaluation_summary(runs),
            "runs": runs}


# ---------------------------------------------------------------- plot

def plot(path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    datasets = sorted({r["data"] for r in res["runs"]})
    recipes = list(res["recipes"])
    fig, axes = plt.subplots(2, len(datasets), figsize=(max(7.5, 4.2 * len(datasets)), 7), squeeze=False)
    colors = {k: f"C{i}" for i, k in enumerate(recipes)}
    for j, data in enumerate(datasets):
        for r in (r for r in res["runs"] if r["data"] == data):
            c = r["curve"]
            acc = [100 * p["val_accuracy"] for p in c]
            label = r["recipe"] if r["seed"] == min(x["seed"] for x in res["runs"]) else None
            axes[0][j].plot([p["elapsed_s"] / 60 for p in c], acc, "-o", ms=3, color=colors[r["recipe"]], label=label,
                            alpha=0.8)
            axes[1][j].plot([p["questions"] / 1000 for p in c], acc, "-o", ms=3, color=colors[r["recipe"]],
                            label=label, alpha=0.8)
        axes[0][j].set_title(data)
        axes[0][j].set_xlabel("wall-clock minutes")
        axes[1][j].set_xlabel("questions seen (thousands)")
        for row in (0, 1):
            axes[row][j].set_ylabel("val accuracy, %")
            axes[row][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"{res['preset']} preset, {res['minutes']} min per run, {res['threads_per_run']} thread(s) x "
                 f"{res['parallel_runs']} runs at a time;\n{m['processor']}, {m['cpu_count']} cores, "
                 f"commit {m['commit']}",
                 fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=90)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part == "plot":
        print(plot(Path(args.data[0])))
        return 0
    if args.part == "summary":  # a recipes results file's summary, recomputed by this version and stored
        path = Path(args.data[0])
        res = json.loads(path.read_text())
        res["summary"] = _summary(res["runs"])
        write_json(path, res)
        print(json.dumps(res["summary"], indent=1))
        return 0
    t0 = time.perf_counter()
    payload = {"recipes": run_recipes, "evaluation": run_evaluation, "speed": run_speed}[args.part](args)
    payload["wall_s"] = time.perf_counter() - t0
    name = Path(args.json).stem if args.json else f"learning_{args.part}_{args.preset}"
    out = write_results(name, payload, Path(args.json).parent if args.json else None)
    print(json.dumps(payload["summary"], indent=1))
    print(out)
    if args.part == "recipes":
        print(plot(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
