"""Models whose answers depend on the image and the question, for tests that compare predictions.

A comparison of predictions (sharded vs single-process evaluation, fast vs reference path, a
checkpoint vs the metrics saved with it) can only fail when the predictions vary: a model that
gives one answer to every question agrees with any other such model. A tiny model trained for
a few steps often collapses to one answer, and whether it does depends on the CPU it trained on
(the order of its floating-point sums). Likewise an accuracy of 0 (or 1) is the same for
any model, miscounted or not. The helpers here set weights, without training, so that neither
happens:

    make_sensitive(model, fit, check, A)   set a FiLM network's weights in place, then check them
    sensitive_checkpoint(path, data)       the same, written back into a checkpoint file
    sensitive_film(data)                   a FiLMNet factory for fastfilm.model.ARCHITECTURES,
                                           so that a trainer starts from sensitive weights
    assert_sensitive(model, batch)         the check: answers vary with the question and with
                                           the image, some are right and some wrong, and none
                                           is a near tie

Every result is checked by `assert_sensitive`, so a test that relies on it fails at once, on
the machine that breaks the assumption, rather than passing vacuously.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastfilm import checkpoint as ckpt
from fastfilm.config import FastConfig, ModelConfig
from fastfilm.data.cache import load_split, prepare
from fastfilm.data.loader import Batch, Loader
from fastfilm.engine.build import load
from fastfilm.engine.options import Execution, resolve
from fastfilm.model import FiLMNet, build_model

# gamma/beta are the only path from the question to the answer; tripled, they differ enough
# between questions for most questions about one image to get different answers.
FILM_SCALE = 3.0
# Ridge penalty of the last layer's fit: enough that on the tiny generated data many of the
# fitted answers come out right but not all (assert_sensitive checks both).
RIDGE = 1.0
# Smallest gap between the best and the second-best logit, relative to the spread of the
# batch's logits. Two fp32 implementations of the same function (another CPU's kernels, the
# fused eval path) differ by ~1e-6 of it, so every argmax is the same on every machine.
MIN_MARGIN = 1e-4


def split_batch(data: str | Path, image_size: int, split: str) -> Batch:
    """Every question of a split as one batch, in question order (images [Q, 3, S, S] uint8,
    one row per question)."""
    questions = load_split(prepare(data, image_size), split)
    return next(Loader(questions, len(questions), shuffle=False).epoch(0))


def labelled_batch(data: str | Path, image_size: int) -> Batch:
    """The train and val questions of DATA as one batch (questions 0-padded to one length)."""
    a, b = split_batch(data, image_size, "train"), split_batch(data, image_size, "val")
    width = max(a.questions.size(1), b.questions.size(1))
    questions = torch.cat([F.pad(x.questions, (0, width - x.questions.size(1))) for x in (a, b)])
    rows = torch.arange(len(questions))
    return Batch(torch.cat([a.images, b.images]), questions, torch.cat([a.lengths, b.lengths]),
                 torch.cat([a.answers, b.answers]), torch.cat([a.types, b.types]),
                 torch.cat([a.families, b.families]), rows, rows)


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, batch: Batch) -> None:
    """Running statistics := the statistics of `batch` (one forward in training mode).

    Without it a fresh model's eval-mode batch norm (mean 0, variance 1) leaves every
    activation's input-independent part in place, and that part decides the answer."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, exactly its statistics
    was_training = model.training
    model.train()
    try:
        model(batch.images, batch.questions, batch.lengths)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def _other_images(images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, S, S] rolled by the smallest shift that gives every row another image."""
    b = images.size(0)
    for shift in range(1, b):
        rolled = images.roll(shift, 0)
        if (rolled != images).flatten(1).any(1).all():
            return rolled
    raise ValueError("the batch needs questions about at least two images (and no image more than half of them)")


@torch.no_grad()
def fit_last_layer(model: nn.Module, batch: Batch, num_answers: int) -> None:
    """The last linear layer (classifier.fc2) := the ridge regression of `batch`'s one-hot
    answers on its inputs in eval mode, so that answers are plausible for their question."""
    seen = {}
    hook = model.classifier.fc2.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    was_training = model.training
    model.eval()
    try:
        model(batch.images, batch.questions, batch.lengths)
    finally:
        hook.remove()
        model.train(was_training)
    x = F.pad(seen["x"].double(), (0, 1), value=1.0)  # [B, fc + 1]: a column of ones for the bias
    y = F.one_hot(batch.answers, num_answers).double()  # [B, A]
    w = torch.linalg.solve(x.T @ x + RIDGE * torch.eye(x.size(1), dtype=x.dtype), x.T @ y)  # [fc + 1, A]
    model.classifier.fc2.weight.copy_(w[:-1].T)
    model.classifier.fc2.bias.copy_(w[-1])


@torch.no_grad()
def assert_sensitive(model: nn.Module, batch: Batch, *, min_answers: int = 3) -> torch.Tensor:
    """Check that the eval-mode model's answers to `batch` vary: at least `min_answers` distinct
    answers, some of which change when each question is asked about another image, and some
    when each image gets another question; that some are right and some wrong (where the batch
    has answers); and that no answer is a near tie (MIN_MARGIN). Returns the logits [B, A]."""
    was_training = model.training
    model.eval()
    try:
        logits = model(batch.images, batch.questions, batch.lengths).float()
        other_image = model(_other_images(batch.images), batch.questions, batch.lengths).argmax(1)
        other_question = model(batch.images, batch.questions.roll(1, 0), batch.lengths.roll(1, 0)).argmax(1)
    finally:
        model.train(was_training)
    preds = logits.argmax(1)
    top2 = logits.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]) / (logits.max() - logits.min())
    summary = (f"answers {preds.tolist()}; with other images {other_image.tolist()}; "
               f"with other questions {other_question.tolist()}; smallest margin {margin.min():.2e}")
    assert len(set(preds.tolist())) >= min_answers, f"fewer than {min_answers} distinct answers: {summary}"
    assert (other_image != preds).any(), f"answers do not depend on the image: {summary}"
    assert (other_question != preds).any(), f"answers do not depend on the question: {summary}"
    known = batch.answers >= 0
    right = int((preds == batch.answers)[known].sum())
    assert not known.any() or 0 < right < int(known.sum()), f"{right} of {int(known.sum())} right: {summary}"
    assert margin.min() >= MIN_MARGIN, f"an answer is a near tie: {summary}"
    return logits


@torch.no_grad()
def make_sensitive(model: nn.Module, fit: Batch, check: Batch, num_answers: int) -> torch.Tensor:
    """Set weights of a FiLM network (FiLMNet or FastFiLMNet: the same parameters) in place so
    that its answers depend on the image and the question, then `assert_sensitive` on `check`.

    - FiLM generator weights x FILM_SCALE: gamma/beta vary strongly between questions;
    - batch norm running statistics := those of `fit`, so that eval mode normalises each
      activation around its data mean and the input-dependent part decides the answer (with
      a fresh model's mean 0 and variance 1 the input-independent part decides it alone);
    - the last layer := fit_last_layer on `fit`: the bias no longer holds one answer for all
      (as a collapsed model's does), and many answers, not all, are right.
    Uses no random numbers (the global RNG state is untouched). Returns the logits on `check`.
    """
    model.film_generator.linear.weight.mul_(FILM_SCALE)
    calibrate_batch_norm(model, fit)
    fit_last_layer(model, fit, num_answers)
    return assert_sensitive(model, check)


def sensitive_checkpoint(path: str | Path, data: str | Path) -> None:
    """Make the FiLM model in a run's last.pt or best.safetensors sensitive (make_sensitive,
    fitted on DATA's train and val questions, checked on its val split), in place. In last.pt
    only the weights change: optimizer state and progress stay as the trainer left them."""
    path = Path(path)
    if path.name not in (ckpt.LAST, ckpt.BEST):
        raise ValueError(f"{path}: expected a run's {ckpt.LAST} or {ckpt.BEST}")
    state, meta = ckpt.load_checkpoint(path)
    cfg, vocab = ckpt.model_config_from(meta), meta["vocab"]
    model = build_model(cfg, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]))
    model.load_state_dict(state, strict=True)
    make_sensitive(model, labelled_batch(data, cfg.image_size), split_batch(data, cfg.image_size, "val"),
                   len(vocab["answer_token_to_idx"]))
    if path.name == ckpt.BEST:
        ckpt.save_best(path.parent, model, meta)
    else:
        training = torch.load(path, map_location="cpu", weights_only=True)
        training["model"] = model.state_dict()
        ckpt.save_training_state(path.parent, training)


def sensitive_film(data: str | Path):
    """A stand-in for FiLMNet in fastfilm.model.ARCHITECTURES (what the trainer builds with
    --reference): FiLMNet(cfg, vocab_size, num_answers) made sensitive on DATA.

        monkeypatch.setitem(fastfilm.model.ARCHITECTURES, "film", sensitive_film(data))

    Training from it with a small learning rate keeps its answers varied; check the trained
    weights with assert_sensitive."""
    def build(cfg: ModelConfig, vocab_size: int, num_answers: int) -> FiLMNet:
        model = FiLMNet(cfg, vocab_size, num_answers)
        make_sensitive(model, labelled_batch(data, cfg.image_size), split_batch(data, cfg.image_size, "val"),
                       num_answers)
        return model

    return build


def load_model(checkpoint, device, fast: FastConfig | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, the checkpoint's meta): the reference model, or with `fast` the
    fast path those switches give on `device`."""
    device = torch.device(device)
    ex = resolve(fast, device) if fast is not None else Execution(device, reference=True)
    loaded = load(checkpoint, ex)
    return loaded.model, loaded.meta
