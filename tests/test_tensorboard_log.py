"""`fastfilm train --tensorboard`: metrics.jsonl's scalars as TensorBoard events, with a
stand-in SummaryWriter, without tensorboard, and (when installed) with the real one."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from fastfilm.config import TrainConfig, model_config
from fastfilm.engine import trainer as train_mod


# Tiny tensors on a shared 2-core machine: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def train(data, run, **kw) -> list[dict]:
    """A 2-epoch tiny run with --tensorboard; returns its metrics.jsonl lines."""
    cfg = TrainConfig(data=str(data), out=str(run), preset="tiny", epochs=2, batch_size=16, patience=0,
                      device="cpu", reference=True, tensorboard=True, **kw)
    train_mod.train(cfg, model_config("tiny"), progress=False)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(lines: list[dict]) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every number of every line, written out field by field."""
    out = []
    for line in lines:
        step = line["step"]
        for key in ("epoch", "train_loss", "train_accuracy", "val_accuracy", "train_questions_per_s", "elapsed_s",
                    "val_smoothed", "val_spread", "lr", "gap_train_mode_accuracy", "gap_eval_mode_accuracy",
                    "eval_gap", "gap_questions", "bn_stats_s"):
            if line.get(key) is not None:
                out.append((key, float(line[key]), step))
        out.append(("complete_epoch", 1.0 if line["complete_epoch"] else 0.0, step))
        out += [(f"val_per_type/{t}", float(v), step) for t, v in line["val_per_type"].items() if v is not None]
    return sorted(out)


class RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter."""
    made: list[RecordingWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.flushes, self.closed = log_dir, [], 0, False
        RecordingWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


def test_every_metrics_line_becomes_scalars(generated_clevr, tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    RecordingWriter.made.clear()
    lines = train(generated_clevr, tmp_path / "run")
    [writer] = RecordingWriter.made
    assert writer.log_dir == str(tmp_path / "run" / "tensorboard")
    assert len(lines) == 2 and any(k.startswith("val_per_type/") for k, _, _ in writer.scalars)
    assert sorted(writer.scalars) == expected_scalars(lines)
    assert writer.flushes == len(lines) and writer.closed  # each line on disk as soon as it is in metrics.jsonl


def test_without_tensorboard_one_line_and_metrics_jsonl_as_always(generated_clevr, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import raises ImportError
    lines = train(generated_clevr, tmp_path / "run")
    said = [l for l in capsys.readouterr().err.splitlines() if "--tensorboard" in l]
    assert said == ["fastfilm: --tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                    "writing metrics.jsonl only"]
    assert len(lines) == 2 and not (tmp_path / "run" / "tensorboard").exists()


def test_real_event_files_hold_the_metrics(generated_clevr, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = train(generated_clevr, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    got = sorted((tag, e.value, e.step) for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
    want = expected_scalars(lines)
    assert [(t, s) for t, _, s in got] == [(t, s) for t, _, s in want]
    # Event files store float32.
    torch.testing.assert_close(torch.tensor([v for _, v, _ in got]), torch.tensor([v for _, v, _ in want]))
