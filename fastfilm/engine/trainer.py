"""The trainer: Adam with a learning-rate schedule, trustworthy evaluations, early stopping
on a smoothed validation accuracy, exact resume.

Before each evaluation the batch-norm statistics are recomputed from training batches
(--bn-stats precise, engine/bn_stats.py) and the eval-mode gap is measured on a fixed sample
of training questions; the learning rate follows engine/schedule.py; early stopping watches
the mean of the last --smooth-epochs validation accuracies (engine/stopping.py).

A run directory RUN gets:
    metrics.jsonl      one line per epoch (train loss/accuracy, val accuracy per type, speed,
                       eval_gap, val_smoothed/val_spread, lr)
    metrics.json       the final result: val_accuracy, per_type, per_family of the best epoch
    last.pt            full training state, rewritten atomically after every epoch
    best.safetensors   (+ best.json) weights of the best validation epoch
    vocab.json         the vocabulary the model was trained with

Under torchrun (WORLD_SIZE > 1) it trains data-parallel (engine/distributed.py,
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fastfilm import checkpoint as ckpt
from fastfilm.config import ModelConfig, TrainConfig, fast_config, train_config_from, train_recipe
from fastfilm.data.cache import load_split, load_vocab, prepare
from fastfilm.data.loader import Batch, Loader
from fastfilm.data.vocab import Vocab
from fastfilm.engine import bn_stats, distributed
from fastfilm.engine.batching import pad_batch
from fastfilm.engine.build import build, build_optimizer
from fastfilm.engine.metrics import accuracy_report
from fastfilm.engine.options import resolve
from fastfilm.engine.predictor import Predictor, predict
from fastfilm.engine.schedule import LRSchedule
from fastfilm.engine.step import TrainStep
from fastfilm.engine.stopping import Stopping, spread
from fastfilm.errors import UserError


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Progress:
    """Where a run stands; saved in last.pt (as JSON text) so that resume continues exactly."""
    epoch: int = 0              # completed epochs
    batch: int = 0              # batches done in the current epoch
    step: int = 0               # optimizer steps in all
    best_accuracy: float = -1.0
    best_epoch: int = -1
    stale_epochs: int = 0       # complete epochs since the smoothed val accuracy last improved
    smoothed_best: float = -1.0
    val_history: list = field(default_factory=list)  # val accuracy of each complete epoch
    best_report: dict | None = None
    elapsed_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass
class EpochResult:
    """One pass over (part of) an epoch, summed over ranks."""
    loss: float
    accuracy: float
    seen: int
    seconds: float
    complete: bool              # False: the time budget cut it short


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class Trainer:
    """Set up a run (data, model, optimizer, loaders), then `run()` it epoch by epoch."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, dctx: distributed.Dist, progress: bool | None):
        self.dctx, self.main = dctx, dctx.is_main  # only rank 0 writes files and prints
        self.show_bar = (sys.stderr.isatty() if progress is None else progress) and self.main
        self.run_dir = Path(cfg.resume or cfg.out)
        self.resumed = ckpt.load_training_state(self.run_dir) if cfg.resume else None
        if self.resumed:
            # The run's own configuration wins, except for the stopping budget the user gives now.
            saved = self.resumed["meta"]
            _check_world_size(self.run_dir, saved, dctx.world_size)
            model_cfg = ckpt.model_config_from(saved)
            cfg = dataclasses.replace(train_config_from(saved["train_config"]), resume=cfg.resume,
                                      epochs=cfg.epochs, max_minutes=cfg.max_minutes,
                                      dist_timeout_s=cfg.dist_timeout_s)
        self.cfg, self.model_cfg = train_recipe(cfg), model_cfg
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._load_data()
        self._build()
        self.progress = Progress()
        if self.resumed:
            self.model.load_state_dict(self.resumed["model"])
            self.optimizer.load_state_dict(self.resumed["optimizer"])
            self.progress = Progress.from_json(self.resumed["progress"])
            _set_rng_state(self.resumed["rng"])

    # ------------------------------------------------------------ setup

    def _load_data(self) -> None:
        cfg = self.cfg
        # Every rank prepares the cache: a file lock lets one build it while the others wait
        # (no collective, so a long build does not run into --dist-timeout-s), then they map it.
        cache = prepare(cfg.data, self.model_cfg.image_size)
        self.vocab: Vocab = load_vocab(cache)
        if self.resumed and self.resumed["meta"]["vocab"] != self.vocab.to_json():
            raise UserError(f"cannot resume {self.run_dir}: {cfg.data} now has a different vocabulary or answer set")
        if self.main:
            self.vocab.save(self.run_dir / "vocab.json")
        self.train_split, self.val_split = load_split(cache, "train"), load_split(cache, "val")
        if (self.train_split.answers < 0).any():
            raise UserError(f"{cfg.data}: the train split has questions without answers")

    def _build(self) -> None:
        cfg, dctx = self.cfg, self.dctx
        fast = fast_config(cfg)
        if cfg.sync_bn and not dctx.enabled:
            distributed.note("--sync-bn has no effect in a single process")
        elif cfg.sync_bn and fast.fused and not fast.reference:
            # The fused op computes per-rank statistics inside its kernel; SyncBN needs them global.
            fast = dataclasses.replace(fast, fused=False)
            distributed.note("--sync-bn: ResBlocks use the unfused batch norm path (global statistics)")
        self.ex = ex = resolve(fast, dctx.device)
        torch.manual_seed(cfg.seed)
        self.model = build(self.model_cfg, self.vocab, ex)
        step_model = distributed.wrap(self.model, dctx, compile=ex.compile, sync_bn=cfg.sync_bn)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, ex, apex=cfg.apex)
        self.step_fn = TrainStep(step_model, self.optimizer, ex)
        self.predictor = Predictor(self.model, ex, batch_size=cfg.eval_batch_size)
        # The step and the predictor compile (or not) the same model: one padding policy.
        self.padding = self.predictor.padding
        shard = (dctx.rank, dctx.world_size)
        self.loader = Loader(self.train_split, cfg.batch_size, shuffle=True, seed=cfg.seed, device=dctx.device,
                             limit=cfg.max_train_questions, shard=shard, group=cfg.group_questions,
                             **self.padding.loader_kwargs(self.train_split.questions.shape[1]))
        self.val_loader = Loader(self.val_split, cfg.eval_batch_size, shuffle=False, device=dctx.device, shard=shard,
                                 **self.padding.loader_kwargs(self.val_split.questions.shape[1]))
        self._build_learning()

    def _build_learning(self) -> None:
        """The lr schedule, the batch-norm statistics policy and the eval-gap sample."""
        cfg, dctx = self.cfg, self.dctx
        self.schedule = LRSchedule.for_run(cfg.lr, cfg.lr_schedule, cfg.warmup, steps_per_epoch=len(self.loader),
                                           epochs=cfg.epochs, max_minutes=cfg.max_minutes)
        if self.resumed:
            self.schedule.load_state_dict(self.resumed.get("schedule", {}))
        bn_stats.set_momentum(self.model, cfg.bn_momentum)
        # Batches as training makes them (size, grouping, this rank's shard) in orders of their own
        # (another seed), full ones only: batch statistics depend on the batch size.
        shard, n = (dctx.rank, dctx.world_size), self.loader.num_questions
        full = n // dctx.world_size >= cfg.batch_size
        self.stats_loader = Loader(self.train_split, cfg.batch_size, shuffle=True, seed=cfg.seed + 1,
                                   device=dctx.device, limit=cfg.max_train_questions, shard=shard,
                                   group=cfg.group_questions, drop_last=full)
        # The gap sample (the stats loader's "epoch 0"): the same training questions after every epoch.
        gap_batches = -(-cfg.eval_gap_questions // (cfg.batch_size * dctx.world_size))
        self.gap_batches = [b for _, b in zip(range(gap_batches), self.stats_loader.epoch(0))]
        self.bn_record = ({"method": "precise", "batches": cfg.precise_bn_batches, "batch_size": cfg.batch_size,
                           "group_questions": cfg.group_questions,
                           "ranks": "each rank's own batches, then the mean over ranks"}
                          if cfg.bn_stats == "precise" and cfg.precise_bn_batches > 0
                          else {"method": "running", "momentum": cfg.bn_momentum})

    # ------------------------------------------------------------ training

    def _step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch; a partial batch is padded as the policy says."""
        grouped = self.cfg.group_questions > 1
        # Grouped, images has a row per distinct image and image_index one per question.
        images, rows, weight = batch.images, [batch.questions, batch.lengths, batch.answers], None
        if grouped:
            rows.append(batch.image_index)
        if self.padding.pads_batch(len(batch), self.cfg.batch_size, training=True):
            if grouped:
                rows, weight = pad_batch(self.cfg.batch_size, *rows)
            else:
                (images, *rows), weight = pad_batch(self.cfg.batch_size, images, *rows)
        return self.step_fn(images, *rows[:3], weight=weight, image_index=rows[3] if grouped else None)

    def _check_finite(self, loss: float, where: str) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss {where}; last good checkpoint: "
                                f"{self.run_dir / ckpt.LAST}. Try a lower --lr.")

    def train_epoch(self, t_start: float, budget_s: float) -> EpochResult:
        """Train from the current batch to the end of the epoch, or until the time budget."""
        p, dctx, device = self.progress, self.dctx, self.dctx.device
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen, t_epoch, complete = 0, time.perf_counter(), True
        bar = tqdm(self.loader.epoch(p.epoch, start_batch=p.batch), total=len(self.loader), initial=p.batch,
                   desc=f"epoch {p.epoch + 1}/{self.cfg.epochs}", disable=not self.show_bar, leave=False)
        clock_each_step = self.schedule.reads_clock and not dctx.enabled
        for batch in bar:
            batch = batch.to(device, non_blocking=True)
            if clock_each_step:  # one process: its own clock; under torchrun rank 0's, below
                self.schedule.observe(time.perf_counter() - t_start)
            self.schedule.apply(self.optimizer, p.step)
            loss, hits = self._step(batch)
            loss_sum += loss * len(batch)
            correct += hits
            seen += len(batch)
            p.batch += 1
            p.step += 1
            over_budget = time.perf_counter() - t_start > budget_s
            if p.step % self.cfg.log_every == 0:
                # The only host syncs of the loop: loss check and progress display. Under torchrun
                # also its only extra collective, which sums them over ranks and hands every rank
                # rank 0's time-budget verdict.
                g_loss, g_correct, g_seen, over_budget = dctx.totals(loss_sum, correct, seen, over_budget)
                if self.schedule.reads_clock and dctx.enabled:
                    self.schedule.observe(dctx.shared_float(time.perf_counter() - t_start))
                self._check_finite(g_loss / g_seen, f"at step {p.step} (epoch {p.epoch + 1})")
                bar.set_postfix(loss=f"{g_loss / g_seen:.3f}", acc=f"{g_correct / g_seen:.3f}",
                                qps=f"{g_seen / (time.perf_counter() - t_epoch):.0f}")
            elif dctx.enabled:
                over_budget = False  # ranks' clocks differ: stop only where all hear rank 0
            if over_budget:
                complete = False
                break
        bar.close()
        g_loss, g_correct, g_seen, _ = dctx.totals(loss_sum, correct, seen, False)
        if g_seen:
            self._check_finite(g_loss / g_seen, f"in epoch {p.epoch + 1}")
        return EpochResult(loss=g_loss / max(g_seen, 1), accuracy=g_correct / max(g_seen, 1), seen=g_seen,
                           seconds=time.perf_counter() - t_epoch, complete=complete)

    def _forward_batch(self, batch: Batch) -> torch.Tensor:
        """Logits [B, A] of a loader batch, run as a training step runs it (autocast, grouped images)."""
        image_index = batch.image_index if self.cfg.group_questions > 1 else None
        with self.ex.autocast():
            return self.model(batch.images, batch.questions, batch.lengths, image_index).float()

    def prepare_evaluation(self) -> dict:
        """Batch-norm statistics for the weights as they are now (precise BN), then the eval-mode
        gap on the fixed sample of training questions; returns the figures metrics.jsonl records."""
        p, cfg, dctx = self.progress, self.cfg, self.dctx
        t0 = time.perf_counter()
        out: dict = {"bn_stats": self.bn_record["method"]}
        if self.bn_record["method"] == "precise":
            # Fresh batches for each epoch, chosen by its number: a resumed run uses the same ones.
            batches = (b.to(dctx.device) for _, b in zip(range(cfg.precise_bn_batches),
                                                         self.stats_loader.epoch(1 + p.epoch)))
            bn_stats.recompute(self.model, self._forward_batch, batches, average=dctx.average_)
        if self.gap_batches:
            hits_train, hits_eval, count = bn_stats.train_vs_eval(
                self.model, self._forward_batch, (b.to(dctx.device) for b in self.gap_batches))
            counts = torch.tensor([hits_train, hits_eval, count], dtype=torch.float64, device=dctx.device)
            dctx.average_([counts])  # the mean over ranks of counts is proportional to their sum
            hits_train, hits_eval, count = counts.tolist()
            out.update(gap_train_mode_accuracy=hits_train / count, gap_eval_mode_accuracy=hits_eval / count,
                       eval_gap=(hits_train - hits_eval) / count, gap_questions=round(count * dctx.world_size))
        out["bn_stats_s"] = time.perf_counter() - t0
        return out

    def evaluate(self) -> dict:
        """accuracy_report of the validation split (every rank gets the merged report)."""
        # Rank 0's running statistics everywhere: the model evaluated is the one rank 0 saves.
        self.dctx.sync_buffers(self.model)
        preds = self.dctx.merge_predictions(predict(self.predictor, self.val_loader, self.dctx.device))
        s = self.val_split
        return accuracy_report(preds, s.answers, s.types, s.families)

    # ------------------------------------------------------------ bookkeeping

    def _meta(self, **extra) -> dict:
        return {"arch": self.model_cfg.arch, "model_config": dataclasses.asdict(self.model_cfg),
                "train_config": dataclasses.asdict(self.cfg), "vocab": self.vocab.to_json(),
                "world_size": self.dctx.world_size, "bn_stats": self.bn_record, **extra}

    def save_state(self) -> None:
        ckpt.save_training_state(self.run_dir, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": _rng_state(),
            # json text: weights_only loading accepts it whatever the nested types are.
            "progress": self.progress.to_json(), "meta": self._meta(), "schedule": self.schedule.state_dict(),
        })

    def record(self, result: EpochResult, report: dict, stats: dict | None = None) -> None:
        """metrics.jsonl line, best checkpoint, training state and the epoch's log line.
        stats: prepare_evaluation()'s figures (batch-norm statistics, eval-mode gap)."""
        p, cfg = self.progress, self.cfg
        acc = report["accuracy"]
        # Smoothing and spread over complete epochs; a partial one (time budget) is shown as the latest.
        history = p.val_history + ([acc] if acc is not None else [])
        stop = Stopping(p.smoothed_best, p.stale_epochs)
        if acc is not None and result.complete:
            p.val_history = history
            stop.update(history, cfg.smooth_epochs)
            p.smoothed_best, p.stale_epochs = stop.best, stop.stale
        recent = history[-cfg.smooth_epochs:]
        line = {"epoch": p.epoch, "step": p.step, "complete_epoch": result.complete,
                "train_loss": result.loss, "train_accuracy": result.accuracy,
                "val_accuracy": acc, "val_per_type": report["per_type"],
                "val_smoothed": sum(recent) / len(recent) if recent else None,
                "val_spread": spread(history, cfg.smooth_epochs) if history else None,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_questions_per_s": result.seen / max(result.seconds, 1e-9), "elapsed_s": p.elapsed_s,
                **(stats or {})}
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        # Every rank holds the same merged report, so this bookkeeping agrees across ranks.
        if acc is not None and acc > p.best_accuracy:
            p.best_accuracy, p.best_epoch, p.best_report = acc, p.epoch, report
            if self.main:
                ckpt.save_best(self.run_dir, self.model, self._meta(val_accuracy=acc, epoch=p.epoch))
        if self.main:
            self.save_state()
            # One line per epoch even without a terminal (logs, CI), where the bar is off.
            gap = f", eval gap {100 * line['eval_gap']:+.1f} pts" if "eval_gap" in line else ""
            print(f"[{self.run_dir.name}] epoch {p.epoch}: train loss {result.loss:.3f}, val {100 * (acc or 0):.2f}% "
                  f"(spread {100 * (line['val_spread'] or 0):.1f} pts over {len(recent)}){gap}, lr {line['lr']:.2g}, "
                  f"{line['train_questions_per_s']:.0f} q/s", file=sys.stderr)

    def run(self) -> dict:
        """Train until the epochs, the time budget or early stopping end it; returns the final
        metrics (the same on every rank)."""
        cfg, p = self.cfg, self.progress
        t_start = time.perf_counter() - p.elapsed_s
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
        stopped = "epochs"
        while p.epoch < cfg.epochs:
            result = self.train_epoch(t_start, budget_s)
            if result.complete:
                p.epoch, p.batch = p.epoch + 1, 0
            stats = self.prepare_evaluation()
            report = self.evaluate()
            p.elapsed_s = time.perf_counter() - t_start
            self.record(result, report, stats)
            if not result.complete:
                stopped = "max_minutes"
                break
            if self.dctx.broadcast_flag(Stopping(p.smoothed_best, p.stale_epochs).should_stop(cfg.patience)):
                stopped = "early_stopping"
                break
        return self._finish(stopped)

    def _finish(self, stopped: str) -> dict:
        p = self.progress
        best = p.best_report or {"accuracy": None, "per_type": {}, "per_family": {}}
        metrics = {"val_accuracy": best["accuracy"], "per_type": best["per_type"], "per_family": best["per_family"],
                   "best_epoch": p.best_epoch, "epochs": p.epoch, "steps": p.step, "stopped": stopped,
                   "arch": self.model_cfg.arch, "preset": self.cfg.preset, "elapsed_s": p.elapsed_s,
                   "world_size": self.dctx.world_size}
        if self.main:
            ckpt.write_json(self.run_dir / "metrics.json", metrics)
        self.dctx.barrier()  # when train() returns on any rank, rank 0's files are complete
        return metrics


def train(cfg: TrainConfig, model_cfg: ModelConfig, *, progress: bool | None = None) -> dict:
    """Train, evaluate on val each epoch, keep the best; returns the final metrics dict
    (the same on every rank under torchrun)."""
    with distributed.session(cfg.device, cfg.dist_timeout_s) as dctx:
        return Trainer(cfg, model_cfg, dctx, progress).run()
