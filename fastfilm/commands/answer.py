"""`fastfilm answer`: a trained model's answers to a question about one image.

A model trained on precomputed features (--input features) never saw pixels and fastfilm
runs no feature extractor: it answers about the image whose feature row it is given
(--features-file, --feature-index; docs/features.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastfilm.config import AnswerConfig
from fastfilm.data import features as feats
from fastfilm.data.decode import decode_pillow, read_encoded
from fastfilm.data.vocab import Vocab, tokenize
from fastfilm.engine.build import load
from fastfilm.engine.options import Execution
from fastfilm.engine.predictor import Predictor, non_answers
from fastfilm.errors import UserError
from fastfilm.hardware import resolve_device


def answer(model: nn.Module, vocab: Vocab, image: np.ndarray, question: str, top: int = 5,
           device: torch.device | None = None) -> tuple[list[tuple[str, float]], list[str]]:
    """image: [S, S, 3] uint8 at the model's input size, or for a features model the image's
    feature [C, H, W] float. Returns ([(answer, probability)] best first, at most `top`, never
    a special token such as <UNK>; words not in the vocabulary)."""
    device = device or next(model.parameters()).device
    tokens, unknown = vocab.encode_question(question), vocab.unknown_words(question)
    questions = torch.tensor([tokens], device=device)
    lengths = torch.tensor([len(tokens)], device=device)
    images = torch.from_numpy(np.array(image))
    images = (images if images.is_floating_point() else images.permute(2, 0, 1))[None].to(device)
    # One question: the eager model answers it as fast as a compiled one would start.
    predictor = Predictor(model, Execution(device=device, reference=True), vocab=vocab)
    probs = predictor(images, questions, lengths).softmax(-1)[0]
    p, i = probs.topk(min(top, probs.numel() - len(non_answers(vocab))))
    return [(vocab.idx_to_answer[int(k)], float(v)) for v, k in zip(p, i)], unknown


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Any PNG/JPEG (RGB or RGBA, any size) -> [size, size, 3] uint8, as preprocessing makes it."""
    try:
        return decode_pillow(read_encoded(path), size)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def load_feature(cfg: AnswerConfig, channels: int) -> np.ndarray:
    """The image's feature [C, H, W] from --features-file at --feature-index (or --image's number)."""
    if not cfg.features_file:
        raise UserError(f"{cfg.checkpoint} was trained on precomputed image features, not pixels, and fastfilm "
                        "computes none: give --features-file FILE (.npy or .h5 [N, C, H, W], as in DATA/features/) "
                        "and --feature-index N (the image's row), or --image NAME to take N from its file name")
    index = cfg.feature_index
    if index < 0:
        if not cfg.image:
            raise UserError("--features-file: give --feature-index N (the image's row), or --image with a CLEVR "
                            "file name that ends in its number")
        index = feats.image_number(cfg.image)
    file = feats.FeatureFile(cfg.features_file)
    feats.check_channels(channels, file.shape, cfg.features_file)
    if index >= len(file):
        raise UserError(f"--feature-index {index}: {cfg.features_file} has rows 0..{len(file) - 1}")
    return file.read(np.array([index]))[0]


def run(cfg: AnswerConfig) -> int:
    if not tokenize(cfg.question):
        raise UserError(f"--question {cfg.question!r} is blank: ask a question in words, "
                        "e.g. --question 'What color is the cube?'")
    device = resolve_device(cfg.device)
    loaded = load(cfg.checkpoint, Execution(device=device, reference=True))
    if loaded.config.input == "features":
        image = load_feature(cfg, loaded.config.feature_channels)
    elif cfg.features_file:
        raise UserError(f"--features-file: {cfg.checkpoint} was trained on pixels; give --image IMG instead")
    elif not cfg.image:
        raise UserError("give both --image IMG and --question TEXT")
    else:
        image = load_image(cfg.image, loaded.config.image_size)
    answers, unknown = answer(loaded.model, loaded.vocab, image, cfg.question, cfg.top, device)
    if unknown:
        print(f"note: not in the model's vocabulary, read as <UNK>: {', '.join(unknown)}")
    print(f"Q: {cfg.question}")
    for name, prob in answers:
        print(f"  {prob:6.1%}  {name}")
    return 0
