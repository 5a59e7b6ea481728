"""Checkpoints that load without executing code, written atomically.

A run directory holds:
    last.pt                 everything needed to resume exactly (torch.load(weights_only=True) safe)
    best.safetensors        weights of the best validation epoch
    best.json               its model config, vocabulary and validation accuracy
Either file loads a model for eval/inference with `fastfilm.engine.build.load`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fastfilm.atomic import atomic_write, write_json
from fastfilm.config import ModelConfig
from fastfilm.errors import UserError

LAST = "last.pt"
BEST = "best.safetensors"


def save_training_state(run: Path, state: dict) -> None:
    """state: plain dicts/lists/numbers/strings/tensors only, so weights_only loading works."""
    atomic_write(Path(run) / LAST, lambda tmp: torch.save(state, tmp))


def load_training_state(run: Path) -> dict:
    path = Path(run) / LAST
    if not path.exists():
        raise UserError(f"cannot resume: {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_best(run: Path, model: nn.Module, meta: dict) -> None:
    """Weights as safetensors plus a JSON with model config and vocabulary."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(run) / BEST, lambda tmp: save_file(tensors, tmp))
    write_json(Path(run) / BEST.replace(".safetensors", ".json"), meta)


def resolve(path: str | Path) -> Path:
    """A run directory means its best.safetensors (or last.pt if no best yet)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).exists():
                return path / name
        raise UserError(f"{path} holds no checkpoint ({BEST} or {LAST})")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, meta) from a .pt training state or a .safetensors + .json pair.

    meta has "model_config" (dict), "vocab" (dict), "arch" and whatever else was saved.
    """
    path = resolve(path)
    if path.suffix == ".safetensors":
        meta_path = path.with_suffix(".json")
        if not meta_path.exists():
            raise UserError(f"{path} has no {meta_path.name} beside it (model config and vocabulary)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_path}: not valid JSON ({e})") from None
        return load_file(str(path)), meta
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise UserError(f"{path}: not a fastfilm checkpoint ({e})") from None
    if not isinstance(state, dict) or "model" not in state or "meta" not in state:
        raise UserError(f"{path}: not a fastfilm checkpoint (no 'model'/'meta' entries)")
    return state["model"], state["meta"]


def model_config_from(meta: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
