"""The fast FiLM model: the reference network's parameters, computed faster.

FastFiLMNet has exactly FiLMNet's parameters, buffers and state_dict keys (a checkpoint of
one loads strictly into the other) and computes the same function. What differs is how:
- Question encoder: the GRU's input projection is applied once to the vocabulary table
  ([V, 3H], V << B*L on CLEVR) and gathered per token, instead of once per token; the
  recurrence is one opaque op (fastfilm.kernels.gru_last_state) so that torch.compile
  neither breaks the graph on nn.GRU nor unrolls L steps into it. On the CPU it packs rows:
  each question stops at its length.
- channels_last activations through the visual pipeline.
- Coordinate maps enter every 1x1 conv as a per-position bias ([1, C_out, h, w], from the
  weight's last two input channels) instead of a concatenated copy of the activations.
- Every ResBlock in the paper's configuration (FiLM after BN, batch norm, residual) ends in
  fastfilm.kernels.bn_film_relu_residual; in eval it folds the running statistics. Other block
  configurations use the reference block classes unchanged (build_block, chosen at construction).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastfilm.config import ModelConfig
from fastfilm.model.freeze import Freezable
from fastfilm.model.reference import (Classifier, FiLMGenerator, Stem, build_block, coord_map, parse_film_blocks,
                                      per_question)
from fastfilm.kernels.bn_film_relu_residual import bn_film_relu_residual, film_relu_residual
from fastfilm.kernels.gru_last_state import gru_last_state

# ---------------------------------------------------------------- modules


class GRUWeights(nn.Module):
    """nn.GRU's parameters (same names, shapes and initialisation) without its forward,
    which torch.compile cannot trace without unrolling every time step."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size))
        bound = hidden_size ** -0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)


class FastQuestionEncoder(nn.Module):
    """QuestionEncoder's parameters; the state at the last real token, gathered on device."""

    def __init__(self, vocab_size: int, embed_dim: int, rnn_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = GRUWeights(embed_dim, rnn_dim)

    def input_gates(self, questions: Tensor) -> Tensor:
        """questions: [B, L] -> x W_ih^T + b_ih: [L, B, 3H] (time-major for the recurrence)."""
        w, b = self.rnn.weight_ih_l0, self.rnn.bias_ih_l0
        tokens = questions.t()
        if tokens.numel() < self.embed.num_embeddings:  # tiny batches: project the tokens
            return F.linear(F.embedding(tokens, self.embed.weight, padding_idx=0), w, b)
        # Project the vocabulary once and gather. Row 0 (<NULL>) is detached to keep
        # nn.Embedding(padding_idx=0)'s rule that the padding row gets no gradient.
        table = torch.cat([self.embed.weight[:1].detach(), self.embed.weight[1:]])
        return F.embedding(tokens, F.linear(table, w, b))

    def forward(self, questions: Tensor, lengths: Tensor) -> Tensor:
        """questions: [B, L], lengths: [B] -> [B, rnn_dim]."""
        # Longest question first, so that on the CPU the recurrence can drop each row after its
        # last real token (padding follows it and a GRU only looks backwards: the state there
        # never sees padding). Sorting and gathering happen on the device: no host sync.
        order = torch.argsort(lengths, descending=True, stable=True)
        last = gru_last_state(self.input_gates(questions[order]), self.rnn.weight_hh_l0, self.rnn.bias_hh_l0,
                              lengths[order])
        return torch.empty_like(last).index_copy_(0, order, last)  # [B, H] in the input order


def conv1x1_coords(x: Tensor, conv: nn.Conv2d, coords: bool) -> Tensor:
    """conv(cat(x, coord maps)) without the concatenation. x: [B, C, h, w] -> [B, C_out, h, w].
    The two coordinate input channels only add a [1, C_out, h, w] per-position bias."""
    if not coords:
        return conv(x)
    c = x.size(1)
    w = conv.weight
    out = F.conv2d(x, w[:, :c], conv.bias)
    # Pointwise rather than a conv on the [1, 2, h, w] maps: a 2-channel conv falls back to
    # ATen's slow path (~ms per call), while this fuses into the next op under compile.
    xy = coord_map(x.size(2), x.size(3), out)[0]  # [2, h, w]
    return out + (w[:, c] * xy[0] + w[:, c + 1] * xy[1])[None]


class FastStem(Stem):
    """The reference stem, normalising uint8 pixels straight into channels_last."""

    def __init__(self, cfg: ModelConfig, channels_last: bool):
        super().__init__(cfg)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: Tensor) -> Tensor:
        """images: [B, 3, S, S] uint8 (or [B, F, h, w] features) -> [B, C, h, w]."""
        x = images.float()
        if self.pixels:
            x = (x / 255 - self.mean) / self.std
        return self.layers(x.contiguous(memory_format=self.memory_format))


class FusedResBlock(nn.Module):
    """The paper's ResBlock (FiLM after BN, batch norm, residual); same parameters as ResBlock.
    fused=False computes the same tail as separate torch ops (the ablation)."""

    def __init__(self, cfg: ModelConfig, fused: bool = True):
        super().__init__()
        c, k = cfg.channels, cfg.conv2_kernel
        self.coords, self.fused = cfg.coords, fused
        self.conv1 = nn.Conv2d(c + 2 * cfg.coords, c, 1)
        self.conv2 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.tail = self._fused_tail if fused else self._unfused_tail

    def _fused_tail(self, y: Tensor, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        bn = self.bn
        if self.training:
            # F.batch_norm counts the batches; the fused op only updates the statistics.
            bn.num_batches_tracked.add_(1)
        return bn_film_relu_residual(y, x, gamma, beta, bn.running_mean, bn.running_var, training=self.training,
                                     momentum=bn.momentum, eps=bn.eps)

    def _unfused_tail(self, y: Tensor, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        # The bn module itself, not F.batch_norm: with --sync-bn it is a GlobalBatchNorm
        # (the reason this path exists there), and it counts num_batches_tracked.
        return film_relu_residual(self.bn(y), x, gamma, beta)

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """x: [B, C, h, w], gamma/beta: [B, C] -> [B, C, h, w]."""
        x = F.relu(conv1x1_coords(x, self.conv1, self.coords))
        return self.tail(self.conv2(x), x, gamma, beta)


class FastClassifier(Classifier):
    """The reference classifier with the coordinate maps as a bias of its 1x1 conv."""

    def pool(self, x: Tensor) -> Tensor:
        """x: [B, C, h, w] -> [B, classifier_proj]."""
        x = F.relu(self.bn(conv1x1_coords(x, self.conv, self.coords)))
        return torch.amax(x, dim=(2, 3))


def is_paper_block(cfg: ModelConfig, filmed: bool) -> bool:
    """Whether a ResBlock has the paper's structure that the fused op implements."""
    return filmed and cfg.film_position == "after_bn" and cfg.batchnorm and cfg.residual


class FastFiLMNet(Freezable):
    """FiLMNet's parameters and function, computed with the fast path (see module docstring).

    Inputs and output as FiLMNet: images [B, 3, S, S] uint8 (any memory format), questions
    [B, L] int64, lengths [B] int64 (, image_index [B]) -> logits [B, num_answers]. `fused=False` uses separate
    torch ops for the ResBlock tail; `channels_last=False` keeps NCHW activations.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_answers: int, *, fused: bool = True,
                 channels_last: bool = True):
        super().__init__()
        if cfg.arch != "film":
            raise ValueError(f"FastFiLMNet implements arch 'film', not {cfg.arch!r}")
        self.cfg = cfg
        self.filmed = parse_film_blocks(cfg.film_blocks, cfg.num_blocks)
        num_film = sum(self.filmed)
        self.question = FastQuestionEncoder(vocab_size, cfg.embed_dim, cfg.rnn_dim)
        self.film_generator = (FiLMGenerator(cfg.rnn_dim, num_film, cfg.channels, cfg.gamma, cfg.beta)
                               if num_film else None)
        self.stem = FastStem(cfg, channels_last)
        self.blocks = nn.ModuleList(FusedResBlock(cfg, fused) if is_paper_block(cfg, f) else build_block(cfg, f)
                                    for f in self.filmed)
        # Block i takes (gamma, beta)[:, film_index[i]]; -1: no FiLM.
        self.film_index = [sum(self.filmed[:i]) if f else -1 for i, f in enumerate(self.filmed)]
        self.classifier = FastClassifier(cfg, num_answers)

    def may_leave_parameters_unused(self) -> bool:
        """As FiLMNet.may_leave_parameters_unused (the same parameters take the same paths)."""
        return self.film_generator is None or self.film_generator.constant

    def forward(self, images: Tensor, questions: Tensor, lengths: Tensor, image_index: Tensor | None = None) -> Tensor:
        if self.film_generator is not None:
            gammas, betas = self.film_generator(self.question(questions, lengths))  # [B, num_film, C] each
        x = per_question(self.stem(images), image_index)  # [B, C, h, w]
        for block, j in zip(self.blocks, self.film_index):
            x = block(x, gammas[:, j], betas[:, j]) if j >= 0 else block(x, None, None)
        return self.classifier(x)  # [B, num_answers]
