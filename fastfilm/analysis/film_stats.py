"""gamma and beta of a trained FiLM model, observed and edited at test time.

`FiLMTap` hooks a FiLM model, the reference FiLMNet and FastFiLMNet alike: both compute every
FiLM-ed block's (gamma, beta) in one call of their `film_generator` module before the visual
pipeline runs, and both run each ResBlock's 3x3 conv as a `conv2` module followed by the
block's batch norm `bn` (affine off). A forward hook on film_generator records the values the
blocks receive and may replace them (the test-time ablations); a forward hook on each FiLM-ed
block's conv2 measures how many feature maps the FiLM-ed ReLU shuts off. The model runs
eagerly: torch.compile would trace the hooks away.

Shapes: Q questions in the split, F FiLM-ed blocks, C channels, B questions in a batch.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from fastfilm.errors import UserError

# edit(gamma, beta, index) -> (gamma, beta): [B, F, C] float32 on the model's device; index: [B] question rows.
Edit = Callable[[Tensor, Tensor, np.ndarray], tuple[Tensor, Tensor]]


class FiLMTap:
    """Hooks on a FiLM model for a split of Q questions; a context manager that removes them.

    Before each forward set `index` to the batch's question rows ([B] int64) and `edit` to an
    Edit (None: the values as computed). After the forward:
        gamma, beta  [Q, F, C] float32: what the F FiLM-ed blocks received (after the edit)
        relu_off     [Q, F] int64: feature maps whose FiLM-ed ReLU output is 0 at every position,
                     i.e. gamma * BN(y) + beta <= 0 over the whole map; None when FiLM is not
                     right before that ReLU (film_position other than the paper's after_bn)
    """

    def __init__(self, model: nn.Module, num_questions: int):
        gen = getattr(model, "film_generator", None)
        if gen is None:
            raise ValueError("FiLMTap needs a FiLM model with at least one FiLM-ed block (a film_generator)")
        shape = (num_questions, gen.num_film, gen.channels)
        self.gamma, self.beta = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.index: np.ndarray | None = None
        self.edit: Edit | None = None
        self._current: tuple[Tensor, Tensor] | None = None
        self._handles = [gen.register_forward_hook(self._on_film)]
        self.relu_off: np.ndarray | None = None
        if model.cfg.film_position == "after_bn":
            self.relu_off = np.zeros(shape[:2], np.int64)
            filmed_blocks = [b for b, filmed in zip(model.blocks, model.filmed) if filmed]
            for j, block in enumerate(filmed_blocks):
                self._handles.append(block.conv2.register_forward_hook(partial(self._on_conv2, j, block.bn)))

    def __enter__(self) -> FiLMTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _rows(self) -> np.ndarray:
        if self.index is None:
            raise RuntimeError("set FiLMTap.index to the batch's question rows before each forward")
        return self.index

    def _on_film(self, module: nn.Module, inputs, output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        gamma, beta = output  # [B, F, C] each, in the autocast dtype
        rows = self._rows()
        if self.edit is not None:
            g, b = self.edit(gamma.float(), beta.float(), rows)
            # Back to the computed dtype: the blocks (the fused op included) get what they expect.
            gamma, beta = g.to(gamma.dtype), b.to(beta.dtype)
        self._current = (gamma, beta)
        self.gamma[rows] = gamma.float().cpu().numpy()
        self.beta[rows] = beta.float().cpu().numpy()
        return gamma, beta

    def _on_conv2(self, j: int, bn: nn.Module, module: nn.Module, inputs, y: Tensor) -> None:
        """y: [B, C, h, w], the conv2 output of FiLM-ed block j (BN, FiLM and ReLU follow)."""
        y = y.float()
        hi, lo = y.amax((2, 3)), y.amin((2, 3))  # [B, C]
        if isinstance(bn, nn.BatchNorm2d):
            if bn.training:
                raise RuntimeError("relu_off is measured in eval mode (batch norm's running statistics)")
            # Eval-mode BN is an increasing affine map per channel: it keeps which position is max/min.
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            hi, lo = (hi - bn.running_mean) * scale, (lo - bn.running_mean) * scale
        gamma, beta = (t[:, j].float() for t in self._current)  # [B, C]
        # gamma * z + beta over a map peaks at z's max when gamma >= 0, at its min otherwise.
        peak = torch.where(gamma >= 0, gamma * hi + beta, gamma * lo + beta)
        self.relu_off[self._rows(), j] = (peak <= 0).sum(1).cpu().numpy()


# ---------------------------------------------------------------- ablations

@dataclass(frozen=True)
class Ablation:
    """A test-time edit of (gamma, beta). `start()` returns a fresh Edit for one pass over the
    split (the noise ablations restart their seeded generator), or None for no edit."""
    name: str
    start: Callable[[], Edit | None]
    noise_on: str = ""  # "gamma" or "beta" for the noise ablations
    noise_std: float = 0.0


def _replace(gamma: Tensor | None = None, beta: Tensor | None = None) -> Callable[[], Edit]:
    """Edit that sets gamma and/or beta to fixed [F, C] values for every question."""
    def edit(g: Tensor, b: Tensor, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        return (g if gamma is None else gamma.to(g.device).expand_as(g),
                b if beta is None else beta.to(b.device).expand_as(b))
    return lambda: edit


def _noise(which: str, std: float, seed: int) -> Callable[[], Edit]:
    """Edit that adds N(0, std^2) to every gamma (or beta). The noise is drawn on the CPU from a
    generator seeded at the start of each pass, so a pass is the same on any device for a
    given seed, batch size and split."""
    def start() -> Edit:
        gen = torch.Generator().manual_seed(seed)

        def edit(g: Tensor, b: Tensor, rows: np.ndarray) -> tuple[Tensor, Tensor]:
            target = g if which == "gamma" else b
            noisy = target + std * torch.randn(target.shape, generator=gen).to(target.device)
            return (noisy, b) if which == "gamma" else (g, noisy)
        return edit
    return start


NONE = Ablation("none", lambda: None)


def make_ablations(gamma_mean: np.ndarray, beta_mean: np.ndarray, noise: tuple[float, ...],
                   seed: int) -> list[Ablation]:
    """The paper's test-time ablations (Section 5, Table 3 style), after "none".

    gamma_mean, beta_mean: [F, C], each block and channel's mean over the analysed split.
    noise: standard deviations; each gives one ablation on gamma and one on beta.
    """
    gm, bm = torch.from_numpy(gamma_mean).float(), torch.from_numpy(beta_mean).float()
    out = [NONE,
           Ablation("beta=0", _replace(beta=torch.zeros_like(bm))),
           Ablation("gamma=1", _replace(gamma=torch.ones_like(gm))),
           Ablation("beta=mean", _replace(beta=bm)),
           Ablation("gamma=mean", _replace(gamma=gm)),
           Ablation("gamma,beta=mean", _replace(gamma=gm, beta=bm))]
    for which in ("gamma", "beta"):
        for std in noise:
            # Each noise ablation its own stream, derived from (seed, its place in the list).
            stream = int(np.random.SeedSequence([seed, len(out)]).generate_state(1)[0])
            out.append(Ablation(f"{which}+noise({std:g})", _noise(which, std, stream), noise_on=which, noise_std=std))
    return out


def run_pass(forward: Callable[[Tensor, Tensor, Tensor], Tensor], loader, tap: FiLMTap, ablation: Ablation = NONE,
             on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """Predicted answer ids [Q] for every question of the loader's split under `ablation`.

    forward(images, questions, lengths) -> logits [B, A]: the tapped model in eval mode (a
    fastpath Predictor that does not compile, or the model itself under inference_mode).
    Afterwards tap.gamma / tap.beta / tap.relu_off hold what this pass saw.
    """
    tap.edit = ablation.start()
    preds = np.full(loader.num_questions, -1, dtype=np.int64)
    try:
        for batch in loader.epoch(0):
            tap.index = batch.index.cpu().numpy()
            logits = forward(batch.images, batch.questions, batch.lengths)
            preds[tap.index] = logits.argmax(1).cpu().numpy()
            if on_batch is not None:
                on_batch()
    finally:
        tap.edit, tap.index = None, None
    return preds


# ---------------------------------------------------------------- statistics

def _describe(x: np.ndarray, bins: int) -> dict:
    """Summary and histogram of x [N] (the histogram's counts sum to N)."""
    counts, edges = np.histogram(x, bins=bins)
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max()),
            "negative": float((x < 0).mean()), "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def film_statistics(gamma: np.ndarray, beta: np.ndarray, relu_off: np.ndarray | None, *, near_zero: float,
                    bins: int) -> list[dict]:
    """Per FiLM-ed block, over every (question, channel) pair: gamma's and beta's summary and
    histogram, the share of gamma that is negative or near zero (|gamma| < near_zero), and the
    share of feature maps the FiLM-ed ReLU shuts off (None when not measured).

    gamma, beta: [Q, F, C]; relu_off: [Q, F] or None.
    """
    q, f, c = gamma.shape
    out = []
    for j in range(f):
        g, b = gamma[:, j].ravel(), beta[:, j].ravel()
        out.append({"gamma": {**_describe(g, bins), "near_zero": float((np.abs(g) < near_zero).mean())},
                    "beta": _describe(b, bins),
                    "relu_off": None if relu_off is None else float(relu_off[:, j].sum() / (q * c))})
    return out


def resolve_embedding(method: str) -> str:
    """'tsne' or 'pca' for --embedding auto|tsne|pca."""
    have_sklearn = importlib.util.find_spec("sklearn") is not None
    if method == "tsne" and not have_sklearn:
        raise UserError("--embedding tsne needs scikit-learn (pip install scikit-learn); or use --embedding pca")
    if method == "auto":
        return "tsne" if have_sklearn else "pca"
    return method


def sample_rows(num_questions: int, points: int, seed: int) -> np.ndarray:
    """The questions shown in the embedding: all of them, or a seeded sample of `points`, sorted: [N]."""
    if points <= 0 or num_questions <= points:
        return np.arange(num_questions)
    return np.sort(np.random.default_rng(seed).choice(num_questions, points, replace=False))


def _pca(x: np.ndarray) -> np.ndarray:
    """x [N, D] -> its first two principal components [N, 2] (zeros where there are fewer)."""
    x = x - x.mean(0)
    out = np.zeros((len(x), 2), np.float32)
    if len(x) < 2:
        return out
    _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    k = min(2, len(vt))
    # The sign of a component is arbitrary: fix it so that its largest loading is positive.
    signs = np.sign(vt[:k][np.arange(k), np.abs(vt[:k]).argmax(1)])
    out[:, :k] = x @ (vt[:k] * signs[:, None]).T
    return out


def embed(gamma: np.ndarray, beta: np.ndarray, rows: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D embedding of each question's FiLM parameters, block by block.

    gamma, beta: [Q, F, C]; rows: [N] questions to embed; method: 'tsne' or 'pca' (t-SNE needs a
    few points: below 5 PCA is used). Returns [F, N, 2] float32, point i = question rows[i].
    """
    f = gamma.shape[1]
    out = np.zeros((f, len(rows), 2), np.float32)
    for j in range(f):
        x = np.concatenate([gamma[rows, j], beta[rows, j]], axis=1)  # [N, 2C]
        if method == "tsne" and len(rows) >= 5:
            from sklearn.manifold import TSNE  # optional dependency, checked by resolve_embedding

            perplexity = min(30.0, (len(rows) - 1) / 3)
            out[j] = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        else:
            out[j] = _pca(x)
    return out


def accuracy_by(keys: np.ndarray, preds: np.ndarray, answers: np.ndarray) -> dict[str, dict]:
    """{str(key): {"accuracy", "count"}} for each value of keys [Q] in increasing order; questions
    with a negative key or without an answer (answers -1) are left out."""
    use = (keys >= 0) & (answers >= 0)
    out = {}
    for k in np.unique(keys[use]):
        sel = use & (keys == k)
        out[str(int(k))] = {"accuracy": float((preds[sel] == answers[sel]).mean()), "count": int(sel.sum())}
    return out
