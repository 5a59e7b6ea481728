"""Models: the reference FiLM network (the oracle) and the Table 1 baselines."""
from __future__ import annotations

import torch.nn as nn

from fastfilm.config import ModelConfig
from fastfilm.model.baselines import CNNGRU, QTypeBaseline, QuestionOnly
from fastfilm.model.reference import FiLMNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"film": FiLMNet, "cnn_gru": CNNGRU, "question_only": QuestionOnly}


def build_model(cfg: ModelConfig, vocab_size: int, num_answers: int) -> nn.Module:
    """The reference network named by cfg.arch (chosen once, here, never inside forward)."""
    return ARCHITECTURES[cfg.arch](cfg, vocab_size, num_answers)


__all__ = ["ARCHITECTURES", "build_model", "FiLMNet", "CNNGRU", "QuestionOnly", "QTypeBaseline"]
