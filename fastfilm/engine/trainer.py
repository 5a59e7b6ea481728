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
    tensorboard/       with --tensorboard: metrics.jsonl's scalars as TensorBoard events

--init-from RUN fine-tunes RUN's model (engine/finetune.py, docs/finetuning.md): its weights,
token ids and answer set, with DATA re-encoded into them; --train-only freezes the rest.
    lock               while a training runs: its pid, host and start time (engine/rundir.py)

RUN must be new or empty, unless the run is resumed (--resume) or started again
(--overwrite); paths are stored absolute, and a resumed run checks that its data still holds
the questions it was trained on (a fingerprint of the train split, saved in the metadata).

Under torchrun (WORLD_SIZE > 1) it trains data-parallel (engine/distributed.py,
docs/distributed.md): each rank trains on its shard of every epoch's questions with
--batch-size questions per step (global batch = world size x batch size, which --lr is
for), gradients are averaged, validation is sharded and merged so that every question
counts once, and only rank 0 writes files. Every decision that ends a loop (time budget,
non-finite loss, early stopping) is taken from values all ranks share, so none is left
waiting in a collective.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastfilm import checkpoint as ckpt
from fastfilm.atomic import atomic_write
from fastfilm.config import (ModelConfig, TrainConfig, fast_config, left_to_preset, resolve_preset, train_config_from,
                             train_recipe, validate_training)
from fastfilm.data.cache import SplitData, load_split, load_vocab, prepare
from fastfilm.data.features import check_channels
from fastfilm.data.loader import Batch, Loader, resident_bytes, resident_decision
from fastfilm.data.vocab import Vocab
from fastfilm.engine import bn_stats, distributed, finetune, rundir
from fastfilm.engine.batching import pad_batch
from fastfilm.engine.build import build, build_optimizer
from fastfilm.engine.metrics import accuracy_report
from fastfilm.engine.options import resolve
from fastfilm.engine.predictor import Predictor, predict
from fastfilm.engine.schedule import LRSchedule
from fastfilm.engine.step import TrainStep
from fastfilm.engine.stopping import Stopping, spread
from fastfilm.engine.tensorboard_log import TensorBoardLog
from fastfilm.errors import UserError


class NonFiniteLoss(RuntimeError):
    pass


# The bar counts questions, a batch per rank and step, so tqdm's rate is questions/s over all
# ranks and its remaining time is the epoch's ETA, with no host sync to learn either (a
# partial last batch counts as a whole one).
BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} questions "
              "[{rate_fmt}, {elapsed} done, epoch ends in {remaining}{postfix}]")


def epoch_bar(total: int, done: int, questions_per_step: int, **kwargs) -> tqdm:
    """The progress bar of an epoch of `total` steps, `done` of them already; the loop calls
    `bar.update(questions_per_step)` after each step."""
    return tqdm(total=total * questions_per_step, initial=done * questions_per_step, unit=" q",
                bar_format=BAR_FORMAT, leave=False, **kwargs)


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

    def position(self) -> str:
        """Where the run stands, in words: 'after epoch 2' or 'after epoch 2 and 5 batches of epoch 3'."""
        within = f" and {self.batch} batches of epoch {self.epoch + 1}" if self.batch else ""
        return f"after epoch {self.epoch}{within}"

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


# Flags a resumed run takes from the command line: when and where it runs and stops. Every
# other setting is the run's own (changing it would not continue the same run).
RESUME_HONOURS = ("epochs", "max_minutes", "dist_timeout_s", "device", "log_every", "eval_batch_size", "tensorboard")


def _resumed_config(given: TrainConfig, saved: dict, run_dir: Path) -> TrainConfig:
    """The run's saved TrainConfig with RESUME_HONOURS and DATA (when given) from `given`;
    flags the user set to other values than the run's are named as ignored, in one note.
    (An older fastfilm saved DATA as typed: a relative path is taken from the current
    directory, and saved absolute from then on.)"""
    run_cfg = train_config_from(saved)
    default = TrainConfig()
    ignored = [f"--{f.name.replace('_', '-')} {getattr(given, f.name)!r} (the run's: {getattr(run_cfg, f.name)!r})"
               for f in dataclasses.fields(TrainConfig)
               if f.name not in (*RESUME_HONOURS, "data", "out", "resume", "overwrite")
               and getattr(given, f.name) != getattr(default, f.name)
               and getattr(given, f.name) != getattr(run_cfg, f.name)]
    if given.out != default.out and rundir.absolute(given.out) != run_dir:
        ignored.append(f"--out {given.out!r} (a resumed run writes into its own directory)")
    if ignored:
        distributed.note(f"--resume {run_dir} keeps the run's own settings; ignored: {', '.join(ignored)}")
    return dataclasses.replace(run_cfg, resume=str(run_dir), out=str(run_dir), overwrite=False,
                               data=str(rundir.absolute(given.data or run_cfg.data)),
                               **{name: getattr(given, name) for name in RESUME_HONOURS})


def _note_recipe(given: TrainConfig, resolved: TrainConfig) -> None:
    """One line naming the recipe values taken from the preset (config.TRAIN_PRESETS)."""
    taken = left_to_preset(given)
    if taken:
        values = ", ".join(f"--{name.replace('_', '-')} {getattr(resolved, name)}" for name in taken)
        distributed.note(f"the {resolved.preset} preset's training recipe: {values} (flags override)")


def questions_fingerprint(split: SplitData) -> str:
    """A hash of a split's questions, lengths, answers and image rows ([Q] and [Q, L] arrays):
    equal iff the same questions, encoded with the same vocabulary, come in the same order.
    It reads the arrays once (~0.3 GB for CLEVR's 700k training questions)."""
    h = hashlib.sha256()
    for a in (split.questions, split.lengths, split.answers, split.image_index):
        a = np.ascontiguousarray(a)  # a memory-mapped array is contiguous already: no copy
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:32]


def _files_in(run_dir: Path) -> str:
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.name != rundir.LOCK)
    return ", ".join(names) if names else "nothing"


class Trainer:
    """Set up a run (data, model, optimizer, loaders), then `run()` it epoch by epoch.
    The run directory is claimed (checked and locked) by train() before a Trainer is made."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, dctx: distributed.Dist, progress: bool | None):
        self.dctx, self.main = dctx, dctx.is_main  # only rank 0 writes files and prints
        self.show_bar = (sys.stderr.isatty() if progress is None else progress) and self.main
        self.run_dir = rundir.absolute(cfg.resume or cfg.out)
        self.data_given = cfg.data
        self.resumed = ckpt.load_training_state(self.run_dir) if cfg.resume else None
        if self.resumed:
            saved = self.resumed["meta"]
            _check_world_size(self.run_dir, saved, dctx.world_size)
            model_cfg = ckpt.model_config_from(saved)
            cfg = _resumed_config(cfg, saved["train_config"], self.run_dir)
        else:
            cfg = dataclasses.replace(cfg, data=str(rundir.absolute(cfg.data)), out=str(self.run_dir))
        # Fine-tuning trains RUN's model (resumed, the run's own checkpoint holds it already).
        self.init = finetune.load_init(cfg.init_from) if cfg.init_from and not self.resumed else None
        if self.init:
            model_cfg = self.init.model_cfg
            cfg = dataclasses.replace(cfg, preset=self.init.meta.get("train_config", {}).get("preset", cfg.preset))
        self.cfg, self.model_cfg = train_recipe(cfg), model_cfg
        # Batch norm cannot train on one question (config.validate_training): a batch of one,
        # the last of an epoch, is skipped.
        self.skips_single, self.skip_noted = model_cfg.batchnorm, False
        self.saved_at: str | None = None  # what RUN/last.pt holds, for the non-finite loss message
        self._load_data()
        self._build()
        if not self.resumed:  # said once the data and model are accepted: an error stays one line
            _note_recipe(cfg, self.cfg)
        self.progress = Progress()
        if self.resumed:
            self._restore()
        self.tensorboard = TensorBoardLog.open(self.run_dir) if self.cfg.tensorboard and self.main else None

    def _restore(self) -> None:
        """Model, optimizer, progress and RNG from last.pt; a state that does not fit this run is
        refused in one line (the file named), before anything is trained."""
        path, state = self.run_dir / ckpt.LAST, self.resumed
        ckpt.load_weights(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.progress = Progress.from_json(state["progress"])
            _set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: its training state does not fit this run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        self.saved_at = self.progress.position()
        if self.main:
            self._trim_metrics()

    def _trim_metrics(self) -> None:
        """metrics.jsonl back to the lines of the steps last.pt holds: a training killed after
        writing an epoch's line but before its last.pt (or in the middle of the line) would
        otherwise have that epoch twice once resumed."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.progress.step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        text = "".join(kept)
        if text != path.read_text():
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    # ------------------------------------------------------------ setup

    def _load_data(self) -> None:
        cfg = self.cfg
        if self.resumed and not self.data_given and not Path(cfg.data).is_dir():
            raise UserError(f"cannot resume {self.run_dir}: it was trained on {cfg.data}, which is not there now; "
                            f"give its data: fastfilm train DATA --resume {self.run_dir}")
        # Every rank prepares the cache: a file lock lets one build it while the others wait
        # (no collective, so a long build does not run into --dist-timeout-s), then they map it.
        features = self.model_cfg.input == "features"
        cache = prepare(cfg.data, self.model_cfg.image_size, features=features, device=dali_device(self.dctx.device))
        self.vocab: Vocab = load_vocab(cache)
        data_vocab = self.vocab
        if cfg.init_from:
            # RUN's ids with DATA's new words appended (resumed: the run's own, which must still cover DATA).
            base = Vocab(**self.resumed["meta"]["vocab"]) if self.resumed else self.init.vocab
            self.vocab = finetune.extend_vocab(base, data_vocab, cfg.data, cfg.init_from)
        self.train_split, self.val_split = load_split(cache, "train"), load_split(cache, "val")
        if cfg.init_from:  # the questions were cached in DATA's ids
            self.train_split, self.val_split = (finetune.remap_split(s, data_vocab, self.vocab)
                                                for s in (self.train_split, self.val_split))
        if features:
            for s in (self.train_split, self.val_split):
                check_channels(self.model_cfg.feature_channels, s.images.shape, f"{cfg.data} ({s.name})")
        if (self.train_split.answers < 0).any():
            # preprocess refuses (or with --skip-bad drops) such questions, naming file and record:
            # only a cache built by an older fastfilm can hold them.
            raise UserError(f"{cache}: the cached train split has questions without answers; rebuild it with "
                            f"`fastfilm preprocess {cfg.data} --force`, which names the records")
        self.fingerprint = questions_fingerprint(self.train_split)
        if self.resumed:
            self._check_same_data()
        if self.main:
            self.vocab.save(self.run_dir / "vocab.json")

    def _check_same_data(self) -> None:
        """A resumed run continues on the data it was trained on: same vocabulary and answer
        set, same training questions (by fingerprint), wherever that data is now."""
        saved, data = self.resumed["meta"], self.cfg.data
        trained_on = saved["train_config"].get("data", "?")
        other = f"; it was trained on {trained_on}" if data != trained_on else ""
        if saved["vocab"] != self.vocab.to_json():
            raise UserError(f"cannot resume {self.run_dir}: {data} has another vocabulary or answer set than the "
                            f"run{other}")
        if "train_fingerprint" not in saved:
            distributed.note(f"{self.run_dir} records no fingerprint of its training questions (an older "
                             f"fastfilm): only the vocabulary of {data} was compared")
        elif saved["train_fingerprint"] != self.fingerprint:
            raise UserError(f"cannot resume {self.run_dir}: {data} does not hold the training questions of the run "
                            f"({len(self.train_split)} train questions now, {saved.get('train_questions', '?')} "
                            f"then, or the same number with other contents){other}")
        if other:
            distributed.note(f"resuming {self.run_dir} on {data}: the same questions and vocabulary as "
                             f"{trained_on}, where it was started")

    def _build(self) -> None:
        cfg, dctx = self.cfg, self.dctx
        fast = fast_config(cfg)
        if cfg.sync_bn and not dctx.enabled:
            distributed.note("--sync-bn has no effect in a single process")
        elif cfg.sync_bn and fast.fused is not False and not fast.reference:  # None: auto, maybe fused
            # The fused op computes per-rank statistics inside its kernel; SyncBN needs them global.
            fast = dataclasses.replace(fast, fused=False)
            distributed.note("--sync-bn: ResBlocks use the unfused batch norm path (global statistics)")
        self.ex = ex = resolve(fast, dctx.device)
        torch.manual_seed(cfg.seed)
        self.model = build(self.model_cfg, self.vocab, ex)
        if self.init:
            added = finetune.init_weights(self.model, self.init, self.vocab)
            distributed.note(f"--init-from {cfg.init_from}: its weights; {added} new words get new embedding rows")
        if cfg.init_from:  # before the optimizer, which takes only the parameters left to train
            frozen = finetune.freeze(self.model, cfg.train_only)
            if frozen:
                distributed.note(f"--train-only {cfg.train_only}: frozen, batch norm statistics included: "
                                 f"{', '.join(frozen)}")
        step_model = distributed.wrap(self.model, dctx, compile=ex.compile, sync_bn=cfg.sync_bn)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, ex, apex=cfg.apex)
        self.step_fn = TrainStep(step_model, self.optimizer, ex)
        self.predictor = Predictor(self.model, ex, batch_size=cfg.eval_batch_size, vocab=self.vocab)
        # The step and the predictor compile (or not) the same model: one padding policy.
        self.padding = self.predictor.padding
        shard = (dctx.rank, dctx.world_size)
        # Train first: the val split is then decided on the memory the train split left free.
        self.loader = Loader(self.train_split, cfg.batch_size, shuffle=True, seed=cfg.seed, device=dctx.device,
                             limit=cfg.max_train_questions, shard=shard, group=cfg.group_questions,
                             resident=self._resident(self.train_split, cfg.max_train_questions),
                             **self.padding.loader_kwargs(self.train_split.questions.shape[1]))
        self.val_loader = Loader(self.val_split, cfg.eval_batch_size, shuffle=False, device=dctx.device, shard=shard,
                                 resident=self._resident(self.val_split),
                                 **self.padding.loader_kwargs(self.val_split.questions.shape[1]))
        if self.skips_single and self.loader.per_rank < 2:
            raise UserError(f"{cfg.data}: {self.loader.per_rank} training question per step"
                            f"{' and rank' if dctx.enabled else ''}, and batch norm cannot train on one; "
                            "use more questions (--max-train-questions) or --no-batchnorm")
        self._build_learning()

    def _resident(self, split, limit: int = 0) -> bool:
        """--resident for one split on this rank's device (the reason said once, by rank 0)."""
        on, why = resident_decision(self.cfg.resident, self.dctx.device, resident_bytes(split, limit),
                                    f"{split.name} split")
        if why:
            distributed.note(why)
        return on

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
        if self.padding.pads_batch(len(batch), self.cfg.batch_size):
            if grouped:
                rows, weight = pad_batch(self.cfg.batch_size, *rows)
            else:
                (images, *rows), weight = pad_batch(self.cfg.batch_size, images, *rows)
        return self.step_fn(images, *rows[:3], weight=weight, image_index=rows[3] if grouped else None)

    def _check_finite(self, loss: float, where: str) -> None:
        if math.isfinite(loss):
            return
        if self.saved_at is not None:
            kept = f"the last good checkpoint is {self.run_dir / ckpt.LAST} ({self.saved_at})"
        else:
            kept = (f"no checkpoint was written yet (the first comes at the end of epoch 1); "
                    f"{self.run_dir} holds {_files_in(self.run_dir)}")
        raise NonFiniteLoss(f"non-finite loss {where}; {kept}. Try a lower --lr.")

    def _skip(self, batch: Batch) -> bool:
        """Whether to skip a batch: one question, and batch norm (see __init__). Every rank
        skips alike: shards have the same number of questions (data/loader.py)."""
        if len(batch) > 1 or not self.skips_single:
            return False
        if not self.skip_noted:  # once per run, not every epoch
            self.skip_noted = True
            distributed.note("an epoch's last batch holds one question, which batch norm cannot train on: it is "
                             "skipped (a different question each epoch; see --batch-size in `fastfilm train --help`)")
        return True

    def train_epoch(self, t_start: float, budget_s: float) -> EpochResult:
        """Train from the current batch to the end of the epoch, or until the time budget."""
        p, dctx, device = self.progress, self.dctx, self.dctx.device
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen, t_epoch, complete = 0, time.perf_counter(), True
        step_questions = self.cfg.batch_size * dctx.world_size
        bar = epoch_bar(len(self.loader), p.batch, step_questions, desc=f"epoch {p.epoch + 1}/{self.cfg.epochs}",
                        disable=not self.show_bar)
        clock_each_step = self.schedule.reads_clock and not dctx.enabled
        for batch in self.loader.epoch(p.epoch, start_batch=p.batch):
            if self._skip(batch):
                p.batch += 1  # its place in the epoch still counts, for exact resume
                bar.update(step_questions)
                continue
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
            bar.update(step_questions)
            over_budget = time.perf_counter() - t_start > budget_s
            if p.step % self.cfg.log_every == 0:
                # The only host syncs of the loop: loss check and progress display. Under torchrun
                # also its only extra collective, which sums them over ranks and hands every rank
                # rank 0's time-budget verdict.
                g_loss, g_correct, g_seen, over_budget = dctx.totals(loss_sum, correct, seen, over_budget)
                if self.schedule.reads_clock and dctx.enabled:
                    self.schedule.observe(dctx.shared_float(time.perf_counter() - t_start))
                self._check_finite(g_loss / g_seen, f"at step {p.step} (epoch {p.epoch + 1})")
                bar.set_postfix(loss=f"{g_loss / g_seen:.3f}", acc=f"{g_correct / g_seen:.3f}")
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
                "world_size": self.dctx.world_size, "train_fingerprint": self.fingerprint,
                "train_questions": len(self.train_split), "bn_stats": self.bn_record, **extra}

    def save_state(self) -> None:
        ckpt.save_training_state(self.run_dir, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": _rng_state(),
            # json text: weights_only loading accepts it whatever the nested types are.
            "progress": self.progress.to_json(), "meta": self._meta(), "schedule": self.schedule.state_dict(),
        })
        self.saved_at = self.progress.position()

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
            if self.tensorboard:
                self.tensorboard.write(line)
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
                  f"{line['train_questions_per_s']:.0f} q/s, {'epoch' if result.complete else 'part of an epoch'} "
                  f"trained in {tqdm.format_interval(result.seconds)}", file=sys.stderr)

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
        if self.tensorboard:
            self.tensorboard.close()
        self.dctx.barrier()  # when train() returns on any rank, rank 0's files are complete
        return metrics


def dali_device(device: torch.device) -> str:
    """The DALI device that builds a missing cache for training on `device`: its GPU ('mixed'
    pipeline: JPEG decodes there, PNG on the CPU) on a CUDA machine, else the CPU."""
    if device.type != "cuda":
        return "cpu"
    return f"gpu:{device.index if device.index is not None else torch.cuda.current_device()}"


def train(cfg: TrainConfig, model_cfg: ModelConfig, *, progress: bool | None = None) -> dict:
    """Train, evaluate on val each epoch, keep the best; returns the final metrics dict
    (the same on every rank under torchrun).

    Before any work the run directory is claimed by rank 0 (engine/rundir.py: created, checked
    to be new, resumed or overwritten, and locked until this returns or raises); every rank
    hears its verdict, so that a refusal ends the whole job at once."""
    validate_training(cfg, model_cfg)
    with distributed.session(cfg.device, cfg.dist_timeout_s) as dctx, contextlib.ExitStack() as held:
        claim = rundir.claim(cfg.resume or cfg.out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
        rundir.on_rank0(dctx, lambda: held.enter_context(claim))
        # model_cfg is what is built; the run's files name the preset it came from, never 'auto'.
        cfg = dataclasses.replace(cfg, preset=resolve_preset(cfg.preset, dctx.device.type))
        return Trainer(cfg, model_cfg, dctx, progress).run()
