"""Freezing parts of a model for fine-tuning: no gradient, and batch norm statistics kept.

A frozen part's parameters get requires_grad=False (the optimizer is built from the others)
and the part stays in eval mode whatever model.train() says, so its batch norm layers
normalise with their running statistics and never update them: the part computes exactly
what it computed when it was trained. Every model inherits Freezable, whose train() puts the
frozen parts back in eval mode after nn.Module.train has set every child's mode, so the
trainer, TrainStep and Predictor switch modes with train()/eval() as they always do (and a
DDP or compiled wrapper reaches this train() through its children).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn


class Freezable(nn.Module):
    """nn.Module whose top-level parts (child modules) can be frozen; see the module docstring."""

    frozen: tuple[str, ...] = ()  # names of the frozen children

    def freeze(self, trainable: Iterable[str]) -> tuple[str, ...]:
        """Freeze every child module not named in `trainable`; returns the frozen names."""
        trainable = set(trainable)
        names = [name for name, _ in self.named_children()]
        if trainable - set(names):
            raise ValueError(f"{type(self).__name__} has no part {sorted(trainable - set(names))} (it has {names})")
        self.frozen = tuple(n for n in names if n not in trainable)
        for name in self.frozen:
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(False)
        self.train(self.training)
        return self.frozen

    def train(self, mode: bool = True) -> Freezable:
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self
