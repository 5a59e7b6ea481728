"""Models: the reference FiLM network (the oracle), the Table 1 baselines and the fast model."""
from __future__ import annotations

import torch.nn as nn

from fastfilm.config import ModelConfig
from fastfilm.model.baselines import CNNGRU, QTypeBaseline, QuestionOnly
from fastfilm.model.fast import FastFiLMNet
from fastfilm.model.reference import FiLMNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"film": FiLMNet, "cnn_gru": CNNGRU, "question_only": QuestionOnly}


def build_model(cfg: ModelConfig, vocab_size: int, num_answers: int, *, fast: bool = False, fused: bool = True,
                channels_last: bool = True) -> nn.Module:
    """The network named by cfg.arch (chosen once, here, never inside forward): the reference
    network, or with `fast` the fast model of the same parameters where there is one (FiLM;
    the baselines have no fast twin and are built as they are). fused/channels_last: the
    fast model's ablations."""
    if fast and cfg.arch == "film":
        return FastFiLMNet(cfg, vocab_size, num_answers, fused=fused, channels_last=channels_last)
    return ARCHITECTURES[cfg.arch](cfg, vocab_size, num_answers)


__all__ = ["ARCHITECTURES", "build_model", "FiLMNet", "FastFiLMNet", "CNNGRU", "QuestionOnly", "QTypeBaseline"]
