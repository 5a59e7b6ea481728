"""Precise BN (engine/bn_stats.py): recomputed running statistics are the batch statistics
each layer saw, for the reference and the fast model alike, with independent and grouped
batches; the eval-gap measurement leaves the model as it found it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fastfilm.config import model_config
from fastfilm.data.loader import Batch
from fastfilm.engine import bn_stats
from fastfilm.model import build_model

VOCAB, ANSWERS = 30, 7


# Tiny tensors on a shared 2-core machine: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(b: int, seed: int, size: int = 32, length: int = 9, images: int | None = None) -> Batch:
    """b questions about `images` distinct images (None: one image per question)."""
    g = torch.Generator().manual_seed(seed)
    m = b if images is None else images
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    questions = torch.randint(4, VOCAB, (b, length), generator=g)
    questions[torch.arange(length)[None] >= lengths[:, None]] = 0
    image_index = torch.arange(b) if images is None else torch.randint(0, m, (b,), generator=g)
    if images is not None:
        image_index[:m] = torch.arange(m)  # every image is asked about
    return Batch(images=torch.randint(0, 256, (m, 3, size, size), dtype=torch.uint8, generator=g),
                 questions=questions, lengths=lengths, answers=torch.randint(0, ANSWERS, (b,), generator=g),
                 types=torch.zeros(b, dtype=torch.long), families=torch.zeros(b, dtype=torch.long),
                 index=torch.arange(b), image_index=image_index)


def forward_of(model: nn.Module):
    return lambda b: model(b.images, b.questions, b.lengths, b.image_index)


def scrambled(model: nn.Module) -> nn.Module:
    """Running statistics far from any batch's, as a lagging moving average leaves them."""
    for bn in bn_stats.batch_norms(model):
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)
        bn.num_batches_tracked.fill_(11)
    return model


def reference_model(arch: str = "film") -> nn.Module:
    torch.manual_seed(0)
    return scrambled(build_model(model_config("tiny", arch=arch), VOCAB, ANSWERS))


@pytest.mark.parametrize("grouped", [False, True], ids=["independent", "grouped"])
@pytest.mark.parametrize("arch", ["film", "cnn_gru", "question_only"])
def test_running_stats_become_the_mean_of_the_batch_statistics(arch, grouped):
    """Hooks record what each batch norm received in train mode; after recompute, its running
    mean is the mean over batches of the batch means and its running variance the mean of the
    unbiased batch variances."""
    model = reference_model(arch)
    batches = [make_batch(6, seed=s, images=3 if grouped else None) for s in (1, 2, 3)]
    seen: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    rows: dict[nn.Module, set[int]] = {}

    def hook(module, inputs):
        x = inputs[0].detach().double()
        dims = [0, *range(2, x.dim())]
        seen.setdefault(module, []).append((x.mean(dims), x.var(dims, unbiased=True)))
        rows.setdefault(module, set()).add(x.shape[0])

    bns = bn_stats.batch_norms(model)
    assert bns
    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    weights = copy.deepcopy(model.state_dict())
    model.eval()
    used = bn_stats.recompute(model, forward_of(model), batches)
    for h in handles:
        h.remove()
    assert used == 3
    for bn in bns:
        stats = seen[bn]
        assert len(stats) == 3
        stem = getattr(model, "stem", None)
        if grouped and stem is not None and bn in set(stem.modules()):
            assert rows[bn] == {3}  # the stem normalises the batch's 3 images, not its 6 questions
        torch.testing.assert_close(bn.running_mean.double(), torch.stack([m for m, _ in stats]).mean(0))
        torch.testing.assert_close(bn.running_var.double(), torch.stack([v for _, v in stats]).mean(0))
    # Only the running statistics changed; the count, the momentum and the mode are the run's.
    for name, value in model.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            continue
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)
    assert all(bn.momentum == 0.1 for bn in bns) and not model.training


@pytest.mark.parametrize("arch", ["film", "cnn_gru"])
def test_one_batch_makes_eval_mode_compute_train_mode(arch):
    """Recomputed from one batch, eval mode on that batch gives train mode's logits: the only
    difference left is torch's convention of an unbiased running variance (n/(n-1) times the
    batch variance train mode divides by), undone here layer by layer. Before the recompute
    the two modes disagree."""
    model = reference_model(arch)
    batch = make_batch(8, seed=5)
    rows: dict[nn.Module, int] = {}

    def logits(train: bool) -> torch.Tensor:
        state = copy.deepcopy(model.state_dict())
        model.train(train)
        with torch.no_grad():
            out = forward_of(model)(batch)
        model.load_state_dict(state)  # train mode moves the running statistics: undo it
        return out

    assert (logits(False) - logits(True)).abs().max() > 0.1
    handles = [bn.register_forward_pre_hook(lambda m, i: rows.__setitem__(m, i[0].numel() // i[0].shape[1]))
               for bn in bn_stats.batch_norms(model)]
    bn_stats.recompute(model, forward_of(model), [batch])
    for h in handles:
        h.remove()
    for bn, n in rows.items():
        bn.running_var.mul_((n - 1) / n)
    # Eval folds the statistics into one scale and shift per channel, train mode normalises
    # first: the same values rounded in another order, through four blocks and a classifier.
    torch.testing.assert_close(logits(False), logits(True), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grouped", [False, True], ids=["independent", "grouped"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_fast_model_recomputes_the_reference_statistics(fused, grouped):
    """The fused ResBlock op updates the same buffers through bn.momentum: the fast model,
    loaded with the reference's weights, ends with the reference's running statistics."""
    ref = reference_model()
    fast = build_model(model_config("tiny"), VOCAB, ANSWERS, fast=True, fused=fused, channels_last=True)
    fast.load_state_dict(ref.state_dict())
    batches = [make_batch(5, seed=s, images=2 if grouped else None) for s in (7, 8)]
    bn_stats.recompute(ref, forward_of(ref), batches)
    bn_stats.recompute(fast, forward_of(fast), batches)
    ref_state, fast_state = ref.state_dict(), fast.state_dict()
    checked = 0
    for name, value in ref_state.items():
        if name.endswith(("running_mean", "running_var")):
            # fp32 sums in another order (channels_last, coordinates as a bias): default fp32 tolerances.
            torch.testing.assert_close(fast_state[name], value, msg=name)
            checked += 1
    assert checked == 2 * len(bn_stats.batch_norms(ref))


def test_average_hook_sees_the_means_before_they_are_stored():
    """Under DDP `average` (the mean over ranks) receives every layer's mean and variance."""
    model = reference_model()
    calls = []

    def average(tensors):
        calls.append(len(tensors))
        for t in tensors:
            t.zero_()  # what a rank would hold if the others' means were 0 and it had no share

    bn_stats.recompute(model, forward_of(model), [make_batch(4, seed=1)], average=average)
    assert calls == [2 * len(bn_stats.batch_norms(model))]
    assert all(bn.running_mean.abs().max() == 0 and bn.running_var.abs().max() == 0
               for bn in bn_stats.batch_norms(model))


def test_no_batches_leaves_statistics_alone():
    model = reference_model()
    before = copy.deepcopy(model.state_dict())
    assert bn_stats.recompute(model, forward_of(model), []) == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_train_vs_eval_counts_each_mode_and_restores_the_model():
    model = reference_model()
    batches = [make_batch(6, seed=s) for s in (1, 2)]
    before = copy.deepcopy(model.state_dict())
    expected = copy.deepcopy(model)
    hits_train = hits_eval = 0
    with torch.no_grad():
        for b in batches:
            expected.train()
            hits_train += int((forward_of(expected)(b).argmax(1) == b.answers).sum())
        expected.load_state_dict(before)
        expected.eval()
        for b in batches:
            hits_eval += int((forward_of(expected)(b).argmax(1) == b.answers).sum())
    model.eval()
    assert bn_stats.train_vs_eval(model, forward_of(model), batches) == (hits_train, hits_eval, 12)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert not model.training


def test_set_momentum():
    model = reference_model()
    bn_stats.set_momentum(model, 0.01)
    assert {bn.momentum for bn in bn_stats.batch_norms(model)} == {0.01}
