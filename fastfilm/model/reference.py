"""The reference FiLM model: plain eager PyTorch that follows the paper line by line.

This is the oracle every fast path is tested against, so it favours the obvious
expression of each equation over speed. References are to Perez et al. 2017, "FiLM: Visual
Reasoning with a General Conditioning Layer" (arXiv 1709.07871): Sec. 2 the FiLM layer,
Sec. 3 the model, the Appendix for gamma's initialisation, Tables 2 and 3 the ablations.

Every ablation is chosen once, when the model is built: the gamma/beta parametrisation is a
function picked from GAMMA/BETA, the FiLM position a block class picked from FILM_POSITIONS,
batch norm off an identity module, the residual connection a flag fixed per block. No forward
dispatches on a config string. Only the switches that change parameters (batchnorm, coords,
conv2_kernel, num_blocks, film_blocks) change the state_dict; tests/test_model.py pins its
keys and shapes, so that earlier checkpoints keep loading.

Inputs everywhere:
    images:    [B, 3, S, S] uint8 pixels (or [B, F, h, w] float features when cfg.input == "features")
    questions: [B, L] int64 tokens, <START> ... <END> then <NULL>=0 padding
    lengths:   [B] int64, number of real tokens (START and END included)
    image_index (optional): [B] int64 row of `images` each question is about; `images` is
               then [M, ...] with one row per distinct image, and the stem runs once per
               image however many of its questions the batch holds.
Output: logits [B, num_answers].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfilm.config import ModelConfig, parse_film_blocks
from fastfilm.model.freeze import Freezable

# Pixels are standardised with ImageNet statistics, the convention of the ResNet
# features the paper compares against; any fixed affine map would do.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


def coord_map(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """x and y coordinates in [-1, 1]: [1, 2, h, w], dtype/device of `like`."""
    ys = torch.linspace(-1, 1, h, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1, 1, w, device=like.device, dtype=like.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None]


def with_coords(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """x: [B, C, h, w] -> [B, C + 2, h, w] (unchanged when coordinate maps are off)."""
    if not enabled:
        return x
    b, _, h, w = x.shape
    return torch.cat([x, coord_map(h, w, x).expand(b, -1, -1, -1)], dim=1)


def per_question(x: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
    """Stem output of each question's image: x [M, C, h, w], image_index [B] -> [B, C, h, w].
    The stem has no question input, so sharing it among an image's questions changes nothing
    but its batch norm statistics, which count each image once instead of once per question."""
    return x if image_index is None else x[image_index]


class QuestionEncoder(nn.Module):
    """Word embeddings + 1-layer GRU; the question is the GRU state at its last real token."""

    def __init__(self, vocab_size: int, embed_dim: int, rnn_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.rnn = nn.GRU(embed_dim, rnn_dim, batch_first=True)

    def forward(self, questions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """questions: [B, L], lengths: [B] -> [B, rnn_dim]."""
        states, _ = self.rnn(self.embed(questions))  # [B, L, rnn_dim]
        # The state after the last real token has never seen padding: padding comes
        # after it, and a GRU only looks backwards.
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.size(2))
        return states.gather(1, last).squeeze(1)


def _one_plus(raw: torch.Tensor) -> torch.Tensor:
    return 1 + raw  # Appendix: gamma = 1 + delta, so a fresh network's FiLM layers start near identity


def _unchanged(raw: torch.Tensor) -> torch.Tensor:
    return raw


# The gamma and beta parametrisations of Table 2 (ModelConfig.gamma, .beta): raw generator
# output [B, num_film, C] -> gamma or beta of the same shape.
GAMMA = {"linear": _one_plus, "one": torch.ones_like, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp}
BETA = {"linear": _unchanged, "zero": torch.zeros_like}


class FiLMGenerator(nn.Module):
    """One linear layer from the question embedding to (gamma, beta) of every FiLM-ed block (Sec. 3).
    The linear layer's output is laid out [num_film, (gamma, beta), C] for every parametrisation,
    so that checkpoints keep their meaning whichever one is chosen."""

    def __init__(self, rnn_dim: int, num_film: int, channels: int, gamma: str, beta: str):
        super().__init__()
        if gamma not in GAMMA or beta not in BETA:
            raise ValueError(f"unknown FiLM parametrisation gamma={gamma!r}, beta={beta!r}; "
                             f"gamma is one of {sorted(GAMMA)}, beta one of {sorted(BETA)}")
        self.num_film, self.channels = num_film, channels
        self.gamma_kind, self.beta_kind = gamma, beta
        self.gamma_fn, self.beta_fn = GAMMA[gamma], BETA[beta]
        self.linear = nn.Linear(rnn_dim, num_film * 2 * channels)

    @property
    def constant(self) -> bool:
        """gamma := 1 and beta := 0: the output ignores the question, so neither this layer
        nor the question encoder receives a gradient."""
        return self.gamma_fn is torch.ones_like and self.beta_fn is torch.zeros_like

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, rnn_dim] -> gamma, beta: [B, num_film, C]."""
        out = self.linear(q).view(q.size(0), self.num_film, 2, self.channels)
        return self.gamma_fn(out[:, :, 0]), self.beta_fn(out[:, :, 1])

    def extra_repr(self) -> str:
        return f"gamma={self.gamma_kind}, beta={self.beta_kind}"


def film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """FiLM(F | gamma, beta) = gamma * F + beta. x: [B, C, h, w], gamma/beta: [B, C]."""
    return gamma[:, :, None, None] * x + beta[:, :, None, None]


class Stem(nn.Module):
    """Raw pixels: `stem_layers` x (conv 4x4 stride 2, BN, ReLU). Features: conv 3x3, BN, ReLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = []
        if cfg.input == "pixels":
            c_in = 3
            for _ in range(cfg.stem_layers):
                layers += [nn.Conv2d(c_in, cfg.channels, 4, stride=2, padding=1, bias=not cfg.batchnorm)]
                layers += [nn.BatchNorm2d(cfg.channels)] if cfg.batchnorm else []
                layers += [nn.ReLU()]
                c_in = cfg.channels
        else:
            layers += [nn.Conv2d(cfg.feature_channels, cfg.channels, 3, padding=1, bias=not cfg.batchnorm)]
            layers += [nn.BatchNorm2d(cfg.channels)] if cfg.batchnorm else []
            layers += [nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.pixels = cfg.input == "pixels"
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, S, S] uint8 (or [B, F, h, w] features) -> [B, C, h, w]."""
        if self.pixels:
            x = (images.float() / 255 - self.mean) / self.std
        else:
            x = images.float()
        return self.layers(x)


class ResBlock(nn.Module):
    """The paper's ResBlock (Sec. 3), FiLM after batch norm:
        x = ReLU(Conv1x1([x, coords])); y = ReLU(FiLM(BN(Conv3x3(x)))); out = x + y.

    The blocks of the film_position ablation (Table 3) subclass it and override forward only,
    so every block has these parameters. The switches below shape the modules, whatever the
    position: batchnorm=False makes `bn` an identity and gives conv2 a bias, coords=False drops
    conv1's two coordinate input channels, conv2_kernel sets conv2's kernel, residual=False
    drops the skip connection (out = y)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, k = cfg.channels, cfg.conv2_kernel
        self.coords, self.residual = cfg.coords, cfg.residual
        self.conv1 = nn.Conv2d(c + 2 * cfg.coords, c, 1)
        # BN follows conv2, so a bias there would be cancelled by the mean subtraction.
        self.conv2 = nn.Conv2d(c, c, k, padding=k // 2, bias=not cfg.batchnorm)
        # Affine off: FiLM supplies the per-sample scale and shift.
        self.bn = nn.BatchNorm2d(c, affine=False) if cfg.batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w], gamma/beta: [B, C] -> [B, C, h, w]."""
        x = F.relu(self.conv1(with_coords(x, self.coords)))
        y = F.relu(film(self.bn(self.conv2(x)), gamma, beta))
        return x + y if self.residual else y


class PlainResBlock(ResBlock):
    """A block without FiLM (film_blocks ablation, CNN+GRU baseline): y = ReLU(BN(Conv3x3(x)))."""

    def forward(self, x: torch.Tensor, gamma: None = None, beta: None = None) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, C, h, w]; gamma and beta are not used."""
        x = F.relu(self.conv1(with_coords(x, self.coords)))
        y = F.relu(self.bn(self.conv2(x)))
        return x + y if self.residual else y


class FiLMBeforeConv1(ResBlock):
    """Table 3, FiLM on the block's input: x = ReLU(Conv1x1([FiLM(x), coords])); y = ReLU(BN(Conv3x3(x)))."""

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w], gamma/beta: [B, C] -> [B, C, h, w]."""
        x = F.relu(self.conv1(with_coords(film(x, gamma, beta), self.coords)))
        y = F.relu(self.bn(self.conv2(x)))
        return x + y if self.residual else y


class FiLMAfterConv2(ResBlock):
    """Table 3, FiLM before batch norm: y = ReLU(BN(FiLM(Conv3x3(x))))."""

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w], gamma/beta: [B, C] -> [B, C, h, w]."""
        x = F.relu(self.conv1(with_coords(x, self.coords)))
        y = F.relu(self.bn(film(self.conv2(x), gamma, beta)))
        return x + y if self.residual else y


class FiLMAfterReLU(ResBlock):
    """Table 3, FiLM after the ReLU: y = FiLM(ReLU(BN(Conv3x3(x))))."""

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w], gamma/beta: [B, C] -> [B, C, h, w]."""
        x = F.relu(self.conv1(with_coords(x, self.coords)))
        y = film(F.relu(self.bn(self.conv2(x))), gamma, beta)
        return x + y if self.residual else y


class FiLMAfterResidual(ResBlock):
    """Table 3, FiLM on the block's output: out = FiLM(x + y), y = ReLU(BN(Conv3x3(x)))."""

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w], gamma/beta: [B, C] -> [B, C, h, w]."""
        x = F.relu(self.conv1(with_coords(x, self.coords)))
        y = F.relu(self.bn(self.conv2(x)))
        return film(x + y if self.residual else y, gamma, beta)


# ModelConfig.film_position -> the class of a FiLM-ed block.
FILM_POSITIONS: dict[str, type[ResBlock]] = {"after_bn": ResBlock, "before_conv1": FiLMBeforeConv1,
                                             "after_conv2": FiLMAfterConv2, "after_relu": FiLMAfterReLU,
                                             "after_residual": FiLMAfterResidual}


def build_block(cfg: ModelConfig, filmed: bool) -> ResBlock:
    """The block `cfg` asks for: FILM_POSITIONS[cfg.film_position] if FiLM-ed, else PlainResBlock."""
    if not filmed:
        return PlainResBlock(cfg)
    if cfg.film_position not in FILM_POSITIONS:
        raise ValueError(f"unknown film_position {cfg.film_position!r}; choose from {sorted(FILM_POSITIONS)}")
    return FILM_POSITIONS[cfg.film_position](cfg)


class Classifier(nn.Module):
    """Conv1x1([x, coords]) -> BN -> ReLU -> global max-pool -> FC -> BN -> ReLU -> FC."""

    def __init__(self, cfg: ModelConfig, num_answers: int, extra_features: int = 0):
        super().__init__()
        self.coords = cfg.coords
        norm2d = (lambda n: nn.BatchNorm2d(n)) if cfg.batchnorm else (lambda n: nn.Identity())
        norm1d = (lambda n: nn.BatchNorm1d(n)) if cfg.batchnorm else (lambda n: nn.Identity())
        self.conv = nn.Conv2d(cfg.channels + 2 * cfg.coords, cfg.classifier_proj, 1)
        self.bn = norm2d(cfg.classifier_proj)
        self.fc1 = nn.Linear(cfg.classifier_proj + extra_features, cfg.classifier_fc)
        self.bn1 = norm1d(cfg.classifier_fc)
        self.fc2 = nn.Linear(cfg.classifier_fc, num_answers)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, h, w] -> [B, classifier_proj]."""
        x = F.relu(self.bn(self.conv(with_coords(x, self.coords))))
        return torch.amax(x, dim=(2, 3))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, classifier_proj + extra] -> logits [B, num_answers]."""
        return self.fc2(F.relu(self.bn1(self.fc1(features))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x))


class FiLMNet(Freezable):
    """The paper's CNN+GRU+FiLM network (Sec. 3), and every Table 2/3 ablation through ModelConfig."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_answers: int):
        super().__init__()
        self.cfg = cfg
        self.filmed = parse_film_blocks(cfg.film_blocks, cfg.num_blocks)
        num_film = sum(self.filmed)
        self.question = QuestionEncoder(vocab_size, cfg.embed_dim, cfg.rnn_dim)
        # With no FiLM-ed block ("no conditioning" ablation) there is nothing to generate.
        self.film_generator = (FiLMGenerator(cfg.rnn_dim, num_film, cfg.channels, cfg.gamma, cfg.beta)
                               if num_film else None)
        self.stem = Stem(cfg)
        self.blocks = nn.ModuleList(build_block(cfg, f) for f in self.filmed)
        self.classifier = Classifier(cfg, num_answers)

    def may_leave_parameters_unused(self) -> bool:
        """Whether a backward leaves some parameters without a gradient, which DDP must be told
        (find_unused_parameters): the question encoder and the generator, when no block is
        FiLM-ed or when FiLM is the identity (gamma := 1, beta := 0)."""
        return self.film_generator is None or self.film_generator.constant

    def film_params(self, questions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma, beta: [B, num_filmed_blocks, C], for analysis and for the fast model."""
        return self.film_generator(self.question(questions, lengths))

    def forward(self, images: torch.Tensor, questions: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        if self.film_generator is not None:
            gammas, betas = self.film_params(questions, lengths)
        # The stem output's coordinate maps are concatenated by the first block's conv1.
        x = per_question(self.stem(images), image_index)  # [B, C, h, w]
        j = 0
        for block, filmed in zip(self.blocks, self.filmed):
            if filmed:
                x = block(x, gammas[:, j], betas[:, j])
                j += 1
            else:
                x = block(x, None, None)
        return self.classifier(x)
