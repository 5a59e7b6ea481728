"""`fastfilm answer`: a trained model's answers to a question about one image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastfilm.config import AnswerConfig
from fastfilm.data.decode import decode_pillow, read_encoded
from fastfilm.data.vocab import Vocab, tokenize
from fastfilm.engine.build import load
from fastfilm.engine.options import Execution
from fastfilm.engine.predictor import Predictor, non_answers
from fastfilm.errors import UserError
from fastfilm.hardware import resolve_device


def answer(model: nn.Module, vocab: Vocab, image: np.ndarray, question: str, top: int = 5,
           device: torch.device | None = None) -> tuple[list[tuple[str, float]], list[str]]:
    """image: [S, S, 3] uint8 at the model's input size. Returns ([(answer, probability)] best
    first, at most `top`, never a special token such as <UNK>; words not in the vocabulary)."""
    device = device or next(model.parameters()).device
    tokens, unknown = vocab.encode_question(question), vocab.unknown_words(question)
    questions = torch.tensor([tokens], device=device)
    lengths = torch.tensor([len(tokens)], device=device)
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(device)
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


def run(cfg: AnswerConfig) -> int:
    if not cfg.image:
        raise UserError("give --image IMG (PNG or JPEG) and --question TEXT")
    if not tokenize(cfg.question):
        raise UserError(f"--question {cfg.question!r} is blank: ask a question in words, "
                        "e.g. --question 'What color is the cube?'")
    device = resolve_device(cfg.device)
    loaded = load(cfg.checkpoint, Execution(device=device, reference=True))
    image = load_image(cfg.image, loaded.config.image_size)
    answers, unknown = answer(loaded.model, loaded.vocab, image, cfg.question, cfg.top, device)
    if unknown:
        print(f"note: not in the model's vocabulary, read as <UNK>: {', '.join(unknown)}")
    print(f"Q: {cfg.question}")
    for name, prob in answers:
        print(f"  {prob:6.1%}  {name}")
    return 0
