"""The trainer: Adam, early stopping on validation accuracy, exact resume; `fastfilm train`.

A run directory RUN gets:
    metrics.jsonl      one line per epoch (train loss/accuracy, val accuracy per type, speed)
    metrics.json       the final result: val_accuracy, per_type, per_family of the best epoch
    last.pt            full training state, rewritten atomically after every epoch
    best.safetensors   (+ best.json) weights of the best validation epoch
    vocab.json         the vocabulary the model was trained with

Under torchrun (WORLD_SIZE > 1) it trains data-parallel (fastfilm/distributed.py,
docs/distributed.md): each rank trains on its shard of every epoch's questions with
--batch-size questions per step (global batch = world size x batch size, which --lr is
for), gradients are averaged, validation is sharded and merged so that every question
counts once, and only rank 0 writes files. Every decision that ends a loop (time budget,
non-finite loss, early stopping) is taken from values all ranks share, so none is left
waiting in a collective.
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
from fastfilm import distributed
from fastfilm.config import ModelConfig, TrainConfig, model_config
from fastfilm.errors import UserError
from fastfilm.evaluate import accuracy_report, predict
from fastfilm.fastpath import (FastOptions, Predictor, TrainStep, build_model, build_optimizer, loader_buckets,
                               loader_image_multiple, pad_batch)


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


def _meta(model_cfg: ModelConfig, cfg: TrainConfig, vocab: dict, world_size: int, **extra) -> dict:
    return {"arch": model_cfg.arch, "model_config": dataclasses.asdict(model_cfg),
            "train_config": dataclasses.asdict(cfg), "vocab": vocab, "world_size": world_size, **extra}


def _check_world_size(run_dir: Path, saved: dict, world: int) -> None:
    """Exact resume needs the world size the run was trained with."""
    trained = int(saved.get("world_size", 1))
    if trained == world:
        return
    how = ("without torchrun (or with 1 process)" if trained == 1
           else f"with torchrun and {trained} processes in all (--nnodes x --nproc_per_node = {trained})")
    batch = saved["train_config"]["batch_size"]
    raise UserError(
        f"cannot resume {run_dir}: it was trained by {trained} process(es) and this launch has {world}. "
        f"The global batch ({trained} x {batch} questions per step), each rank's share of the data order "
        f"and the per-rank batch norm statistics all depend on the world size, so the run could not continue "
        f"exactly. Relaunch {how}, or start a new run (--out) instead of --resume.")


def train(cfg: TrainConfig, model_cfg: ModelConfig, *, progress: bool | None = None) -> dict:
    """Train, evaluate on val each epoch, keep the best; returns the final metrics dict
    (the same on every rank under torchrun)."""
    with distributed.session(cfg.device, cfg.dist_timeout_s) as dctx:
        return _train(cfg, model_cfg, dctx, progress)


def _train(cfg: TrainConfig, model_cfg: ModelConfig, dctx: distributed.Dist, progress: bool | None) -> dict:
    from tqdm import tqdm

    from fastfilm.data.cache import load_split, prepare
    from fastfilm.data.loader import Loader
    from fastfilm.model.reference import parse_film_blocks

    progress = (sys.stderr.isatty() if progress is None else progress) and dctx.is_main
    main = dctx.is_main  # only rank 0 writes files and prints
    run_dir = Path(cfg.resume or cfg.out)
    device = dctx.device
    resumed = ckpt.load_training_state(run_dir) if cfg.resume else None
    if resumed:
        # The run's own configuration wins, except for the stopping budget the user gives now.
        saved = resumed["meta"]
        _check_world_size(run_dir, saved, dctx.world_size)
        model_cfg = ckpt.model_config_from(saved)
        cfg = dataclasses.replace(TrainConfig(**saved["train_config"]), resume=cfg.resume,
                                  epochs=cfg.epochs, max_minutes=cfg.max_minutes,
                                  dist_timeout_s=cfg.dist_timeout_s)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # Every rank prepares the cache: a file lock lets one build it while the others wait
    # (no collective, so a long build does not run into --dist-timeout-s), then they map it.
    cache = prepare(cfg.data, model_cfg.image_size)
    vocab = json.loads((Path(cache) / "vocab.json").read_text())
    if resumed and resumed["meta"]["vocab"] != vocab:
        raise UserError(f"cannot resume {run_dir}: {cfg.data} now has a different vocabulary or answer set")
    if main:
        ckpt.write_json(run_dir / "vocab.json", vocab)
    train_split, val_split = load_split(cache, "train"), load_split(cache, "val")
    if (train_split.answers < 0).any():
        raise UserError(f"{cfg.data}: the train split has questions without answers")
    num_answers = len(vocab["answer_token_to_idx"])
    opts = FastOptions.from_train_config(cfg)
    if cfg.sync_bn and not dctx.enabled:
        distributed.note("--sync-bn has no effect in a single process")
    elif cfg.sync_bn and opts.fused:
        # The fused op computes per-rank statistics inside its kernel; SyncBN needs them global.
        opts = dataclasses.replace(opts, fused=False)
        distributed.note("--sync-bn: ResBlocks use the unfused batch norm path (global statistics)")
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, len(vocab["question_token_to_idx"]), num_answers, opts, device)
    # Ablations whose question pipeline gets no gradient (no FiLM-ed block, or gamma := 1 with
    # beta := 0): DDP must not wait for those gradients.
    unused = model_cfg.arch == "film" and (not any(parse_film_blocks(model_cfg.film_blocks, model_cfg.num_blocks))
                                           or (model_cfg.gamma, model_cfg.beta) == ("one", "zero"))
    step_model = distributed.wrap(model, dctx, compile=opts.compile, sync_bn=cfg.sync_bn, find_unused=unused)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, opts, device)
    step_fn = TrainStep(step_model, opt, opts, device)
    predictor = Predictor(model, opts, device, batch_size=cfg.eval_batch_size)
    shard = (dctx.rank, dctx.world_size)
    loader = Loader(train_split, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device,
                    limit=cfg.max_train_questions, buckets=loader_buckets(train_split.questions.shape[1], opts),
                    shard=shard, group=cfg.group_questions, image_multiple=loader_image_multiple(opts))
    grouped = cfg.group_questions > 1
    val_loader = Loader(val_split, cfg.eval_batch_size, shuffle=False, device=device,
                        buckets=loader_buckets(val_split.questions.shape[1], opts), shard=shard)

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
            "progress": json.dumps(s), "meta": _meta(model_cfg, cfg, vocab, dctx.world_size),
        })

    def evaluate_val() -> dict:
        # Rank 0's running statistics everywhere: the model evaluated is the one rank 0 saves.
        dctx.sync_buffers(model)
        preds = dctx.merge_predictions(predict(predictor, val_loader, device))
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
            # Grouped, images has a row per distinct image and image_index one per question.
            images, rows, weight = batch.images, [batch.questions, batch.lengths, batch.answers], None
            if grouped:
                rows.append(batch.image_index)
            if n < cfg.batch_size and (opts.compile or n == 1):
                # Static shapes for the compiled step (no recompile on the last batch), and
                # training-mode BN needs more than one sample: pad with weight-0 repeats.
                if grouped:
                    rows, weight = pad_batch(cfg.batch_size, *rows)
                else:
                    (images, *rows), weight = pad_batch(cfg.batch_size, images, *rows)
            loss, hits = step_fn(images, *rows[:3], weight=weight, image_index=rows[3] if grouped else None)
            loss_sum += loss * n
            correct += hits
            seen += n
            s["step"] += 1
            over_budget = time.perf_counter() - t_start > budget_s
            if s["step"] % cfg.log_every == 0:
                # The only host syncs of the loop: loss check and progress display. Under torchrun
                # also its only extra collective, which sums them over ranks and hands every rank
                # rank 0's time-budget verdict.
                g_loss, g_correct, g_seen, over_budget = dctx.totals(loss_sum, correct, seen, over_budget)
                avg = g_loss / g_seen
                if not math.isfinite(avg):
                    raise NonFiniteLoss(f"non-finite loss at step {s['step']} (epoch {s['epoch'] + 1}); "
                                        f"last good checkpoint: {run_dir / ckpt.LAST}. Try a lower --lr.")
                bar.set_postfix(loss=f"{avg:.3f}", acc=f"{g_correct / g_seen:.3f}",
                                qps=f"{g_seen / (time.perf_counter() - t_epoch):.0f}")
            elif dctx.enabled:
                over_budget = False  # ranks' clocks differ: stop only where all hear rank 0
            if over_budget:
                stopped = "max_minutes"
                break
        bar.close()
        g_loss, g_correct, g_seen, _ = dctx.totals(loss_sum, correct, seen, False)
        train_loss = g_loss / max(g_seen, 1)
        if g_seen and not math.isfinite(train_loss):
            raise NonFiniteLoss(f"non-finite loss in epoch {s['epoch'] + 1}; last good checkpoint: "
                                f"{run_dir / ckpt.LAST}. Try a lower --lr.")
        epoch_done = stopped != "max_minutes"
        if epoch_done:
            s["epoch"] += 1
            s["batch"] = 0
        report = evaluate_val()
        s["elapsed_s"] = time.perf_counter() - t_start
        line = {"epoch": s["epoch"], "step": s["step"], "complete_epoch": epoch_done,
                "train_loss": train_loss, "train_accuracy": g_correct / max(g_seen, 1),
                "val_accuracy": report["accuracy"], "val_per_type": report["per_type"],
                "train_questions_per_s": g_seen / max(time.perf_counter() - t_epoch, 1e-9),
                "elapsed_s": s["elapsed_s"]}
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        # Every rank holds the same merged report, so this bookkeeping agrees across ranks.
        if report["accuracy"] is not None and report["accuracy"] > s["best_accuracy"]:
            s.update(best_accuracy=report["accuracy"], best_epoch=s["epoch"], stale_epochs=0, best_report=report)
            if main:
                ckpt.save_best(run_dir, model, _meta(model_cfg, cfg, vocab, dctx.world_size,
                                                     val_accuracy=report["accuracy"], epoch=s["epoch"]))
        elif epoch_done:
            s["stale_epochs"] += 1
        if main:
            save_state()
            # One line per epoch even without a terminal (logs, CI), where the bar is off.
            print(f"[{run_dir.name}] epoch {s['epoch']}: train loss {train_loss:.3f}, val "
                  f"{100 * (report['accuracy'] or 0):.2f}%, {line['train_questions_per_s']:.0f} q/s",
                  file=sys.stderr)
        if stopped == "max_minutes":
            break
        if dctx.broadcast_flag(bool(cfg.patience) and s["stale_epochs"] >= cfg.patience):
            stopped = "early_stopping"
            break

    best = s["best_report"] or {"accuracy": None, "per_type": {}, "per_family": {}}
    metrics = {"val_accuracy": best["accuracy"], "per_type": best["per_type"], "per_family": best["per_family"],
               "best_epoch": s["best_epoch"], "epochs": s["epoch"], "steps": s["step"], "stopped": stopped,
               "arch": model_cfg.arch, "preset": cfg.preset, "elapsed_s": s["elapsed_s"],
               "world_size": dctx.world_size}
    if main:
        ckpt.write_json(run_dir / "metrics.json", metrics)
    dctx.barrier()  # when train() returns on any rank, rank 0's files are complete
    return metrics


def run(cfg: TrainConfig, model_overrides: dict | None = None) -> int:
    model_cfg = model_config(cfg.preset, **(model_overrides or {}))
    try:
        metrics = train(cfg, model_cfg)
    except NonFiniteLoss as e:
        print(f"fastfilm train: stopped: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        if distributed.launched_world_size() > 1 and distributed.is_comm_error(e):
            print(f"fastfilm train: error: {distributed.explain_comm_error(e, cfg.dist_timeout_s)}", file=sys.stderr)
            return 4
        raise
    if not distributed.is_main():
        return 0
    acc = metrics["val_accuracy"]
    print(f"{cfg.resume or cfg.out}: val accuracy {100 * acc:.2f}% (best epoch {metrics['best_epoch']}, "
          f"stopped: {metrics['stopped']})" if acc is not None else "no validation accuracy")
    return 0
