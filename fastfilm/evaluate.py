"""Accuracy overall, per question type and per question family; `fastfilm eval`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastfilm.config import EvalConfig
from fastfilm.data.types import QUESTION_TYPES, TYPE_TITLES
from fastfilm.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


@torch.inference_mode()
def predict(forward, loader, device: torch.device, *, progress: bool = False) -> np.ndarray:
    """Predicted answer ids for every question of the loader's split, in question order: [Q].

    forward(images, questions, lengths) -> logits: an eval-mode model or a fastpath.Predictor.
    With a sharded loader (rank, world) the other shards' questions stay -1; every rank's
    predictions are merged by distributed.Dist.merge_predictions.
    """
    from tqdm import tqdm

    if isinstance(forward, nn.Module):
        forward.eval()
    preds = np.full(loader.split.questions.shape[0], -1, dtype=np.int64)
    for batch in tqdm(loader.epoch(0), total=len(loader), desc="eval", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = forward(batch.images, batch.questions, batch.lengths)
        preds[batch.index.cpu().numpy()] = logits.argmax(1).cpu().numpy()
    return preds


def accuracy_report(preds: np.ndarray, answers: np.ndarray, types: np.ndarray, families: np.ndarray) -> dict:
    """{"accuracy", "count", "per_type", "per_family"}; accuracies in 0..1.

    Questions without a ground-truth answer (answer -1, e.g. the test split) are not
    counted; types/families of -1 are reported under "unknown".
    """
    known = answers >= 0
    if not known.any():
        return {"accuracy": None, "count": 0, "per_type": {}, "per_family": {}}
    correct = (preds == answers) & known

    def grouped(keys: np.ndarray, name_of) -> dict:
        out = {}
        for k in np.unique(keys[known]):
            sel = known & (keys == k)
            out[name_of(int(k))] = float(correct[sel].sum() / sel.sum())
        return out

    return {
        "accuracy": float(correct.sum() / known.sum()),
        "count": int(known.sum()),
        "per_type": grouped(types, lambda k: QUESTION_TYPES[k] if k >= 0 else "unknown"),
        "per_family": grouped(families, lambda k: str(k) if k >= 0 else "unknown"),
    }


def format_table(rows: dict[str, dict]) -> str:
    """rows: model name -> accuracy_report. A text table in the paper's Table 1 column order."""
    cols = [("Overall", lambda r: r["accuracy"])]
    cols += [(TYPE_TITLES[t], (lambda t: lambda r: r["per_type"].get(t))(t)) for t in QUESTION_TYPES]
    width = max(len(n) for n in rows) + 2
    lines = [" " * width + " | ".join(f"{c:>17}" for c, _ in cols)]
    for name, report in rows.items():
        cells = [get(report) for _, get in cols]
        lines.append(f"{name:<{width}}" + " | ".join(f"{100 * v:17.1f}" if v is not None else f"{'-':>17}"
                                                  for v in cells))
    return "\n".join(lines)


def run(cfg: EvalConfig) -> int:
    """`fastfilm eval`; under torchrun every rank predicts its shard of the split and rank 0
    reports on the merged predictions (each question counted once)."""
    from fastfilm import distributed

    with distributed.session(cfg.device) as dctx:
        return _run(cfg, dctx)


def _run(cfg: EvalConfig, dctx) -> int:
    from fastfilm.data.cache import load_split, prepare
    from fastfilm.data.loader import Loader
    from fastfilm.fastpath import FastOptions, Predictor, loader_buckets
    from fastfilm.inference import check_vocab_matches, load_model

    device = dctx.device
    opts = FastOptions(reference=cfg.reference, amp=cfg.amp, compile=cfg.compile)
    model, meta = load_model(cfg.checkpoint, device, opts)
    cache = prepare(cfg.data, meta["model_config"]["image_size"], splits=(cfg.split,))
    check_vocab_matches(meta, cache, cfg.data)
    split = load_split(cache, cfg.split)
    loader = Loader(split, cfg.batch_size, shuffle=False, device=device,
                    buckets=loader_buckets(split.questions.shape[1], opts), shard=(dctx.rank, dctx.world_size))
    predictor = Predictor(model, opts, device, batch_size=cfg.batch_size)
    preds = predict(predictor, loader, device, progress=sys.stderr.isatty() and dctx.is_main)
    preds = dctx.merge_predictions(preds)
    if not dctx.is_main:
        return 0
    report = accuracy_report(preds, split.answers, split.types, split.families)
    if cfg.predictions:
        from fastfilm.atomic import atomic_write

        answers = meta["vocab"]["answer_token_to_idx"]
        idx_to_answer = {i: a for a, i in answers.items()}
        text = "".join(idx_to_answer[int(p)] + "\n" for p in preds)
        atomic_write(Path(cfg.predictions), lambda tmp: Path(tmp).write_text(text))
    if cfg.json:
        print(json.dumps({"split": cfg.split, **report}, indent=2))
    elif report["accuracy"] is None:
        print(f"{cfg.split}: no answers in this split; predictions only")
    else:
        print(f"{cfg.split}: {report['count']} questions, accuracy {100 * report['accuracy']:.2f}%")
        print(format_table({meta.get("arch", "model"): report}))
    return 0
