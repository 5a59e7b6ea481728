"""One optimisation step of any model, compiled when the model allows it, replayed as a CUDA
graph on request (--cuda-graphs)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastfilm.engine.compile import can_compile, compiled
from fastfilm.engine.options import Execution, note


class TrainStep:
    """zero_grad, forward under autocast, loss, backward, optimizer step.

    __call__(images [B, 3, S, S] uint8, questions [B, L], lengths [B], answers [B],
    weight [B] 0/1 or None, image_index [B] or None (then images is [M, ...], a row per
    distinct image)) -> (loss [], correct []) on the device, without a host sync
    (except the fp16 GradScaler's check with a non-fused optimizer). The forward and loss
    are compiled (fullgraph, static shapes) when ex.compile and the model allows it;
    AOTAutograd compiles the backward with them. Weights and optimizer state stay fp32
    (autocast casts per op). `model` may be a DDP wrapper of the model being trained.

    ex.cuda_graphs: the compiled forward+loss and its backward are recorded as CUDA graphs
    (inductor's "reduce-overhead": one graph per static batch shape, inputs copied into static
    buffers, parameters and buffers read in place) and replayed; the optimizer step stays
    outside (torch's fused Adam is a few launches). Only on the compiled fast path: the
    reference model and the baselines break the graph at nn.GRU, and under DDP the gradient
    all-reduce runs outside any graph; elsewhere a note says the step runs without graphs.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ex: Execution):
        self.model, self.optimizer, self.ex = model, optimizer, ex
        self.scaler = torch.amp.GradScaler(ex.device.type) if ex.dtype == torch.float16 else None
        self._ones: Tensor | None = None
        # Under DDP the wrapper's inner model was compiled already (engine.distributed.wrap).
        compile_step = ex.compile and can_compile(model)
        self.cuda_graphs = ex.cuda_graphs and compile_step
        if ex.cuda_graphs and not compile_step:
            note("--cuda-graphs: the training step is captured only on the compiled fast path (not with --reference "
                 "or --no-compile, a baseline, or under torchrun); training without CUDA graphs")
        if compile_step:
            self.loss = compiled(self._loss, mode="reduce-overhead" if self.cuda_graphs else None)
        else:
            self.loss = self._loss

    def _loss(self, images: Tensor, questions: Tensor, lengths: Tensor, answers: Tensor,
              weight: Tensor, image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with self.ex.autocast():
            logits = self.model(images, questions, lengths, image_index)  # [B, A]
        losses = F.cross_entropy(logits.float(), answers, reduction="none")  # [B]
        hits = (logits.argmax(1) == answers) & (weight > 0)
        return (losses * weight).sum() / weight.sum().clamp(min=1), hits.sum()

    def __call__(self, images: Tensor, questions: Tensor, lengths: Tensor, answers: Tensor,
                 weight: Tensor | None = None, image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if weight is None:  # full batches weigh all ones: the same graph as a padded batch
            if self._ones is None or self._ones.shape != answers.shape or self._ones.device != answers.device:
                self._ones = torch.ones(answers.shape, device=answers.device)
            weight = self._ones
        self.model.train()
        # Gradients of a graphed backward live in the graphs' memory pool: they must be dropped
        # (not zeroed in place) before the next replay writes there.
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, correct = self.loss(images, questions, lengths, answers, weight, image_index)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.cuda_graphs:  # the next replay overwrites the graph's outputs: hand out copies
            return loss.detach().clone(), correct.clone()
        return loss.detach(), correct
