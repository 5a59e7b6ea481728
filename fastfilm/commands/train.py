"""`fastfilm train`: the trainer (engine/trainer.py) behind the command line."""
from __future__ import annotations

import dataclasses
import sys

from fastfilm.config import TrainConfig, describe_preset, model_config, resolve_preset, validate, validate_training
from fastfilm.engine import distributed, finetune
from fastfilm.engine.options import note
from fastfilm.engine.trainer import NonFiniteLoss, train
from fastfilm.hardware import resolve_device


def run(cfg: TrainConfig, model_overrides: dict | None = None) -> int:
    device = resolve_device(cfg.device)
    preset = resolve_preset(cfg.preset, device.type)
    model_cfg = model_config(preset, **(model_overrides or {}))
    validate(model_cfg)
    validate_training(cfg, model_cfg)
    if cfg.init_from and model_overrides and not cfg.resume:
        finetune.check_model_flags(finetune.load_init(cfg.init_from), model_overrides)
    if cfg.resume and model_overrides:
        flags = ", ".join("--" + name.replace("_", "-") for name in model_overrides)
        distributed.note(f"--resume {cfg.resume} keeps the run's model; ignored: {flags}")
    # Resumed or fine-tuned, the run's or RUN's own model trains, whatever the preset.
    if preset != cfg.preset and preset != "paper" and not cfg.resume and not cfg.init_from:
        note(f"no --preset on a {device.type.upper()}: the {preset} preset ({describe_preset(preset)}), which learns "
             f"within minutes here; --preset paper for the paper's model ({describe_preset('paper')})")
    # Resolved before training: the checkpoint records the preset the model was built from.
    cfg = dataclasses.replace(cfg, preset=preset)
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
