"""The reference model: shapes, padding invariance, ablation switches, baselines."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastfilm.config import ModelConfig, model_config
from fastfilm.model import QTypeBaseline, build_model
from fastfilm.model.reference import coord_map, parse_film_blocks

VOCAB, ANSWERS = 30, 7


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


ABLATIONS = [
    dict(beta="zero"), dict(gamma="one"), dict(gamma="sigmoid"), dict(gamma="tanh"), dict(gamma="exp"),
    dict(film_position="after_relu"), dict(film_position="after_conv2"), dict(film_position="before_conv1"),
    dict(film_position="after_residual"), dict(film_blocks="0"), dict(film_blocks="none"), dict(num_blocks=1),
    dict(num_blocks=3, film_blocks="0,2"), dict(residual=False), dict(batchnorm=False), dict(coords=False),
    dict(conv2_kernel=1, coords=False),
]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_ablation_builds_and_trains_a_step(overrides):
    torch.manual_seed(0)
    model = build_model(model_config("tiny", **overrides), VOCAB, ANSWERS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, q, l = batch(b=8)
    answers = torch.randint(0, ANSWERS, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = F.cross_entropy(model(images, q, l), answers)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("blocks" in k or "fc" in k for k in changed)


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
