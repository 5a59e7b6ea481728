"""Batch-norm statistics that describe the weights being evaluated, and the gap that shows when they do not.

During training each batch norm keeps an exponential moving average of its batch statistics
(momentum 0.1: mostly the last ~10 steps). With a learning rate that moves the weights a lot
between steps, that average mixes statistics of several different networks, so eval mode
normalises with numbers that fit none of them: the eval-mode gap (issue 12: 5.5 points on
training questions, val swinging 16 points between epochs).

"Precise BN" (`recompute`) throws the moving average away before an evaluation and puts in
its place the average, over N training batches, of the statistics the current weights give
in train mode: per layer, the mean of the batch means and of the (unbiased) batch variances,
the quantities train mode normalises each batch with. It works by setting every batch norm's
momentum to 1 (so a train-mode forward leaves exactly that batch's statistics in the running
buffers) and averaging the buffers after each batch, so it serves every layer that reads
`bn.momentum` and updates `bn.running_*`: nn.BatchNorm*, GlobalBatchNorm and the fused
ResBlock op of the fast model, which all share those buffers and state_dict keys.

    recompute(model, forward, batches, average=...)   # -> batches used
    train_vs_eval(model, forward, batches)            # -> (hits train mode, hits eval mode, count)

`forward(batch)` runs the model on a loader Batch as training does (autocast, grouped images
via image_index) and returns logits [B, A]; the caller builds it so that these functions do
not depend on how a model is executed.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch import Tensor

Forward = Callable[[object], Tensor]  # Batch -> logits [B, A]


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every batch norm of `model` that keeps running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def set_momentum(model: nn.Module, momentum: float) -> None:
    """The running-average momentum of every batch norm of `model` (torch's default: 0.1)."""
    for bn in batch_norms(model):
        bn.momentum = momentum


class _TrainModeNoUpdate:
    """Context: `model` in train mode, no autograd; buffers and modes restored on exit."""

    def __init__(self, model: nn.Module, momentum: float | None = None):
        self.model, self.momentum = model, momentum

    def __enter__(self):
        self.bns = batch_norms(self.model)
        self.saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in self.bns]
        self.was_training = self.model.training
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.model.train()
        if self.momentum is not None:
            for bn in self.bns:
                bn.momentum = self.momentum
        return self.bns

    def __exit__(self, *exc):
        for bn, (momentum, tracked) in zip(self.bns, self.saved):
            bn.momentum = momentum
            # The count is the training run's, not this pass's (exact resume compares it).
            bn.num_batches_tracked.copy_(tracked)
        self.model.train(self.was_training)
        torch.set_grad_enabled(self.grad)
        return False


def recompute(model: nn.Module, forward: Forward, batches: Iterable,
              average: Callable[[list[Tensor]], None] | None = None) -> int:
    """Replace the running statistics of every batch norm of `model` by the mean, over
    `batches`, of the statistics each batch gives in train mode (precise BN).

    Each layer sees the activations the current weights produce for the batch, exactly as in
    a training step (earlier layers normalise with their own batch statistics). After it,
    running_mean[C] = mean over batches of the batch mean, running_var[C] = mean of the
    unbiased batch variances. `average(tensors)` may average them in place over processes
    (under DDP: every rank's own shard, then the mean over ranks). Weights, num_batches_tracked
    and train/eval mode are left as they were. Returns the number of batches used (0: the
    running statistics are unchanged).
    """
    bns = batch_norms(model)
    if not bns:
        return 0
    sums = [(torch.zeros_like(bn.running_mean), torch.zeros_like(bn.running_var)) for bn in bns]
    n = 0
    # Momentum 1: after a train-mode forward the running buffers hold that batch's statistics.
    with _TrainModeNoUpdate(model, momentum=1.0):
        # A frozen part stays in eval mode (fine-tuning, model/freeze.py): its statistics are
        # not the current batches' and are left exactly as they are.
        bns = [bn for bn in bns if bn.training]
        sums = sums[:len(bns)]
        for batch in batches:
            forward(batch)
            for bn, (mean, var) in zip(bns, sums):
                mean += bn.running_mean
                var += bn.running_var
            n += 1
    if n == 0 or not bns:
        return 0
    flat = [t for pair in sums for t in pair]
    for t in flat:
        t /= n
    if average is not None:
        average(flat)
    for bn, (mean, var) in zip(bns, sums):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return n


def train_vs_eval(model: nn.Module, forward: Forward, batches: Iterable) -> tuple[int, int, int]:
    """(right answers in train mode, right answers in eval mode, questions) on `batches`.

    Train mode normalises each batch with its own statistics, as the training steps did;
    eval mode with the running statistics. Their difference on training questions is the
    eval-mode gap, which says how well the running statistics describe the weights. The
    running statistics are left as they were (the train-mode pass would move them).
    """
    hits_train = hits_eval = count = 0
    bns = batch_norms(model)
    saved = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    was_training = model.training
    batches = list(batches)
    try:
        with _TrainModeNoUpdate(model):
            for batch in batches:
                hits_train += int((forward(batch).argmax(1) == batch.answers).sum())
        for bn, (mean, var) in zip(bns, saved):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                hits_eval += int((forward(batch).argmax(1) == batch.answers).sum())
                count += len(batch)
    finally:
        for bn, (mean, var) in zip(bns, saved):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        model.train(was_training)
    return hits_train, hits_eval, count
