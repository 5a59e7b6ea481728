"""Frozen inference (Predictor(frozen=True): inductor freezing, batch norm folded into the
convolutions, weights prepacked) and the compiled bf16 path computes what the fp32 reference
computes, within stated tolerances; both are compiled, hence slow."""
import pytest
import torch
import torch.nn.functional as F

from fastfilm.config import FastConfig, model_config
from fastfilm.engine import options
from fastfilm.engine.build import build_optimizer
from fastfilm.engine.options import resolve
from fastfilm.engine.predictor import Predictor
from fastfilm.engine.step import TrainStep
from fastfilm.model.fast import FastFiLMNet
from fastfilm.model.reference import FiLMNet

VOCAB, ANSWERS, CPU = 30, 7, torch.device("cpu")
# fp32: folding batch norm into the conv weights and summing in oneDNN's order differ from the
# reference by float32 rounding (~1e-6 on the tiny model); atol scaled by the largest |value|.
FP32 = dict(rtol=1e-4, atol=1e-5)
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per op), compounding over the ~12
# layers of the tiny model; 5% relative (L2) error allows that growth and still fails a wrong op
# (errors of order 100%). Gradients: see the training step test.
BF16_REL_L2 = 0.05

# Tiny tensors on a shared 2-core machine: one thread (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def batch(b=8, length=12, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    lengths[0] = length
    questions = torch.randint(4, VOCAB, (b, length), generator=g)
    questions[torch.arange(length)[None] >= lengths[:, None]] = 0
    return images, questions, lengths, torch.randint(0, ANSWERS, (b,), generator=g)


def trained_pair(fused: bool, channels_last: bool):
    """(reference, fast) tiny models with the same weights after 3 SGD steps of the reference,
    so that the batch norm running statistics are not their initial 0/1."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    ref = FiLMNet(cfg, VOCAB, ANSWERS)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i in range(3):
        images, q, lengths, answers = batch(seed=20 + i)
        opt.zero_grad()
        F.cross_entropy(ref(images, q, lengths), answers).backward()
        opt.step()
    fast = FastFiLMNet(cfg, VOCAB, ANSWERS, fused=fused, channels_last=channels_last)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), fast


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("fused,channels_last", [(False, False), (True, True)], ids=["nchw-unfused", "cl-fused"])
def test_frozen_predictor_matches_reference_fp32(fused, channels_last):
    ref, fast = trained_pair(fused, channels_last)
    ex = resolve(FastConfig(amp="off", compile=True, fused=fused, channels_last=channels_last), CPU)
    predict = Predictor(fast, ex, batch_size=8, frozen=True)
    with torch.no_grad():
        for b in (8, 3, 1):  # 3 and 1 are padded to the compiled batch of 8 and cut back
            images, q, lengths, _ = batch(b=b, seed=b)
            expected = ref(images, q, lengths)
            actual = predict(images, q, lengths)
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(actual, expected, rtol=FP32["rtol"], atol=FP32["atol"] * scale,
                                       msg=lambda m: f"frozen eval batch {b}: {m}")
    assert fast.training, "the predictor leaves the model in the mode it found it in"


def test_frozen_predictor_matches_reference_bf16(monkeypatch):
    monkeypatch.setattr(options, "native_bf16", lambda device: True)  # the CPU may only emulate bf16
    ref, fast = trained_pair(fused=False, channels_last=False)
    predict = Predictor(fast, resolve(FastConfig(amp="bf16", compile=True, fused=False, channels_last=False), CPU),
                        batch_size=8, frozen=True)
    images, q, lengths, _ = batch(b=8, seed=8)
    with torch.no_grad():
        expected = ref(images, q, lengths)
    actual = predict(images, q, lengths)
    assert actual.dtype == torch.float32
    assert rel_l2(actual, expected) < BF16_REL_L2, f"frozen bf16 logits: relative L2 error {rel_l2(actual, expected)}"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_compiled_bf16_train_step_matches_reference(fused, monkeypatch):
    """One compiled bf16 training step (NCHW; fused is the cpu-amx default): loss and every
    gradient against the fp32 reference's, no further off than the reference's own bf16
    autocast gradients are. (bf16 alone moved some gradients by 17-32% here: FiLM's dL/dgamma sums
    products of bf16-rounded values that largely cancel, and the question encoder's gradients
    all pass through it.)"""
    monkeypatch.setattr(options, "native_bf16", lambda device: True)
    torch.manual_seed(0)
    cfg = model_config("tiny")
    ref = FiLMNet(cfg, VOCAB, ANSWERS)
    ref_bf16 = FiLMNet(cfg, VOCAB, ANSWERS)
    fast = FastFiLMNet(cfg, VOCAB, ANSWERS, fused=fused, channels_last=False)
    ref_bf16.load_state_dict(ref.state_dict(), strict=True)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ex = resolve(FastConfig(amp="bf16", compile=True, fused=fused, channels_last=False), CPU)
    step = TrainStep(fast, torch.optim.SGD(fast.parameters(), lr=0.0), ex)  # lr 0: the gradients stay to compare
    images, q, lengths, answers = batch(seed=3)
    loss, _ = step(images, q, lengths, answers)
    ref_loss = F.cross_entropy(ref(images, q, lengths), answers)
    ref_loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ref_bf16(images, q, lengths)
    F.cross_entropy(logits.float(), answers).backward()
    assert abs(loss.item() - ref_loss.item()) < BF16_REL_L2 * ref_loss.item()
    ref_params, bf16_params = dict(ref.named_parameters()), dict(ref_bf16.named_parameters())
    for name, p in fast.named_parameters():
        expected = ref_params[name].grad
        if expected.norm() < 1e-6:  # a bias in front of a batch norm: its true gradient is 0
            assert p.grad.norm() < 1e-3, f"{name}: gradient {p.grad.norm()} where the reference's is 0"
            continue
        error, bf16_error = rel_l2(p.grad, expected), rel_l2(bf16_params[name].grad, expected)
        assert error < max(BF16_REL_L2, 2 * bf16_error), (
            f"grad {name}: relative L2 error {error:.3f} against fp32; the reference's bf16 autocast: {bf16_error:.3f}")
    bn = dict(ref.named_buffers())
    for name, b in fast.named_buffers():  # running statistics are updated in fp32 from bf16 activations
        if b.is_floating_point():
            assert rel_l2(b, bn[name]) < BF16_REL_L2, name
