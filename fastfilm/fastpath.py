"""The fast path: every performance knob of fastfilm, in one place.

    opts = FastOptions.from_train_config(cfg)             # reference, amp, compile, fused, channels_last, apex
    model = build_model(model_cfg, vocab_size, num_answers, opts, device)
    step = TrainStep(model, build_optimizer(model, lr, weight_decay, opts, device), opts, device)
    loss, correct = step(images, questions, lengths, answers, weight)   # tensors on device, no host sync
    logits = Predictor(model, opts, device, batch_size=256)(images, questions, lengths)

Static shapes (no recompilation within an epoch): question tensors are padded to one of
`length_buckets(max_length)` (pass them to the data loader), and the last partial batch is
padded to the full batch size with `pad_batch`, whose 0/1 `weight` keeps the padded samples
out of the loss and the accuracy. Batch norm statistics do see the padded samples (repeats
of real ones): in training that is one step per epoch with a few duplicated questions; in
eval mode the running statistics are used and padding changes nothing.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastfilm.config import ModelConfig, TrainConfig
from fastfilm.model.fast import FastFiLMNet

# Question lengths the compiled model is specialised for (powers of two and 1.5x between):
# a batch wastes at most a third of its GRU steps, and CLEVR (longest question 46 tokens
# with <START>/<END>) needs at most 6 graphs, of which batches of 64 use 2 or 3.
LENGTH_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def length_buckets(max_length: int) -> tuple[int, ...]:
    """The buckets below the data's longest question, then that length itself: [K] ints."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return tuple(b for b in LENGTH_BUCKETS if b < max_length) + (max_length,)


def loader_buckets(max_length: int, opts: FastOptions) -> tuple[int, ...] | None:
    """Question lengths the data loader should pad batches to: the compiled model's few
    static shapes, or None (pad to the split's longest question) when nothing is compiled."""
    return length_buckets(max_length) if opts.compile else None


# With questions grouped by image, a batch's number of distinct images varies; compiled,
# it is padded to a multiple of this (a few static shapes, at most 7 repeated images).
IMAGE_MULTIPLE = 8


def loader_image_multiple(opts: FastOptions) -> int:
    """The Loader's image_multiple: IMAGE_MULTIPLE when compiled, else 0 (no padding)."""
    return IMAGE_MULTIPLE if opts.compile else 0


def bucket_length(length: int, max_length: int) -> int:
    """The padded question length for a batch whose longest question has `length` tokens."""
    if not 0 < length <= max_length:
        raise ValueError(f"question length {length} is outside 1..{max_length}")
    return next(b for b in length_buckets(max_length) if b >= length)


@dataclass
class FastOptions:
    """The fast path's switches (the fields of TrainConfig with the same names).
    reference=True means the plain oracle: it turns every other switch off."""
    reference: bool = False
    amp: str = "bf16"
    compile: bool = True
    fused: bool = True
    channels_last: bool = True
    apex: bool = False

    def __post_init__(self) -> None:
        if self.amp not in _AMP:
            raise ValueError(f"amp must be one of {sorted(_AMP)}, got {self.amp!r}")
        if self.reference:
            self.amp, self.compile, self.fused, self.channels_last, self.apex = "off", False, False, False, False

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> FastOptions:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


_NOTED: set[str] = set()


def _note(message: str) -> None:
    """One line on stderr, once per process."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"fastfilm: {message}", file=sys.stderr)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls/convs run in hardware (CUDA Ampere+, CPU AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp on `device`; None: fp32. bf16 without hardware support
    is emulated (measured ~100x slower matmuls on an AVX2 CPU), so it falls back to fp32."""
    dtype = _AMP[amp]
    if dtype == torch.bfloat16 and not native_bf16(device):
        _note(f"--amp bf16: no native bf16 on this {device.type} (needs AVX-512 BF16/AMX or CUDA Ampere+); "
              "running fp32 (pass --amp off to silence)")
        return None
    return dtype


def configure_compiler() -> None:
    """Dynamo/inductor settings of the fast path (idempotent)."""
    # One graph per (question-length bucket, train/eval); the default limit of 8 per
    # function would silently fall back to eager after that.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)


def compiled(fn: Callable, opts: FastOptions, **kwargs) -> Callable:
    """fn compiled whole (fullgraph, static shapes) when opts.compile, else fn itself."""
    if not opts.compile:
        return fn
    configure_compiler()
    return torch.compile(fn, fullgraph=True, dynamic=False, **kwargs)


def build_model(model_cfg: ModelConfig, vocab_size: int, num_answers: int, opts: FastOptions,
                device: torch.device) -> nn.Module:
    """FastFiLMNet on `device`, or the reference network (FiLMNet or a baseline) when
    opts.reference or model_cfg.arch != "film". Same parameters either way."""
    if opts.reference or model_cfg.arch != "film":
        from fastfilm.model import build_model as build_reference

        return build_reference(model_cfg, vocab_size, num_answers).to(device)
    return FastFiLMNet(model_cfg, vocab_size, num_answers, fused=opts.fused,
                       channels_last=opts.channels_last).to(device)


def _apex_fused_adam(device: torch.device):
    """apex.optimizers.FusedAdam when genuine NVIDIA apex is usable here, else None (with a note).
    (The PyPI package named `apex` is unrelated and has no apex.optimizers.)"""
    try:
        from apex.optimizers import FusedAdam
    except Exception:  # ImportError, or a broken build failing to load its extension
        _note("--apex: NVIDIA apex (apex.optimizers.FusedAdam) is not importable; using torch's Adam")
        return None
    if device.type != "cuda":
        _note(f"--apex: apex FusedAdam needs CUDA, the device is {device}; using torch's Adam")
        return None
    return FusedAdam


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, opts: FastOptions,
                    device: torch.device) -> torch.optim.Optimizer:
    """Adam with L2 weight decay (the paper's): apex FusedAdam if asked for and usable, else
    torch's fused implementation (one kernel per parameter group on CUDA and CPU; on the
    2-core CPU it measured 3x faster than foreach). State stays fp32 like the weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.reference:  # the oracle trains as the plain trainer does
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if opts.apex and (fused_adam := _apex_fused_adam(device)) is not None:
        return fused_adam(params, lr=lr, weight_decay=weight_decay, adam_w_mode=False)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


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


def _compiles(model: nn.Module) -> bool:
    # The reference network and the baselines call nn.GRU, which fullgraph compile rejects.
    return isinstance(model, FastFiLMNet)


class TrainStep:
    """One optimisation step: zero_grad, forward under autocast, loss, backward, Adam step.

    __call__(images [B, 3, S, S] uint8, questions [B, L], lengths [B], answers [B],
    weight [B] 0/1 or None, image_index [B] or None (then images is [M, ...], a row per
    distinct image)) -> (loss [], correct []) on the device, without a host sync
    (except the fp16 GradScaler's check with a non-fused optimizer). The forward and loss
    are compiled (fullgraph, static shapes) when opts.compile; AOTAutograd compiles the
    backward with them. Weights and optimizer state stay fp32 (autocast casts per op).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, opts: FastOptions,
                 device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.dtype = autocast_dtype(opts.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self._ones: Tensor | None = None
        use_compile = opts.compile and _compiles(model)
        self.loss = compiled(self._loss, dataclasses.replace(opts, compile=use_compile))

    def _loss(self, images: Tensor, questions: Tensor, lengths: Tensor, answers: Tensor,
              weight: Tensor, image_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
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
        self.optimizer.zero_grad(set_to_none=True)
        loss, correct = self.loss(images, questions, lengths, answers, weight, image_index)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach(), correct


class Predictor:
    """Batched inference: eval mode (the fused op's folded eval path), inference_mode,
    autocast, compiled when opts.compile; cuda_graphs=True replays CUDA graphs (CUDA only).

    __call__(images [B, 3, S, S], questions [B, L], lengths [B]) -> logits [B, A] float.
    With batch_size set and the forward compiled, smaller batches are padded to it (static
    shapes) and cut back.
    """

    def __init__(self, model: nn.Module, opts: FastOptions, device: torch.device, cuda_graphs: bool = False,
                 batch_size: int | None = None):
        self.model, self.device = model, torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, got {self.device}")
        self.cuda_graphs = cuda_graphs
        self.dtype = autocast_dtype(opts.amp, self.device)
        use_compile = opts.compile and _compiles(model)
        # Padding only buys static shapes for a compiled forward; eager runs any batch as is.
        self.batch_size = batch_size if use_compile else None
        if use_compile:
            self.forward = compiled(self._forward, opts, mode="reduce-overhead" if cuda_graphs else None)
        elif cuda_graphs:
            self.forward = torch.compile(self._forward, backend="cudagraphs", fullgraph=_compiles(model))
        else:
            self.forward = self._forward

    def _forward(self, images: Tensor, questions: Tensor, lengths: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(images, questions, lengths).float()

    def __call__(self, images: Tensor, questions: Tensor, lengths: Tensor) -> Tensor:
        b = images.size(0)
        if self.batch_size is not None and b < self.batch_size:
            (images, questions, lengths), _ = pad_batch(self.batch_size, images, questions, lengths)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                logits = self.forward(images, questions, lengths)
                # CUDA graph replays reuse their output buffer: hand out a copy.
                logits = logits[:b].clone() if self.cuda_graphs else logits[:b]
        finally:
            self.model.train(was_training)
        return logits
