"""The reference model: shapes, padding invariance, baselines, and every Table 2/3 switch checked
for what it computes (each FiLM position written out with functional calls, each gamma/beta
parametrisation element by element, the switches that change parameters by their state_dict),
plus the fast model against the reference for every ablation."""

import itertools
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastfilm.config import ModelConfig, model_config
from fastfilm.model import FiLMNet, QTypeBaseline, build_model
from fastfilm.model.fast import FastFiLMNet
from fastfilm.config import parse_film_blocks
from fastfilm.model.reference import coord_map

VOCAB, ANSWERS = 30, 7


# Tiny tensors on a shared 2-core machine: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def batch(b=4, size=32, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    lengths[0] = length
    questions = torch.randint(4, VOCAB, (b, length), generator=g)
    questions[torch.arange(length)[None] >= lengths[:, None]] = 0
    return images, questions, lengths


@pytest.mark.parametrize("arch", ["film", "cnn_gru", "question_only"])
def test_output_shape(arch):
    model = build_model(model_config("tiny", arch=arch), VOCAB, ANSWERS)
    images, q, l = batch()
    assert model(images, q, l).shape == (4, ANSWERS)


def test_paper_preset_is_the_paper():
    cfg = model_config("paper")
    assert (cfg.channels, cfg.num_blocks, cfg.rnn_dim, cfg.embed_dim, cfg.image_size) == (128, 4, 4096, 200, 224)
    assert (cfg.classifier_proj, cfg.classifier_fc, cfg.stem_layers) == (512, 1024, 4)
    assert cfg == ModelConfig()


def test_paper_stem_maps_224_to_14():
    model = build_model(model_config("paper", rnn_dim=16, embed_dim=8), VOCAB, ANSWERS).eval()
    x = model.stem(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert x.shape == (1, 128, 14, 14)


@pytest.mark.parametrize("arch", ["film", "cnn_gru", "question_only"])
def test_padding_does_not_leak(arch):
    """The same questions padded to two different lengths give identical outputs."""
    torch.manual_seed(0)
    model = build_model(model_config("tiny", arch=arch), VOCAB, ANSWERS).eval()
    images, q, l = batch()
    longer = F.pad(q, (0, 6), value=0)
    noisy = longer.clone()
    noisy[:, q.shape[1]:] = 5  # even non-NULL junk after the last real token must not leak in
    out = model(images, q, l)
    torch.testing.assert_close(model(images, longer, l), out, rtol=0, atol=0)
    torch.testing.assert_close(model(images, noisy, l), out, rtol=0, atol=0)


# ---------------------------------------------------------------- state_dict: old checkpoints load

# The tiny preset's state_dict, key -> shape, as the code wrote it before ablations were chosen
# at construction (5e9696a): checkpoints saved then must still load.
TINY_STATE = {
    "question.embed.weight": (30, 16), "question.rnn.weight_ih_l0": (96, 16), "question.rnn.weight_hh_l0": (96, 32),
    "question.rnn.bias_ih_l0": (96,), "question.rnn.bias_hh_l0": (96,),
    "film_generator.linear.weight": (64, 32), "film_generator.linear.bias": (64,),
    "stem.layers.0.weight": (16, 3, 4, 4), "stem.layers.1.weight": (16,), "stem.layers.1.bias": (16,),
    "stem.layers.1.running_mean": (16,), "stem.layers.1.running_var": (16,), "stem.layers.1.num_batches_tracked": (),
    "stem.layers.3.weight": (16, 16, 4, 4), "stem.layers.4.weight": (16,), "stem.layers.4.bias": (16,),
    "stem.layers.4.running_mean": (16,), "stem.layers.4.running_var": (16,), "stem.layers.4.num_batches_tracked": (),
    "blocks.0.conv1.weight": (16, 18, 1, 1), "blocks.0.conv1.bias": (16,), "blocks.0.conv2.weight": (16, 16, 3, 3),
    "blocks.0.bn.running_mean": (16,), "blocks.0.bn.running_var": (16,), "blocks.0.bn.num_batches_tracked": (),
    "blocks.1.conv1.weight": (16, 18, 1, 1), "blocks.1.conv1.bias": (16,), "blocks.1.conv2.weight": (16, 16, 3, 3),
    "blocks.1.bn.running_mean": (16,), "blocks.1.bn.running_var": (16,), "blocks.1.bn.num_batches_tracked": (),
    "classifier.conv.weight": (32, 18, 1, 1), "classifier.conv.bias": (32,),
    "classifier.bn.weight": (32,), "classifier.bn.bias": (32,), "classifier.bn.running_mean": (32,),
    "classifier.bn.running_var": (32,), "classifier.bn.num_batches_tracked": (),
    "classifier.fc1.weight": (32, 32), "classifier.fc1.bias": (32,),
    "classifier.bn1.weight": (32,), "classifier.bn1.bias": (32,), "classifier.bn1.running_mean": (32,),
    "classifier.bn1.running_var": (32,), "classifier.bn1.num_batches_tracked": (),
    "classifier.fc2.weight": (7, 32), "classifier.fc2.bias": (7,),
}
# batchnorm=False, same code: no BN modules (the stem's layers renumber), biases on the convs.
TINY_STATE_NO_BN = {
    "question.embed.weight": (30, 16), "question.rnn.weight_ih_l0": (96, 16), "question.rnn.weight_hh_l0": (96, 32),
    "question.rnn.bias_ih_l0": (96,), "question.rnn.bias_hh_l0": (96,),
    "film_generator.linear.weight": (64, 32), "film_generator.linear.bias": (64,),
    "stem.layers.0.weight": (16, 3, 4, 4), "stem.layers.0.bias": (16,),
    "stem.layers.2.weight": (16, 16, 4, 4), "stem.layers.2.bias": (16,),
    "blocks.0.conv1.weight": (16, 18, 1, 1), "blocks.0.conv1.bias": (16,),
    "blocks.0.conv2.weight": (16, 16, 3, 3), "blocks.0.conv2.bias": (16,),
    "blocks.1.conv1.weight": (16, 18, 1, 1), "blocks.1.conv1.bias": (16,),
    "blocks.1.conv2.weight": (16, 16, 3, 3), "blocks.1.conv2.bias": (16,),
    "classifier.conv.weight": (32, 18, 1, 1), "classifier.conv.bias": (32,),
    "classifier.fc1.weight": (32, 32), "classifier.fc1.bias": (32,),
    "classifier.fc2.weight": (7, 32), "classifier.fc2.bias": (7,),
}
ONE_FILM = {"film_generator.linear.weight": (32, 32), "film_generator.linear.bias": (32,)}


def without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def block_copy(state: dict, src: int, dst: int) -> dict:
    """The entries of block `src`, renamed to block `dst`."""
    prefix = f"blocks.{src}."
    return {f"blocks.{dst}." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# Switches that change only what the network computes keep the paper's state_dict; the others
# add, remove or reshape exactly these entries.
STATE_CASES = [({}, TINY_STATE)] + [(o, TINY_STATE) for o in (
    dict(film_position="before_conv1"), dict(film_position="after_conv2"), dict(film_position="after_relu"),
    dict(film_position="after_residual"), dict(gamma="one"), dict(gamma="sigmoid"), dict(gamma="tanh"),
    dict(gamma="exp"), dict(beta="zero"), dict(gamma="one", beta="zero"), dict(residual=False))] + [
    (dict(batchnorm=False), TINY_STATE_NO_BN),
    (dict(coords=False), {**TINY_STATE, "blocks.0.conv1.weight": (16, 16, 1, 1),
                          "blocks.1.conv1.weight": (16, 16, 1, 1), "classifier.conv.weight": (32, 16, 1, 1)}),
    (dict(conv2_kernel=1), {**TINY_STATE, "blocks.0.conv2.weight": (16, 16, 1, 1),
                            "blocks.1.conv2.weight": (16, 16, 1, 1)}),
    (dict(film_blocks="none"), without(TINY_STATE, "film_generator.")),
    (dict(film_blocks="1"), {**TINY_STATE, **ONE_FILM}),
    (dict(num_blocks=1), {**without(TINY_STATE, "blocks.1."), **ONE_FILM}),
    (dict(num_blocks=3, film_blocks="0,2"), {**TINY_STATE, **block_copy(TINY_STATE, 0, 2)}),
]


def overrides_id(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "paper"


@pytest.mark.parametrize("overrides,expected", STATE_CASES, ids=[overrides_id(o) for o, _ in STATE_CASES])
def test_state_dict_is_that_of_old_checkpoints(overrides, expected):
    model = build_model(model_config("tiny", **overrides), VOCAB, ANSWERS)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    # And such a checkpoint loads strictly (every key present, every shape right).
    model.load_state_dict({k: torch.zeros(s) for k, s in expected.items()}, strict=True)


# ---------------------------------------------------------------- each FiLM position, written out

def coordinate_maps(t: torch.Tensor) -> torch.Tensor:
    """t: [B, C, h, w] -> [B, 2, h, w]: channel 0 is x (along w), channel 1 is y (along h), both -1 .. 1."""
    b, _, h, w = t.shape
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
    return torch.cat([xs, ys], dim=1)


def block_ops(block, cfg, gamma, beta, training: bool):
    """The operations of a ResBlock as functional calls on the block's own tensors; the BN
    running statistics are copies (returned as .running, updated as nn.BatchNorm2d would)."""
    p = dict(block.named_parameters())
    running = [block.bn.running_mean.clone(), block.bn.running_var.clone()] if cfg.batchnorm else None

    def conv1(t):
        return F.conv2d(torch.cat([t, coordinate_maps(t)], dim=1) if cfg.coords else t, p["conv1.weight"],
                        p["conv1.bias"])

    def conv2(t):
        return F.conv2d(t, p["conv2.weight"], p.get("conv2.bias"), padding=cfg.conv2_kernel // 2)

    def bn(t):
        return F.batch_norm(t, *running, training=training, momentum=0.1, eps=1e-5) if cfg.batchnorm else t

    def film(t):
        return gamma[:, :, None, None] * t + beta[:, :, None, None]

    def skip(x, y):
        return x + y if cfg.residual else y

    return types.SimpleNamespace(conv1=conv1, conv2=conv2, bn=bn, film=film, skip=skip, running=running)


# Each FiLM placement of Table 3 as its own expression (o: block_ops).
def after_bn(x, o):  # the paper
    x = F.relu(o.conv1(x))
    return o.skip(x, F.relu(o.film(o.bn(o.conv2(x)))))


def before_conv1(x, o):
    x = F.relu(o.conv1(o.film(x)))
    return o.skip(x, F.relu(o.bn(o.conv2(x))))


def after_conv2(x, o):
    x = F.relu(o.conv1(x))
    return o.skip(x, F.relu(o.bn(o.film(o.conv2(x)))))


def after_relu(x, o):
    x = F.relu(o.conv1(x))
    return o.skip(x, o.film(F.relu(o.bn(o.conv2(x)))))


def after_residual(x, o):
    x = F.relu(o.conv1(x))
    return o.film(o.skip(x, F.relu(o.bn(o.conv2(x)))))


def no_film(x, o):
    x = F.relu(o.conv1(x))
    return o.skip(x, F.relu(o.bn(o.conv2(x))))


PLACEMENTS = {"after_bn": after_bn, "before_conv1": before_conv1, "after_conv2": after_conv2,
              "after_relu": after_relu, "after_residual": after_residual, "none": no_film}
BLOCK_SWITCHES = [{}, dict(residual=False), dict(batchnorm=False), dict(coords=False), dict(conv2_kernel=1)]


def block_model(position: str, seed: int = 0, **overrides) -> FiLMNet:
    """A 5-channel FiLMNet whose blocks have the given FiLM position ('none': no FiLM-ed block) and
    non-trivial BN running statistics."""
    torch.manual_seed(seed)
    cfg = model_config("tiny", channels=5, film_blocks="none" if position == "none" else "all",
                       film_position="after_bn" if position == "none" else position, **overrides)
    model = FiLMNet(cfg, VOCAB, ANSWERS)
    for block in model.blocks:
        if cfg.batchnorm:
            block.bn.running_mean.normal_()
            block.bn.running_var.uniform_(0.5, 2.0)
    return model


def block_inputs(seed: int = 1):
    """x: [3, 5, 7, 6] (odd, not square: a transposed coordinate map shows), gamma, beta: [3, 5]
    per-sample values of either sign; all require grad."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).requires_grad_() for shape in ((3, 5, 7, 6), (3, 5), (3, 5))]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("switches", BLOCK_SWITCHES, ids=overrides_id)
@pytest.mark.parametrize("position", list(PLACEMENTS))
def test_block_computes_its_placement(position, switches, training):
    """Each block, as FiLMNet builds it for a config, against the placement written out above:
    output, every gradient (input, gamma, beta, weights) and the BN running statistics."""
    model = block_model(position, **switches).train(training)
    block, cfg = model.blocks[1], model.cfg
    x, gamma, beta = block_inputs()
    ops = block_ops(block, cfg, gamma, beta, training)
    filmed = position != "none"
    out = block(x, gamma, beta) if filmed else block(x, None, None)
    expected = PLACEMENTS[position](x, ops)
    torch.testing.assert_close(out, expected)
    leaves = {"x": x, **({"gamma": gamma, "beta": beta} if filmed else {}), **dict(block.named_parameters())}
    g = torch.randn_like(out)
    for name, a, e in zip(leaves, torch.autograd.grad(out, list(leaves.values()), g),
                          torch.autograd.grad(expected, list(leaves.values()), g)):
        torch.testing.assert_close(a, e, msg=lambda m: f"grad {name}: {m}")
    if cfg.batchnorm:
        torch.testing.assert_close(block.bn.running_mean, ops.running[0])
        torch.testing.assert_close(block.bn.running_var, ops.running[1])
        assert block.bn.num_batches_tracked == int(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_placements_are_distinguishable(training):
    """The written-out placements differ pairwise on the inputs above, so the test before can tell
    any two of them apart. Without the residual, FiLM after the ReLU and after the (absent)
    residual are the same function."""
    for residual in (True, False):
        model = block_model("after_bn", residual=residual).train(training)
        x, gamma, beta = block_inputs()
        outs = {name: f(x, block_ops(model.blocks[1], model.cfg, gamma, beta, training))
                for name, f in PLACEMENTS.items()}
        for a, b in itertools.combinations(outs, 2):
            if not residual and {a, b} == {"after_relu", "after_residual"}:
                torch.testing.assert_close(outs[a], outs[b])
                continue
            assert (outs[a] - outs[b]).abs().max() > 0.05, f"{a} and {b} agree (residual={residual})"


# ---------------------------------------------------------------- gamma and beta parametrisations

GAMMAS = {"linear": lambda v: 1 + v, "one": lambda v: 1.0, "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
          "tanh": math.tanh, "exp": math.exp}
BETAS = {"linear": lambda v: v, "zero": lambda v: 0.0}


@pytest.mark.parametrize("beta", list(BETAS))
@pytest.mark.parametrize("gamma", list(GAMMAS))
def test_gamma_beta_parametrisations(gamma, beta):
    """The generator's linear output, laid out [B, num_film, (gamma, beta), C], through each
    parametrisation (written out element by element with the math module)."""
    model = build_model(model_config("tiny", gamma=gamma, beta=beta), VOCAB, ANSWERS)
    gen = model.film_generator
    q = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen.linear.weight.normal_(0, 0.3)
        gen.linear.bias.copy_(torch.linspace(-3, 3, 64))  # known raw outputs of either sign
        got_gamma, got_beta = gen(q)
    raw = (q @ gen.linear.weight.detach().t() + gen.linear.bias.detach()).view(3, 2, 2, 16).tolist()
    apply = lambda f, part: torch.tensor([[[f(v) for v in film[part]] for film in row] for row in raw])  # noqa: E731
    torch.testing.assert_close(got_gamma, apply(GAMMAS[gamma], 0))
    torch.testing.assert_close(got_beta, apply(BETAS[beta], 1))


def test_unknown_parametrisation_or_position_is_a_programming_error():
    with pytest.raises(ValueError, match="gamma"):
        build_model(model_config("tiny", gamma="square"), VOCAB, ANSWERS)
    with pytest.raises(ValueError, match="film_position"):
        build_model(model_config("tiny", film_position="after_everything"), VOCAB, ANSWERS)


# ---------------------------------------------------------------- film_blocks and num_blocks

@pytest.mark.parametrize("num_blocks,spec", [(2, "all"), (2, "none"), (2, "0"), (2, "1"), (1, "all"), (3, "0,2"),
                                             (3, "1")])
def test_film_blocks_and_num_blocks(num_blocks, spec):
    """The stem's output goes through num_blocks blocks in order into the classifier; block i is
    the paper's block fed the generator's next (gamma, beta) if spec names it, else a block
    without FiLM fed nothing."""
    torch.manual_seed(0)
    model = build_model(model_config("tiny", num_blocks=num_blocks, film_blocks=spec), VOCAB, ANSWERS).eval()
    for block in model.blocks:
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
    filmed = [spec == "all" or (spec != "none" and str(i) in spec.split(",")) for i in range(num_blocks)]
    calls = []
    hooks = [b.register_forward_hook(lambda m, args, out: calls.append((m, args, out))) for b in model.blocks]
    hooks.append(model.stem.register_forward_hook(lambda m, args, out: calls.append((m, args, out))))
    hooks.append(model.classifier.register_forward_hook(lambda m, args, out: calls.append((m, args, out))))
    images, q, lengths = batch()
    with torch.no_grad():
        model(images, q, lengths)
        gammas, betas = model.film_params(q, lengths) if any(filmed) else (None, None)
    for h in hooks:
        h.remove()
    assert [m for m, _, _ in calls] == [model.stem, *model.blocks, model.classifier]
    x = calls[0][2]
    j = 0
    for i, (block, (x_in, gamma, beta), out) in enumerate(calls[1:-1]):
        torch.testing.assert_close(x_in, x, msg=f"block {i} input")
        if filmed[i]:
            torch.testing.assert_close(gamma, gammas[:, j])
            torch.testing.assert_close(beta, betas[:, j])
            expected = after_bn(x, block_ops(block, model.cfg, gamma, beta, training=False))
            j += 1
        else:
            assert gamma is None and beta is None, f"block {i} is not FiLM-ed"
            expected = no_film(x, block_ops(block, model.cfg, None, None, training=False))
        torch.testing.assert_close(out, expected, msg=f"block {i} output")
        x = out
    torch.testing.assert_close(calls[-1][1][0], x, msg="classifier input")
    assert j == sum(filmed) and (model.film_generator is None) == (not any(filmed))


# ---------------------------------------------------------------- same weights, other function

FUNCTION_SWITCHES = [dict(film_position="before_conv1"), dict(film_position="after_conv2"),
                     dict(film_position="after_relu"), dict(film_position="after_residual"), dict(gamma="one"),
                     dict(gamma="sigmoid"), dict(gamma="tanh"), dict(gamma="exp"), dict(beta="zero"),
                     dict(residual=False)]


@pytest.mark.parametrize("overrides", FUNCTION_SWITCHES, ids=overrides_id)
def test_switch_changes_the_network_on_the_same_weights(overrides):
    """Loaded with the paper model's weights, each ablation computes other logits."""
    torch.manual_seed(0)
    paper = build_model(model_config("tiny"), VOCAB, ANSWERS)
    ablated = build_model(model_config("tiny", **overrides), VOCAB, ANSWERS)
    ablated.load_state_dict(paper.state_dict(), strict=True)
    images, q, lengths = batch()
    gap = (ablated(images, q, lengths) - paper(images, q, lengths)).abs().max()
    assert gap > 1e-3, f"{overrides}: logits within {gap:.2e} of the paper model's"


# ---------------------------------------------------------------- parameters left unused (DDP)

ABLATIONS = [{}] + [o for o, _ in STATE_CASES[1:]] + [
    dict(film_blocks="none", gamma="one", beta="zero"), dict(gamma="one", beta="linear"),
    dict(gamma="linear", beta="zero"), dict(conv2_kernel=1, coords=False), dict(batchnorm=False, residual=False),
    dict(film_position="after_residual", residual=False), dict(film_position="before_conv1", batchnorm=False)]


def unused_parameters(model) -> list[str]:
    """Names of the parameters a training backward leaves without a gradient."""
    images, q, lengths = batch(b=6)
    F.cross_entropy(model(images, q, lengths), torch.arange(6) % ANSWERS).backward()
    return [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=overrides_id)
def test_may_leave_parameters_unused_matches_a_backward(overrides):
    cfg = model_config("tiny", **overrides)
    for model in (FiLMNet(cfg, VOCAB, ANSWERS), FastFiLMNet(cfg, VOCAB, ANSWERS)):
        unused = unused_parameters(model)
        assert model.may_leave_parameters_unused() == bool(unused), f"{type(model).__name__}: unused {unused}"
        # Only the question pipeline can be cut off.
        assert all(n.startswith(("question.", "film_generator.")) for n in unused), unused


@pytest.mark.parametrize("arch", ["cnn_gru", "question_only"])
def test_baselines_use_every_parameter(arch):
    model = build_model(model_config("tiny", arch=arch), VOCAB, ANSWERS)
    assert unused_parameters(model) == [] and model.may_leave_parameters_unused() is False


# ---------------------------------------------------------------- the fast model, every ablation

@pytest.mark.parametrize("overrides", ABLATIONS, ids=overrides_id)
def test_fast_model_matches_reference(overrides):
    """FastFiLMNet loaded with FiLMNet's weights: logits, every gradient and the running statistics
    of a training step on 9x9 maps (36 px), then eval logits, batch 1 included."""
    torch.manual_seed(0)
    cfg = model_config("tiny", **overrides)
    ref = FiLMNet(cfg, VOCAB, ANSWERS)
    fast = FastFiLMNet(cfg, VOCAB, ANSWERS)  # channels_last, fused op in the paper's blocks
    fast.load_state_dict(ref.state_dict(), strict=True)
    images, q, lengths = batch(b=6, size=36)
    answers = torch.arange(6) % ANSWERS
    outs = [model(images, q, lengths) for model in (ref, fast)]
    torch.testing.assert_close(outs[1], outs[0])
    for model, out in zip((ref, fast), outs):
        F.cross_entropy(out, answers).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        r = ref_params[name]
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, msg=lambda m: f"grad {name}: {m}")
    ref_buffers = dict(ref.named_buffers())
    for name, b in fast.named_buffers():
        torch.testing.assert_close(b, ref_buffers[name], msg=lambda m: f"buffer {name}: {m}")
    ref.eval(), fast.eval()
    with torch.no_grad():
        for rows in (slice(None), slice(2, 3)):
            inputs = images[rows], q[rows], lengths[rows]
            torch.testing.assert_close(fast(*inputs), ref(*inputs), msg=lambda m: f"eval, {len(inputs[1])} rows: {m}")


def test_film_identity_equals_unconditioned_network():
    """gamma := 1, beta := 0 is exactly the network without FiLM (same weights)."""
    torch.manual_seed(0)
    film = build_model(model_config("tiny", gamma="one", beta="zero"), VOCAB, ANSWERS).eval()
    plain = build_model(model_config("tiny", film_blocks="none"), VOCAB, ANSWERS).eval()
    missing, unexpected = plain.load_state_dict(film.state_dict(), strict=False)
    assert not missing and all(k.startswith("film_generator") for k in unexpected)
    images, q, l = batch()
    torch.testing.assert_close(film(images, q, l), plain(images, q, l))


def test_gamma_starts_near_one():
    """gamma = 1 + delta: a fresh model's FiLM layers are close to identity."""
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), VOCAB, ANSWERS)
    _, q, l = batch()
    gamma, beta = model.film_params(q, l)
    assert gamma.shape == (4, 2, 16) and beta.shape == (4, 2, 16)
    assert (gamma - 1).abs().mean() < 0.5


def test_question_changes_film_output_only_through_film():
    """Without FiLM-ed blocks the question has no path to the answer; with them it does."""
    torch.manual_seed(0)
    images, q, l = batch()
    other = q.clone()
    other[:, 1] = (other[:, 1] + 1) % VOCAB
    for spec, depends in (("none", False), ("all", True)):
        model = build_model(model_config("tiny", film_blocks=spec), VOCAB, ANSWERS).eval()
        same = torch.equal(model(images, q, l), model(images, other, l))
        assert same != depends


def test_coord_map():
    c = coord_map(3, 5, torch.zeros(1))
    assert c.shape == (1, 2, 3, 5)
    assert c[0, 0, 0].tolist() == [-1, -0.5, 0, 0.5, 1]
    assert c[0, 1, :, 0].tolist() == [-1, 0, 1]


def test_parse_film_blocks_errors():
    assert parse_film_blocks("1,3", 4) == [False, True, False, True]
    with pytest.raises(ValueError, match="out of range"):
        parse_film_blocks("4", 4)
    with pytest.raises(ValueError, match="indices"):
        parse_film_blocks("first", 4)


def test_qtype_baseline_majority_per_family():
    answers = np.array([1, 1, 2, 3, 3, 3, 0])
    families = np.array([0, 0, 0, 1, 1, 2, -1])
    types = np.array([0, 0, 0, 1, 1, 1, 1])
    base = QTypeBaseline().fit(answers, families, types)
    pred = base.predict(np.array([0, 1, 2, 9, -1]), np.array([0, 1, 1, 1, 4]))
    assert pred.tolist() == [1, 3, 3, 3, 3]


def test_features_input():
    cfg = model_config("tiny", input="features", feature_channels=12)
    model = build_model(cfg, VOCAB, ANSWERS)
    _, q, l = batch()
    assert model(torch.randn(4, 12, 6, 6), q, l).shape == (4, ANSWERS)


@pytest.mark.parametrize("arch", ["film", "cnn_gru", "question_only"])
def test_shared_images_equal_repeated_images(arch):
    """image_index runs the stem once per distinct image. With every image asked about the same
    number of times the batch norm statistics are the same as with a row per question, so
    outputs, gradients and running statistics must match; in eval mode any sharing does."""
    import copy

    torch.manual_seed(0)
    shared = build_model(model_config("tiny", arch=arch), VOCAB, ANSWERS)
    repeated = copy.deepcopy(shared)
    images, q, lengths = batch(b=6)
    distinct, index = images[:3], torch.tensor([2, 0, 1, 1, 0, 2])
    out, expected = shared(distinct, q, lengths, index), repeated(distinct[index], q, lengths)
    torch.testing.assert_close(out, expected)
    answers = torch.arange(6) % ANSWERS
    F.cross_entropy(out, answers).backward()
    F.cross_entropy(expected, answers).backward()
    for (name, p), r in zip(shared.named_parameters(), repeated.parameters()):
        torch.testing.assert_close(p.grad, r.grad, msg=name)
    for (name, buf), r in zip(shared.named_buffers(), repeated.buffers()):
        # The running variance is unbiased, n / (n - 1) with n values per channel: the stem
        # sees half as many values (3 images instead of 6 rows), and its n is at least 192.
        rtol = 1 / 190 if name.startswith("stem.") and name.endswith("running_var") else None
        torch.testing.assert_close(buf, r, msg=name, rtol=rtol, atol=None if rtol is None else 1e-5)
    shared.eval(), repeated.eval()
    uneven = torch.tensor([0, 0, 0, 1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(shared(distinct, q, lengths, uneven), repeated(distinct[uneven], q, lengths))
