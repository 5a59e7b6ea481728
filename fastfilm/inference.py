"""Loading a trained model and answering questions about single images; `fastfilm answer`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastfilm.checkpoint import load_checkpoint, model_config_from
from fastfilm.config import AnswerConfig
from fastfilm.errors import UserError


def load_model(checkpoint: str | Path, device: torch.device, opts=None) -> tuple[nn.Module, dict]:
    """A model in eval mode on `device` and the checkpoint's meta (model_config, vocab, ...).

    opts: fastpath.FastOptions; the reference model when None. Both load the same weights.
    """
    from fastfilm.fastpath import FastOptions, build_model

    state, meta = load_checkpoint(checkpoint)
    cfg = model_config_from(meta)
    vocab = meta["vocab"]
    opts = opts or FastOptions(reference=True)
    model = build_model(cfg, len(vocab["question_token_to_idx"]), len(vocab["answer_token_to_idx"]), opts, device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{checkpoint}: weights do not fit a {cfg.arch} model with its saved config "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), meta


def check_vocab_matches(meta: dict, cache: Path, data: str | Path) -> None:
    """Refuse data whose questions or answers were encoded with another vocabulary."""
    cached = json.loads((Path(cache) / "vocab.json").read_text())
    for key, what in (("answer_token_to_idx", "answer set"), ("question_token_to_idx", "question vocabulary")):
        if cached[key] != meta["vocab"][key]:
            ours, theirs = set(meta["vocab"][key]), set(cached[key])
            raise UserError(
                f"the checkpoint's {what} does not match {data}'s ({len(ours)} vs {len(theirs)} entries; "
                f"only in the data: {sorted(theirs - ours)[:8]}). Build a cache with the checkpoint's vocabulary: "
                f"fastfilm preprocess {data} --vocab RUN/vocab.json --cache DIR")


def encode(question: str, vocab: dict) -> tuple[list[int], list[str]]:
    """(token ids with <START>/<END>, words not in the vocabulary)."""
    from fastfilm.data.vocab import Vocab

    v = Vocab(**vocab)
    return v.encode_question(question), v.unknown_words(question)


@torch.inference_mode()
def answer(model: nn.Module, meta: dict, image: np.ndarray, question: str, top: int = 5,
           device: torch.device | None = None) -> tuple[list[tuple[str, float]], list[str]]:
    """image: [S, S, 3] uint8 at the model's input size. Returns ([(answer, probability)], unknown words)."""
    device = device or next(model.parameters()).device
    tokens, unknown = encode(question, meta["vocab"])
    questions = torch.tensor([tokens], device=device)
    lengths = torch.tensor([len(tokens)], device=device)
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(device)
    probs = model(images, questions, lengths).float().softmax(-1)[0]
    idx_to_answer = {i: a for a, i in meta["vocab"]["answer_token_to_idx"].items()}
    p, i = probs.topk(min(top, probs.numel()))
    return [(idx_to_answer[int(k)], float(v)) for v, k in zip(p, i)], unknown


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Any PNG/JPEG (RGB or RGBA, any size) -> [size, size, 3] uint8, as preprocessing makes it."""
    from fastfilm.data.decode import decode_pillow, read_encoded

    try:
        return decode_pillow(read_encoded(path), size)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def run(cfg: AnswerConfig) -> int:
    from fastfilm.evaluate import resolve_device

    if not cfg.image or not cfg.question:
        raise UserError("give both --image IMG and --question TEXT")
    device = resolve_device(cfg.device)
    model, meta = load_model(cfg.checkpoint, device)
    image = load_image(cfg.image, meta["model_config"]["image_size"])
    answers, unknown = answer(model, meta, image, cfg.question, cfg.top, device)
    if unknown:
        print(f"note: not in the model's vocabulary, read as <UNK>: {', '.join(unknown)}")
    print(f"Q: {cfg.question}")
    for name, prob in answers:
        print(f"  {prob:6.1%}  {name}")
    return 0
