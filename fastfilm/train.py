"""The trainer: Adam, early stopping on validation accuracy, exact resume; `fastfilm train`.

A run directory RUN gets:
    metrics.jsonl      one line per epoch (train loss/accuracy, val accuracy per type, speed)
    metrics.json       the final result: val_accuracy, per_type, per_family of the best epoch
    last.pt            full training state, rewritten atomically after every epoch
    best.safetensors   (+ best.json) weights of the best validation epoch
    vocab.json         the vocabulary the model was trained with
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from fastfilm import checkpoint as ckpt
from fastfilm.config import ModelConfig, TrainConfig, model_config
from fastfilm.errors import UserError
from fastfilm.evaluate import accuracy_report, predict, resolve_device
from fastfilm.fastpath import FastOptions, Predictor, TrainStep, build_model, build_optimizer, length_buckets, pad_batch


class NonFiniteLoss(RuntimeError):
    pass


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _meta(model_cfg: ModelConfig, cfg: TrainConfig, vocab: dict, **extra) -> dict:
    return {"arch": model_cfg.arch, "model_config": dataclasses.asdict(model_cfg),
            "train_config": dataclasses.asdict(cfg), "vocab": vocab, **extra}


def train(cfg: TrainConfig, model_cfg: ModelConfig, *, progress: bool | None = None) -> dict:
    """Train, evaluate on val each epoch, keep the best; returns the final metrics dict."""
    from tqdm import tqdm

    from fastfilm.data.cache import load_split, prepare
    from fastfilm.data.loader import Loader

    progress = sys.stderr.isatty() if progress is None else progress
    run_dir = Path(cfg.resume or cfg.out)
    device = resolve_device(cfg.device)
    resumed = ckpt.load_training_state(run_dir) if cfg.resume else None
    if resumed:
        # The run's own configuration wins, except for the stopping budget the user gives now.
        saved = resumed["meta"]
        model_cfg = ckpt.model_config_from(saved)
        cfg = dataclasses.replace(TrainConfig(**saved["train_config"]), resume=cfg.resume,
                                  epochs=cfg.epochs, max_minutes=cfg.max_minutes)
    run_dir.mkdir(parents=True, exist_ok=True)

    cache = prepare(cfg.data, model_cfg.image_size)
    vocab = json.loads((Path(cache) / "vocab.json").read_text())
    if resumed and resumed["meta"]["vocab"] != vocab:
        raise UserError(f"cannot resume {run_dir}: {cfg.data} now has a different vocabulary or answer set")
    ckpt.write_json(run_dir / "vocab.json", vocab)
    train_split, val_split = load_split(cache, "train"), load_split(cache, "val")
    if (train_split.answers < 0).any():
        raise UserError(f"{cfg.data}: the train split has questions without answers")
    num_answers = len(vocab["answer_token_to_idx"])
    opts = FastOptions.from_train_config(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, len(vocab["question_token_to_idx"]), num_answers, opts, device)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, opts, device)
    step_fn = TrainStep(model, opt, opts, device)
    predictor = Predictor(model, opts, device, batch_size=cfg.eval_batch_size if opts.compile else None)
    # Compiled graphs are specialised to shapes: a few question-length buckets, full batches.
    buckets = lambda split: length_buckets(split.questions.shape[1]) if opts.compile else None
    loader = Loader(train_split, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device,
                    limit=cfg.max_train_questions, buckets=buckets(train_split))
    val_loader = Loader(val_split, cfg.eval_batch_size, shuffle=False, device=device, buckets=buckets(val_split))

    s = {"epoch": 0, "batch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": -1, "stale_epochs": 0,
         "best_report": None, "elapsed_s": 0.0}
    if resumed:
        model.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        s.update(json.loads(resumed["progress"]))
        _set_rng_state(resumed["rng"])

    def save_state() -> None:
        ckpt.save_training_state(run_dir, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(),
            # json text: weights_only loading accepts it whatever the nested types are.
            "progress": json.dumps(s), "meta": _meta(model_cfg, cfg, vocab),
        })

    def evaluate_val() -> dict:
        preds = predict(predictor, val_loader, device)
        return accuracy_report(preds, val_split.answers, val_split.types, val_split.families)

    t_start = time.perf_counter() - s["elapsed_s"]
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    stopped = "epochs"
    while s["epoch"] < cfg.epochs:
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen, t_epoch = 0, time.perf_counter()
        bar = tqdm(loader.epoch(s["epoch"], start_batch=s["batch"]), total=len(loader), initial=s["batch"],
                   desc=f"epoch {s['epoch'] + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            s["batch"] += 1
            batch = batch.to(device, non_blocking=True)
            n = len(batch)
            tensors, weight = [batch.images, batch.questions, batch.lengths, batch.answers], None
            if n < cfg.batch_size and (opts.compile or n == 1):
                # Static shapes for the compiled step (no recompile on the last batch), and
                # training-mode BN needs more than one sample: pad with weight-0 repeats.
                tensors, weight = pad_batch(cfg.batch_size, *tensors)
            loss, hits = step_fn(*tensors, weight=weight)
            loss_sum += loss * n
            correct += hits
            seen += n
            s["step"] += 1
            if s["step"] % cfg.log_every == 0:
                # The only host syncs of the loop: loss check and progress display.
                avg = loss_sum.item() / seen
                if not math.isfinite(avg):
                    raise NonFiniteLoss(f"non-finite loss at step {s['step']} (epoch {s['epoch'] + 1}); "
                                        f"last good checkpoint: {run_dir / ckpt.LAST}. Try a lower --lr.")
                bar.set_postfix(loss=f"{avg:.3f}", acc=f"{correct.item() / seen:.3f}",
                                qps=f"{seen / (time.perf_counter() - t_epoch):.0f}")
            if time.perf_counter() - t_start > budget_s:
                stopped = "max_minutes"
                break
        bar.close()
        train_loss = loss_sum.item() / max(seen, 1)
        if seen and not math.isfinite(train_loss):
            raise NonFiniteLoss(f"non-finite loss in epoch {s['epoch'] + 1}; last good checkpoint: "
                                f"{run_dir / ckpt.LAST}. Try a lower --lr.")
        epoch_done = stopped != "max_minutes"
        if epoch_done:
            s["epoch"] += 1
            s["batch"] = 0
        report = evaluate_val()
        s["elapsed_s"] = time.perf_counter() - t_start
        line = {"epoch": s["epoch"], "step": s["step"], "complete_epoch": epoch_done,
                "train_loss": train_loss, "train_accuracy": correct.item() / max(seen, 1),
                "val_accuracy": report["accuracy"], "val_per_type": report["per_type"],
                "train_questions_per_s": seen / max(time.perf_counter() - t_epoch, 1e-9),
                "elapsed_s": s["elapsed_s"]}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if report["accuracy"] is not None and report["accuracy"] > s["best_accuracy"]:
            s.update(best_accuracy=report["accuracy"], best_epoch=s["epoch"], stale_epochs=0, best_report=report)
            ckpt.save_best(run_dir, model, _meta(model_cfg, cfg, vocab, val_accuracy=report["accuracy"],
                                                 epoch=s["epoch"]))
        elif epoch_done:
            s["stale_epochs"] += 1
        save_state()
        # One line per epoch even without a terminal (logs, CI), where the bar is off.
        print(f"[{run_dir.name}] epoch {s['epoch']}: train loss {train_loss:.3f}, val "
              f"{100 * (report['accuracy'] or 0):.2f}%, {line['train_questions_per_s']:.0f} q/s", file=sys.stderr)
        if stopped == "max_minutes":
            break
        if cfg.patience and s["stale_epochs"] >= cfg.patience:
            stopped = "early_stopping"
            break

    best = s["best_report"] or {"accuracy": None, "per_type": {}, "per_family": {}}
    metrics = {"val_accuracy": best["accuracy"], "per_type": best["per_type"], "per_family": best["per_family"],
               "best_epoch": s["best_epoch"], "epochs": s["epoch"], "steps": s["step"], "stopped": stopped,
               "arch": model_cfg.arch, "preset": cfg.preset, "elapsed_s": s["elapsed_s"]}
    ckpt.write_json(run_dir / "metrics.json", metrics)
    return metrics


def run(cfg: TrainConfig, model_overrides: dict | None = None) -> int:
    model_cfg = model_config(cfg.preset, **(model_overrides or {}))
    try:
        metrics = train(cfg, model_cfg)
    except NonFiniteLoss as e:
        print(f"fastfilm train: stopped: {e}", file=sys.stderr)
        return 3
    acc = metrics["val_accuracy"]
    print(f"{cfg.resume or cfg.out}: val accuracy {100 * acc:.2f}% (best epoch {metrics['best_epoch']}, "
          f"stopped: {metrics['stopped']})" if acc is not None else "no validation accuracy")
    return 0
