"""The padding policy, in one place: which question lengths and batch sizes a model sees.

A compiled model is specialised to static shapes, so that nothing recompiles within an
epoch: question tensors are padded to one of a few length buckets, a batch's distinct
images (questions grouped by image) to a multiple of IMAGE_MULTIPLE, and the last partial
batch to the full batch size with weight-0 repeats. Eager models take every batch as it
is. Batch norm statistics do see the padded samples (repeats of real ones): one step per
epoch with a few duplicated questions; in eval mode the running statistics are used and
padding changes nothing. A training batch of a single question is not padded but skipped
by the trainer when the model has batch norm: copies of one question have no variance, so
batch norm would output a constant, teach nothing and pull its running statistics to that
one sample (engine/trainer.py; a batch size of 1 is refused: config.validate_training).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Question lengths the compiled model is specialised for (powers of two and 1.5x between):
# a batch wastes at most a third of its GRU steps, and CLEVR (longest question 46 tokens
# with <START>/<END>) needs at most 6 graphs.
LENGTH_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

# With questions grouped by image, a batch's number of distinct images varies; compiled,
# it is padded to a multiple of this (a few static shapes, at most 7 repeated images).
IMAGE_MULTIPLE = 8


def length_buckets(max_length: int) -> tuple[int, ...]:
    """The buckets below the data's longest question, then that length itself: [K] ints."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return tuple(b for b in LENGTH_BUCKETS if b < max_length) + (max_length,)


def bucket_length(length: int, max_length: int) -> int:
    """The padded question length for a batch whose longest question has `length` tokens."""
    if not 0 < length <= max_length:
        raise ValueError(f"question length {length} is outside 1..{max_length}")
    return next(b for b in length_buckets(max_length) if b >= length)


@dataclass(frozen=True)
class Padding:
    """The padding policy of one execution: static shapes when compiled, none otherwise."""
    static: bool

    def loader_kwargs(self, max_length: int) -> dict:
        """Keyword arguments for data.loader.Loader: length buckets and the image multiple."""
        return {"buckets": length_buckets(max_length) if self.static else None,
                "image_multiple": IMAGE_MULTIPLE if self.static else 0}

    def pads_batch(self, n: int, batch_size: int) -> bool:
        """Whether a batch of n questions is padded to batch_size."""
        return n < batch_size and self.static


def pad_batch(batch_size: int, *tensors: Tensor) -> tuple[list[Tensor], Tensor]:
    """Pad a partial batch of B < batch_size samples to batch_size by repeating its samples.

    tensors: each [B, ...] (images, questions, lengths, answers, image_index: whichever
    have a row per question). Returns (the tensors with batch_size rows, weight
    [batch_size] float: 1 for real samples, 0 for repeats). Repeats (not zeros) keep batch
    norm statistics representative, since BN sees the whole padded batch.
    """
    b = tensors[0].size(0)
    if not 0 < b <= batch_size or any(t.size(0) != b for t in tensors):
        raise ValueError(f"batch of {[t.size(0) for t in tensors]} rows cannot be padded to {batch_size}")
    device = tensors[0].device
    idx = torch.arange(batch_size, device=device) % b
    weight = (torch.arange(batch_size, device=device) < b).float()
    return [t if b == batch_size else t[idx] for t in tensors], weight
