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
import pickle
import sys
from dataclasses import dataclass
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


# What a last.pt written by save_training_state holds (engine/trainer.py fills it).
TRAINING_STATE = ("model", "optimizer", "rng", "progress", "meta")
_META = ("model_config", "vocab")


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]


def _load_pt(path: Path) -> dict:
    """torch.load(weights_only=True): tensors and plain data only, never code. UserError
    naming the file for anything it cannot read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused an object that is not plain data: unpickling it could run code.
        raise UserError(f"{path}: refused: it holds Python objects other than tensors and plain data "
                        "(loading them could run code); not a fastfilm checkpoint") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... for a damaged file
        raise UserError(f"{path}: damaged or not a PyTorch checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict) or "model" not in state or "meta" not in state:
        raise UserError(f"{path}: not a fastfilm checkpoint (no 'model'/'meta' entries)")
    _check_meta(state["meta"], path)
    return state


def _check_meta(meta, path: Path) -> None:
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict) for k in _META):
        raise UserError(f"{path}: not a fastfilm checkpoint (its metadata lacks {' and '.join(_META)})")


def load_training_state(run: Path) -> dict:
    """RUN/last.pt, everything a resume needs; UserError naming the file and what the run
    directory holds instead when it is missing, damaged or not a training state."""
    path = Path(run) / LAST
    if not path.exists():
        # (the lock file is the resuming process's own: engine/rundir.py)
        held = sorted(p.name for p in Path(run).iterdir() if not p.name.startswith(".") and p.name != "lock")
        what = f"it holds {', '.join(held)}" if held else "it is empty"
        raise UserError(f"cannot resume {run}: no {LAST} there ({what}); a run is resumable once its first "
                        f"epoch or --max-minutes budget ends")
    state = _load_pt(path)
    missing = [k for k in TRAINING_STATE if k not in state]
    if missing or not isinstance(state["meta"].get("train_config"), dict):
        raise UserError(f"{path}: not a fastfilm training state (no {', '.join(missing) or 'train_config'}); "
                        "weights alone cannot be resumed")
    return state


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


@dataclass
class Checkpoint:
    """Weights and metadata read from `file` (the file actually read, after a fallback)."""
    state: dict
    meta: dict
    file: Path


def _load_safetensors(path: Path) -> Checkpoint:
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        raise UserError(f"{path} has no {meta_path.name} beside it (model config and vocabulary)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({e})") from None
    _check_meta(meta, meta_path)
    try:
        state = load_file(str(path))  # a flat table of tensors: no code to run, whatever the file holds
    except Exception as e:  # safetensors' SafetensorError, or an OSError
        raise UserError(f"{path}: damaged or not a safetensors file ({_first_line(e)})") from None
    return Checkpoint(state, meta, path)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A .pt training state or a .safetensors + .json pair, or a run directory's best one.

    A run directory whose best.safetensors (or best.json) cannot be read falls back to its
    last.pt when that one is intact, saying so on stderr: the user asked for the run's model.
    A file named explicitly is read as it is.
    """
    given = Path(path)
    path = resolve(given)
    if path.suffix != ".safetensors":
        state = _load_pt(path)
        return Checkpoint(state["model"], state["meta"], path)
    try:
        return _load_safetensors(path)
    except UserError as e:
        last = path.parent / LAST
        if not last.exists():
            raise
        if not given.is_dir():
            raise UserError(f"{e}; {last} is beside it (the last epoch's weights)") from None
        try:
            state = _load_pt(last)
        except UserError as e_last:
            raise UserError(f"{e}; and {e_last}") from None
        print(f"fastfilm: {e}; using {last} instead (the last epoch's weights, not the best epoch's)",
              file=sys.stderr)
        return Checkpoint(state["model"], state["meta"], last)


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, meta) from a .pt training state or a .safetensors + .json pair.

    meta has "model_config" (dict), "vocab" (dict), "arch" and whatever else was saved.
    """
    c = read_checkpoint(path)
    return c.state, c.meta


def load_weights(model: nn.Module, state: dict, source: str | Path) -> None:
    """model.load_state_dict(state), after checking that every tensor is there with the
    model's shape: UserError naming the tensor and both shapes, never a half-loaded model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit the model its config describes "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{source}: entry {name} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but the model its config "
                            f"describes needs {tuple(own[name].shape)}")
    model.load_state_dict(state)


def model_config_from(meta: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
