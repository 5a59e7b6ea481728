"""The trainer's learning parts (issue 12): the new metrics.jsonl fields, the batch-norm record
in both checkpoints and in `eval`, and an exact resume in the middle of an lr schedule."""
from __future__ import annotations

import json

import pytest
import torch

from fastfilm import checkpoint as ckpt
from fastfilm.cli import main
from fastfilm.config import TrainConfig, model_config
from fastfilm.engine import distributed
from fastfilm.engine import trainer as train_mod
from fastfilm.engine.schedule import LRSchedule

NEW_FIELDS = {"eval_gap", "gap_train_mode_accuracy", "gap_eval_mode_accuracy", "gap_questions", "bn_stats",
              "bn_stats_s", "val_smoothed", "val_spread", "lr"}


def cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="tiny", epochs=2, batch_size=8, lr=3e-3, patience=0,
                log_every=1, device="cpu", compile=False, amp="off", precise_bn_batches=3, eval_gap_questions=16)
    return TrainConfig(**{**base, **kw})


def lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_lines_and_checkpoints_record_the_evaluation(generated_clevr, tmp_path, capsys):
    run = tmp_path / "run"
    train_mod.train(cfg(generated_clevr, run, epochs=3, reference=True, group_questions=2, smooth_epochs=2,
                        lr_schedule="linear", max_minutes=100.0), model_config("tiny"))
    got = lines(run)
    assert [line["epoch"] for line in got] == [1, 2, 3]
    for line in got:
        assert NEW_FIELDS <= set(line), NEW_FIELDS - set(line)
        assert line["bn_stats"] == "precise" and line["gap_questions"] == 16
        assert line["eval_gap"] == pytest.approx(line["gap_train_mode_accuracy"] - line["gap_eval_mode_accuracy"])
    vals = [line["val_accuracy"] for line in got]
    assert got[2]["val_smoothed"] == pytest.approx((vals[1] + vals[2]) / 2)
    assert got[2]["val_spread"] == pytest.approx(abs(vals[2] - vals[1]))
    assert got[0]["val_spread"] == 0
    # Linear decay by the epoch budget (the 100-minute one is far off): the lr of the last step.
    steps_per_epoch = got[0]["step"]
    total = 3 * steps_per_epoch
    assert got[1]["lr"] == pytest.approx(3e-3 * max(1 - (got[1]["step"] - 1) / total, 0), rel=1e-3)
    record = {"method": "precise", "batches": 3, "batch_size": 8, "group_questions": 2,
              "ranks": "each rank's own batches, then the mean over ranks"}
    state = torch.load(run / ckpt.LAST, weights_only=True)
    assert state["meta"]["bn_stats"] == record
    assert 0 < state["schedule"]["time_progress"] < 0.1
    _, meta = ckpt.load_checkpoint(run / ckpt.BEST)
    assert meta["bn_stats"] == record
    assert meta["train_config"]["lr_schedule"] == "linear"
    capsys.readouterr()
    assert main(["eval", str(run), str(generated_clevr), "--reference", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bn_stats"] == record
    assert main(["eval", str(run), str(generated_clevr), "--reference"]) == 0
    assert "precise, recomputed from 3 training batches of 8, 2 questions per image" in capsys.readouterr().out


def test_running_statistics_when_asked(generated_clevr, tmp_path):
    run = tmp_path / "run"
    train_mod.train(cfg(generated_clevr, run, epochs=1, bn_stats="running", bn_momentum=0.05, reference=True,
                        eval_gap_questions=0), model_config("tiny"))
    line = lines(run)[0]
    assert line["bn_stats"] == "running" and "eval_gap" not in line
    assert torch.load(run / ckpt.LAST, weights_only=True)["meta"]["bn_stats"] == {"method": "running",
                                                                                  "momentum": 0.05}


def test_resume_mid_schedule_equals_uninterrupted(generated_clevr, tmp_path, monkeypatch):
    """A run that dies in epoch 2 and resumes from last.pt gives the straight run's learning
    rates, batch-norm statistics and weights (the fast model, cosine with warm-up, precise BN
    each epoch; the reference model shares all of it but the forward)."""
    model_cfg = model_config("tiny")
    kw = dict(epochs=3, lr_schedule="cosine", warmup="20%", reference=False, group_questions=2)
    train_mod.train(cfg(generated_clevr, tmp_path / "straight", **kw), model_cfg)

    real_epoch = train_mod.Trainer.train_epoch

    def dies_in_epoch_two(self, *args):
        if self.progress.epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, *args)

    monkeypatch.setattr(train_mod.Trainer, "train_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg(generated_clevr, tmp_path / "died", **kw), model_cfg)
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", real_epoch)
    train_mod.train(cfg(generated_clevr, tmp_path / "ignored", resume=str(tmp_path / "died"), **kw), model_cfg)

    straight, resumed = lines(tmp_path / "straight"), lines(tmp_path / "died")
    assert [line["lr"] for line in resumed] == [line["lr"] for line in straight]
    assert [line["val_accuracy"] for line in resumed] == [line["val_accuracy"] for line in straight]
    a = torch.load(tmp_path / "straight" / ckpt.LAST, weights_only=True)["model"]
    b = torch.load(tmp_path / "died" / ckpt.LAST, weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # The lr of the last step is the schedule's, which warmed up and then decayed.
    total = 3 * straight[0]["step"]
    s = LRSchedule(base_lr=3e-3, kind="cosine", total_steps=total, warmup_fraction=0.2)
    assert straight[-1]["lr"] == pytest.approx(s.lr(total - 1))


def test_bad_warmup_is_a_user_error(generated_clevr, tmp_path, capsys):
    assert main(["train", str(generated_clevr), "--out", str(tmp_path / "r"), "--warmup", "ten"]) == 2
    err = capsys.readouterr().err
    assert "--warmup 'ten'" in err and len(err.strip().splitlines()) == 1


def test_recipe_left_to_the_preset_is_resolved_recorded_and_said(generated_clevr, tmp_path, capsys, monkeypatch):
    """No --lr/--batch-size/--weight-decay/--group-questions: the run trains with the preset's
    values (here a recipe patched in, so that every one differs from the paper's), the optimizer
    gets them, the checkpoint records numbers, not None, and one line says what was taken."""
    from fastfilm import config as C

    recipe = dict(lr=2e-3, batch_size=6, weight_decay=1e-4, group_questions=2, lr_schedule="constant", warmup="0")
    monkeypatch.setitem(C.TRAIN_PRESETS, "tiny", recipe)
    run = tmp_path / "run"
    kw = {k: v for k, v in cfg(generated_clevr, run, epochs=1).__dict__.items()
          if k not in ("lr", "batch_size", "group_questions")}
    t = train_mod.Trainer(TrainConfig(**kw), model_config("tiny"), distributed.Dist(device=torch.device("cpu")),
                          progress=False)
    assert (t.cfg.lr, t.cfg.batch_size, t.cfg.weight_decay, t.cfg.group_questions) == (2e-3, 6, 1e-4, 2)
    group = t.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (2e-3, 1e-4)
    assert len(next(iter(t.loader.epoch(0)))) == 6
    t.run()
    saved = torch.load(run / ckpt.LAST, weights_only=True)["meta"]["train_config"]
    assert {k: saved[k] for k in recipe} == recipe
    err = capsys.readouterr().err
    assert "the tiny preset's training recipe: --lr 0.002, --batch-size 6, --weight-decay 0.0001, " \
           "--group-questions 2, --lr-schedule constant, --warmup 0 (flags override)" in " ".join(err.split())
