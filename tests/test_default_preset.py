"""`fastfilm train DATA` without --preset: the paper's model on a GPU, the cpu preset on a CPU
(said in one line); --preset paper is the paper's model anywhere; model flags still override;
the run's files record the preset the model was built from."""
import json

import pytest
import torch

from fastfilm import checkpoint as ckpt
from fastfilm import config as C
from fastfilm.cli import main as cli_main
from fastfilm.commands import train as train_cmd
from fastfilm.engine import options
from fastfilm.engine import trainer as train_mod


def test_resolve_preset():
    assert C.resolve_preset("auto", "cpu") == "cpu"
    assert C.resolve_preset("auto", "cuda") == "paper"
    for name in C.PRESETS:
        assert C.resolve_preset(name, "cpu") == name and C.resolve_preset(name, "cuda") == name
    assert C.TrainConfig().preset == "auto"


@pytest.fixture
def launched(monkeypatch):
    """Run `fastfilm train ...` up to the trainer, which records what it was given instead."""
    given = {}

    def fake_train(cfg, model_cfg):
        given.update(cfg=cfg, model=model_cfg)
        return {"val_accuracy": None, "best_epoch": -1, "stopped": "epochs"}

    monkeypatch.setattr(train_cmd, "train", fake_train)
    monkeypatch.setattr(options, "_NOTED", set())  # the one-line notes print once per process

    def launch(*args, device="cpu"):
        monkeypatch.setattr(train_cmd, "resolve_device", lambda name: torch.device(device))
        assert cli_main(["train", "DATA", *args]) == 0
        return given["cfg"], given["model"]

    return launch


def test_no_preset_on_a_cpu_is_the_cpu_preset_said_in_one_line(launched, capsys):
    cfg, model = launched()
    assert cfg.preset == "cpu" and model == C.model_config("cpu")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "--preset" in ln]
    assert len(lines) == 1 and "the cpu preset (48 px" in lines[0] and "--preset paper" in lines[0], lines


def test_no_preset_on_a_gpu_is_the_paper_model_quietly(launched, capsys):
    cfg, model = launched(device="cuda")
    assert cfg.preset == "paper" and model == C.model_config("paper") == C.ModelConfig()
    assert "--preset" not in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_preset_paper_is_the_paper_model_anywhere(launched, capsys, device):
    cfg, model = launched("--preset", "paper", device=device)
    assert cfg.preset == "paper" and model == C.ModelConfig()
    assert "no --preset" not in capsys.readouterr().err


def test_model_flags_override_the_automatic_preset(launched):
    cfg, model = launched("--channels", "16", "--no-coords")
    assert cfg.preset == "cpu" and model == C.model_config("cpu", channels=16, coords=False)


def test_resume_keeps_quiet(launched, capsys):
    cfg, _ = launched("--resume", "RUN")
    assert cfg.preset == "cpu" and "no --preset" not in capsys.readouterr().err


def test_run_files_record_the_resolved_preset(generated_clevr, tmp_path):
    cfg = C.TrainConfig(data=str(generated_clevr), out=str(tmp_path / "run"), epochs=1, batch_size=16, patience=0,
                        device="cpu", reference=True)
    assert cfg.preset == "auto"
    metrics = train_mod.train(cfg, C.model_config("tiny"))
    assert metrics["preset"] == "cpu"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["preset"] == "cpu"
    saved = torch.load(tmp_path / "run" / ckpt.LAST, weights_only=True)
    assert json.loads(json.dumps(saved["meta"]))["train_config"]["preset"] == "cpu"
