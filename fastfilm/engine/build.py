"""Models and optimizers for an Execution, and checkpoints turned back into models.

    model = build(model_cfg, vocab, ex)                  # fast or reference, on ex.device
    opt = build_optimizer(model, lr, weight_decay, ex, apex=False)
    loaded = load(checkpoint, ex)                        # -> Loaded(model, config, vocab, meta)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fastfilm.checkpoint import load_weights, model_config_from, read_checkpoint
from fastfilm.config import ModelConfig
from fastfilm.data.cache import SplitData, load_split, load_vocab, prepare
from fastfilm.data.features import check_channels
from fastfilm.data.vocab import Vocab
from fastfilm.engine import finetune
from fastfilm.engine.options import Execution, note
from fastfilm.errors import UserError
from fastfilm.model import build_model


def build(model_cfg: ModelConfig, vocab: Vocab, ex: Execution) -> nn.Module:
    """The fast model (or the reference one when ex.reference, or a baseline) on ex.device.
    Same parameters either way."""
    model = build_model(model_cfg, len(vocab), vocab.num_answers, fast=not ex.reference, fused=ex.fused,
                        channels_last=ex.channels_last)
    return model.to(ex.device)


def _apex_fused_adam(device: torch.device):
    """apex.optimizers.FusedAdam when genuine NVIDIA apex is usable here, else None (with a note).
    (The PyPI package named `apex` is unrelated and has no apex.optimizers.)"""
    try:
        from apex.optimizers import FusedAdam  # optional dependency
    except Exception:  # ImportError, or a broken build failing to load its extension
        note("--apex: NVIDIA apex (apex.optimizers.FusedAdam) is not importable; using torch's fused Adam")
        return None
    if device.type != "cuda":
        note(f"--apex: apex FusedAdam needs CUDA, the device is {device}; using torch's fused Adam")
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, ex: Execution, *,
                    apex: bool = False) -> torch.optim.Optimizer:
    """Adam with L2 weight decay (the paper's): apex FusedAdam if asked for and usable, else
    torch's fused implementation (one kernel per parameter group, on CUDA and CPU; faster
    than foreach here: docs/fastpath.md). State stays fp32 like the weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if ex.reference:  # the oracle trains as the plain trainer does
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if apex and (fused_adam := _apex_fused_adam(ex.device)) is not None:
        return fused_adam(params, lr=lr, weight_decay=weight_decay, adam_w_mode=False)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass
class Loaded:
    """A model restored from a checkpoint, in eval mode, with what it was trained with."""
    model: nn.Module
    config: ModelConfig
    vocab: Vocab
    meta: dict


def load(checkpoint: str | Path, ex: Execution) -> Loaded:
    """The checkpoint's model built for `ex` (fast or reference: both load the same weights)."""
    c = read_checkpoint(checkpoint)
    cfg = model_config_from(c.meta)
    try:
        vocab = Vocab(**c.meta["vocab"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{c.file}: its vocabulary is unreadable ({e})") from None
    model = build(cfg, vocab, ex)
    load_weights(model, c.state, c.file)
    return Loaded(model.eval(), cfg, vocab, c.meta)


def check_vocab_matches(vocab: Vocab, cache: Path, data: str | Path) -> None:
    """Refuse data whose questions or answers were encoded with another vocabulary."""
    cached = load_vocab(cache)
    for key, what in (("answer_token_to_idx", "answer set"), ("question_token_to_idx", "question vocabulary")):
        ours, theirs = getattr(vocab, key), getattr(cached, key)
        if ours != theirs:
            raise UserError(
                f"the checkpoint's {what} does not match {data}'s ({len(ours)} vs {len(theirs)} entries; "
                f"only in the data: {sorted(set(theirs) - set(ours))[:8]}). Build a cache with the checkpoint's "
                f"vocabulary: fastfilm preprocess {data} --vocab RUN/vocab.json --cache DIR")


def split_for(loaded: Loaded, data: str | Path, split: str) -> SplitData:
    """DATA's `split`, cached at the model's input (pixels or features) and encoded with the
    model's vocabulary: a vocabulary that holds all of DATA's words and answers under other
    ids (a fine-tuned run's, which appended DATA's new words to its parent's) is served by
    re-encoding; any other mismatch is refused."""
    features = loaded.config.input == "features"
    cache = prepare(data, loaded.config.image_size, splits=(split,), features=features)
    data_vocab = load_vocab(cache)
    if not finetune.covers(loaded.vocab, data_vocab):
        check_vocab_matches(loaded.vocab, cache, data)
    out = finetune.remap_split(load_split(cache, split), data_vocab, loaded.vocab)
    if features:
        check_channels(loaded.config.feature_channels, out.images.shape, f"{data} ({split})")
    return out
