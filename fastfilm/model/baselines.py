"""Table 1 baselines: how a user sees that FiLM reasons instead of reading question statistics.

- QTypeBaseline: the most frequent training answer of each question family.
- QuestionOnly: GRU -> MLP, never sees the image.
- CNNGRU: the same visual pipeline as FiLM without conditioning; the pooled image
  features and the question embedding are concatenated before the classifier MLP.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfilm.config import ModelConfig
from fastfilm.model.freeze import Freezable
from fastfilm.model.reference import Classifier, PlainResBlock, QuestionEncoder, Stem, per_question


class QuestionOnly(Freezable):
    """GRU question embedding -> FC -> BN -> ReLU -> FC."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_answers: int):
        super().__init__()
        self.cfg = cfg
        self.question = QuestionEncoder(vocab_size, cfg.embed_dim, cfg.rnn_dim)
        self.fc1 = nn.Linear(cfg.rnn_dim, cfg.classifier_fc)
        self.bn1 = nn.BatchNorm1d(cfg.classifier_fc) if cfg.batchnorm else nn.Identity()
        self.fc2 = nn.Linear(cfg.classifier_fc, num_answers)

    def may_leave_parameters_unused(self) -> bool:
        """Every parameter is on the path to the logits (see FiLMNet's)."""
        return False

    def forward(self, images: torch.Tensor, questions: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        q = self.question(questions, lengths)
        return self.fc2(F.relu(self.bn1(self.fc1(q))))


class CNNGRU(Freezable):
    """Stem + unconditioned ResBlocks -> pooled image features, concatenated with the question."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_answers: int):
        super().__init__()
        self.cfg = cfg
        self.question = QuestionEncoder(vocab_size, cfg.embed_dim, cfg.rnn_dim)
        self.stem = Stem(cfg)
        self.blocks = nn.ModuleList(PlainResBlock(cfg) for _ in range(cfg.num_blocks))
        self.classifier = Classifier(cfg, num_answers, extra_features=cfg.rnn_dim)

    def may_leave_parameters_unused(self) -> bool:
        """Every parameter is on the path to the logits (see FiLMNet's)."""
        return False

    def forward(self, images: torch.Tensor, questions: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """As FiLMNet.forward (image_index: [B] rows of images, or None)."""
        x = per_question(self.stem(images), image_index)
        for block in self.blocks:
            x = block(x, None, None)
        features = torch.cat([self.classifier.pool(x), self.question(questions, lengths)], dim=1)
        return self.classifier.head(features)


class QTypeBaseline:
    """Predicts the most frequent training answer of the question's family.

    Falls back to the most frequent answer of the question type, then overall, for
    families (or types) never seen in training.
    """

    def __init__(self) -> None:
        self.by_family: dict[int, int] = {}
        self.by_type: dict[int, int] = {}
        self.overall = 0

    @staticmethod
    def _majority(answers: np.ndarray, keys: np.ndarray) -> dict[int, int]:
        out = {}
        for k in np.unique(keys):
            if k < 0:
                continue
            values, counts = np.unique(answers[keys == k], return_counts=True)
            out[int(k)] = int(values[np.argmax(counts)])
        return out

    def fit(self, answers: np.ndarray, families: np.ndarray, types: np.ndarray) -> "QTypeBaseline":
        """answers, families, types: [Q] int arrays of the training split (-1 = unknown)."""
        known = answers >= 0
        answers, families, types = answers[known], families[known], types[known]
        self.by_family = self._majority(answers, families)
        self.by_type = self._majority(answers, types)
        values, counts = np.unique(answers, return_counts=True)
        self.overall = int(values[np.argmax(counts)]) if len(values) else 0
        return self

    def predict(self, families: np.ndarray, types: np.ndarray) -> np.ndarray:
        """[Q] predicted answer ids."""
        return np.array([self.by_family.get(int(f), self.by_type.get(int(t), self.overall))
                         for f, t in zip(families, types)], dtype=np.int64)
