"""`fastfilm eval`: accuracy of a checkpoint on a split, overall, per type and per family.
Under torchrun every rank predicts its shard of the split and rank 0 reports on the merged
predictions (each question counted once)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fastfilm.atomic import atomic_write
from fastfilm.config import EvalConfig, fast_config
from fastfilm.data.loader import Loader
from fastfilm.engine import distributed
from fastfilm.engine.build import load, split_for
from fastfilm.engine.metrics import accuracy_report, format_table
from fastfilm.engine.options import resolve
from fastfilm.engine.predictor import Predictor, predict
from fastfilm.engine.rundir import check_output_file, on_rank0


def describe_bn_stats(meta: dict) -> str:
    """How the checkpoint's batch-norm statistics were computed, in words (its meta's bn_stats)."""
    bn = meta.get("bn_stats")
    if not bn:
        return "batch-norm statistics: training's running average (a checkpoint from before they were recorded)"
    if bn.get("method") == "precise":
        grouped = f", {bn['group_questions']} questions per image" if bn.get("group_questions", 1) > 1 else ""
        return (f"batch-norm statistics: precise, recomputed from {bn['batches']} training batches of "
                f"{bn['batch_size']}{grouped}")
    return f"batch-norm statistics: training's running average (momentum {bn.get('momentum')})"


def run(cfg: EvalConfig) -> int:
    with distributed.session(cfg.device) as dctx:
        return _run(cfg, dctx)


def _run(cfg: EvalConfig, dctx: distributed.Dist) -> int:
    # The output file is checked before the evaluation, not after it.
    if cfg.predictions:
        on_rank0(dctx, lambda: check_output_file(cfg.predictions, "--predictions"))
    ex = resolve(fast_config(cfg), dctx.device)
    loaded = load(cfg.checkpoint, ex)
    split = split_for(loaded, cfg.data, cfg.split)
    # The weights are final: freeze them into the compiled graph (engine/predictor.py).
    predictor = Predictor(loaded.model, ex, batch_size=cfg.batch_size, vocab=loaded.vocab, frozen=True)
    loader = Loader(split, cfg.batch_size, shuffle=False, device=dctx.device, shard=(dctx.rank, dctx.world_size),
                    **predictor.padding.loader_kwargs(split.questions.shape[1]))
    preds = predict(predictor, loader, dctx.device, progress=sys.stderr.isatty() and dctx.is_main)
    preds = dctx.merge_predictions(preds)
    if not dctx.is_main:
        return 0
    report = accuracy_report(preds, split.answers, split.types, split.families)
    if cfg.predictions:
        text = "".join(loaded.vocab.idx_to_answer[int(p)] + "\n" for p in preds)
        atomic_write(Path(cfg.predictions), lambda tmp: Path(tmp).write_text(text))
    bn = describe_bn_stats(loaded.meta)
    if cfg.json:
        print(json.dumps({"split": cfg.split, **report, "bn_stats": loaded.meta.get("bn_stats")}, indent=2))
    elif report["accuracy"] is None:
        print(f"{cfg.split}: no answers in this split; predictions only")
    else:
        print(f"{cfg.split}: {report['count']} questions, accuracy {100 * report['accuracy']:.2f}% ({bn})")
        print(format_table({loaded.meta.get("arch", "model"): report}))
    return 0
