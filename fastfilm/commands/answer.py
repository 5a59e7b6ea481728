"""`fastfilm answer`: a trained model's answers to a question about one image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastfilm.config import AnswerConfig
from fastfilm.data.decode import decode_pillow, read_encoded
from fastfilm.data.vocab import Vocab
from fastfilm.engine.build import load
from fastfilm.engine.options import resolve
from fastfilm.engine.predictor import Predictor
from fastfilm.errors import UserError
from fastfilm.hardware import resolve_device


@torch.inference_mode()
def answer(model: nn.Module | Predictor, vocab: Vocab, image: np.ndarray, question: str, top: int = 5,
           device: torch.device | None = None) -> tuple[list[tuple[str, float]], list[str]]:
    """image: [S, S, 3] uint8 at the model's input size; model: an eval-mode model or a
    Predictor (then give `device`). Returns ([(answer, probability)] best first, words not in
    the vocabulary)."""
    device = device or next(model.parameters()).device
    tokens, unknown = vocab.encode_question(question), vocab.unknown_words(question)
    questions = torch.tensor([tokens], device=device)
    lengths = torch.tensor([len(tokens)], device=device)
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(device)
    probs = model(images, questions, lengths).float().softmax(-1)[0]
    p, i = probs.topk(min(top, probs.numel()))
    return [(vocab.idx_to_answer[int(k)], float(v)) for v, k in zip(p, i)], unknown


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Any PNG/JPEG (RGB or RGBA, any size) -> [size, size, 3] uint8, as preprocessing makes it."""
    try:
        return decode_pillow(read_encoded(path), size)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def run(cfg: AnswerConfig) -> int:
    if not cfg.image or not cfg.question:
        raise UserError("give both --image IMG and --question TEXT")
    device = resolve_device(cfg.device)
    # One question: the eager reference model answers it as fast as a compiled one would start.
    ex = resolve(cfg.fast, device)
    loaded = load(cfg.checkpoint, ex)
    image = load_image(cfg.image, loaded.config.image_size)
    # --cuda-graphs: through the Predictor, which replays CUDA graphs (recorded on a shape's
    # second call, so a single question runs the warm-up pass only).
    forward = Predictor(loaded.model, ex) if ex.cuda_graphs else loaded.model
    answers, unknown = answer(forward, loaded.vocab, image, cfg.question, cfg.top, device)
    if unknown:
        print(f"note: not in the model's vocabulary, read as <UNK>: {', '.join(unknown)}")
    print(f"Q: {cfg.question}")
    for name, prob in answers:
        print(f"  {prob:6.1%}  {name}")
    return 0
