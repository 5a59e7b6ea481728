"""Batched inference for any model: eval mode, inference_mode, autocast, compiled when the
model allows it, CUDA graphs on request."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from fastfilm.data.vocab import SPECIAL_TOKENS, Vocab
from fastfilm.engine.batching import Padding, pad_batch
from fastfilm.engine.compile import can_compile, compiled
from fastfilm.engine.options import Execution


def non_answers(vocab: Vocab) -> list[int]:
    """Ids of the answer table's special tokens (<NULL>, <START>, <END>, <UNK>). The table
    holds them, as the original code's does, so the classifier has outputs for them; they
    are never an answer (an answer outside the vocabulary is read as <UNK>, and predicting
    <UNK> would score it as right)."""
    table = vocab.answer_token_to_idx
    return sorted(table[t] for t in SPECIAL_TOKENS if t in table)


class Predictor:
    """__call__(images [B, 3, S, S], questions [B, L], lengths [B]) -> logits [B, A] float.

    Eval mode (the fused op's folded eval path), inference_mode and autocast. Compiled when
    ex.compile and the model compiles whole; then batches smaller than `batch_size` are
    padded to it (static shapes) and cut back. cuda_graphs (default: ex.cuda_graphs) replays
    CUDA graphs (CUDA only), one per batch shape: inductor's reduce-overhead when compiled,
    else the cudagraphs backend (any model, graph breaks allowed); batches are then padded
    as when compiled, so that a few shapes cover an epoch.
    vocab: the logits of its non_answers are -inf, so that argmax and softmax never offer
    them; the one place where predictions are masked (training is unchanged).
    frozen=True (compiled only) compiles the weights in as constants (engine.compile.compiled's
    freeze: batch norm folded, weights prepacked once): for a model that is done training
    (eval, answer), never for the trainer's, whose later weights it would not see.
    """

    def __init__(self, model: nn.Module, ex: Execution, *, batch_size: int | None = None,
                 cuda_graphs: bool | None = None, vocab: Vocab | None = None, frozen: bool = False):
        self.model, self.ex = model, ex
        self.excluded = torch.tensor(non_answers(vocab), dtype=torch.long, device=ex.device) if vocab else None
        cuda_graphs = ex.cuda_graphs if cuda_graphs is None else cuda_graphs
        if cuda_graphs and ex.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {ex.device}")
        self.cuda_graphs = cuda_graphs
        use_compile = ex.compile and can_compile(model)
        self.padding = Padding(static=use_compile or cuda_graphs)
        self.batch_size = batch_size
        if use_compile:
            self.forward = compiled(self._forward, mode="reduce-overhead" if cuda_graphs else None, freeze=frozen)
        elif cuda_graphs:
            self.forward = compiled(self._forward, backend="cudagraphs", fullgraph=False)
        else:
            self.forward = self._forward

    def _forward(self, images: Tensor, questions: Tensor, lengths: Tensor) -> Tensor:
        with self.ex.autocast():
            return self.model(images, questions, lengths).float()

    def __call__(self, images: Tensor, questions: Tensor, lengths: Tensor) -> Tensor:
        b = images.size(0)
        if self.batch_size is not None and self.padding.pads_batch(b, self.batch_size):
            (images, questions, lengths), _ = pad_batch(self.batch_size, images, questions, lengths)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self.forward(images, questions, lengths)
                # CUDA graph replays reuse their output buffer: hand out a copy.
                logits = logits[:b].clone() if self.cuda_graphs else logits[:b]
                if self.excluded is not None and len(self.excluded):
                    logits = logits.index_fill(1, self.excluded, float("-inf"))
        finally:
            self.model.train(was_training)
        return logits


@torch.inference_mode()
def predict(forward, loader, device: torch.device, *, progress: bool = False) -> np.ndarray:
    """Predicted answer ids for every question of the loader's split, in question order: [Q].

    forward(images, questions, lengths) -> logits: an eval-mode model or a Predictor.
    With a sharded loader (rank, world) the other shards' questions stay -1; every rank's
    predictions are merged by engine.distributed.Dist.merge_predictions.
    """
    if isinstance(forward, nn.Module):
        forward.eval()
    preds = np.full(loader.split.questions.shape[0], -1, dtype=np.int64)
    for batch in tqdm(loader.epoch(0), total=len(loader), desc="eval", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = forward(batch.images, batch.questions, batch.lengths)
        preds[batch.index.cpu().numpy()] = logits.argmax(1).cpu().numpy()
    return preds
