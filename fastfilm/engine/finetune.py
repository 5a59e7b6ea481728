"""Fine-tuning from a trained run: `fastfilm train DATA --init-from RUN [--train-only ...]`.

    init = load_init(run)                                   # RUN's best weights, model config, vocabulary
    vocab = extend_vocab(init.vocab, data_vocab, ...)       # RUN's ids kept, DATA's new words appended
    splits = [remap_split(s, data_vocab, vocab) for s in splits]   # DATA re-encoded in those ids
    init_weights(model, init, vocab); freeze(model, "film_generator")

The model keeps RUN's architecture, token ids and answer set, so that everything it learned
keeps its meaning: a word RUN knew keeps its embedding row, a word it did not know gets a new
row appended (freshly initialised, seeded by --seed), and DATA's questions, cached with DATA's
own vocabulary, are translated token by token. The classifier keeps RUN's outputs, so every
answer of DATA's training split must be one of RUN's. docs/finetuning.md has the recipes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fastfilm.checkpoint import load_checkpoint, model_config_from
from fastfilm.config import ModelConfig
from fastfilm.data.cache import SplitData
from fastfilm.data.vocab import UNK, Vocab
from fastfilm.errors import UserError

# --train-only -> the parts (top-level modules) that keep training; None: all of them.
TRAIN_ONLY: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "question": ("question",),                            # word embeddings + GRU
    "film_generator": ("question", "film_generator"),     # the paper's CLEVR-Humans recipe
}
EMBEDDING = "question.embed.weight"  # the one tensor whose shape follows the vocabulary


@dataclass
class Init:
    """What a fine-tuning run starts from."""
    source: str
    state: dict[str, torch.Tensor]
    model_cfg: ModelConfig
    vocab: Vocab
    meta: dict


def load_init(run: str | Path) -> Init:
    """RUN's best weights (a run directory means its best.safetensors) with its model and vocabulary."""
    state, meta = load_checkpoint(run)
    try:
        vocab = Vocab(**meta["vocab"])
        model_cfg = model_config_from(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--init-from {run}: its model config or vocabulary is unreadable ({e})") from None
    return Init(str(run), state, model_cfg, vocab, meta)


def check_model_flags(init: Init, overrides: dict) -> None:
    """Model flags given with --init-from must agree with RUN's model (it is RUN's model that trains)."""
    differ = {k: v for k, v in overrides.items() if getattr(init.model_cfg, k) != v}
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {v!r} (RUN has {getattr(init.model_cfg, k)!r})"
                          for k, v in differ.items())
        raise UserError(f"--init-from {init.source} fine-tunes that run's model: drop {flags}")


def extend_vocab(base: Vocab, data: Vocab, data_name: str, run_name: str) -> Vocab:
    """base's tables with the question words of `data` that base lacks appended (sorted, so
    that the ids do not depend on dict order). UserError naming them when `data` has answers
    base's classifier cannot give."""
    missing = sorted(set(data.answer_token_to_idx) - set(base.answer_token_to_idx))
    if missing:
        shown = ", ".join(repr(a) for a in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise UserError(f"{data_name} has answers that {run_name} was not trained to give: {shown}; fine-tuning "
                        f"keeps {run_name}'s classifier, so its answer set must include every training answer of "
                        f"{data_name} ({len(base.answer_token_to_idx)} answers)")
    table = dict(base.question_token_to_idx)
    for word in sorted(set(data.question_token_to_idx) - set(table)):
        table[word] = len(table)
    return Vocab(table, dict(base.answer_token_to_idx), dict(base.program_token_to_idx))


def id_maps(data: Vocab, model: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """(question ids [len(data)], answer ids [data.num_answers]): the model's id of each of
    data's ids. A word the model lacks becomes <UNK>; an answer it lacks, its <UNK> answer
    (a val question the classifier cannot get right, as with an unknown answer in any cache)."""
    q_unk, a_unk = model.question_token_to_idx[UNK], model.answer_token_to_idx.get(UNK, -1)
    q = np.zeros(len(data), dtype=np.int64)
    for word, i in data.question_token_to_idx.items():
        q[i] = model.question_token_to_idx.get(word, q_unk)
    a = np.array([model.answer_token_to_idx.get(word, a_unk) for word in data.idx_to_answer], dtype=np.int64)
    return q, a


def covers(model: Vocab, data: Vocab) -> bool:
    """Whether every question word and answer of `data` has an id in `model` (ids may differ):
    then remap_split loses nothing. A fine-tuned run covers the data it was tuned on."""
    return (set(data.question_token_to_idx) <= set(model.question_token_to_idx)
            and set(data.answer_token_to_idx) <= set(model.answer_token_to_idx))


def remap_split(split: SplitData, data: Vocab, model: Vocab) -> SplitData:
    """The split's questions and answers in the model's ids (read into memory; images untouched)."""
    if data.to_json() == model.to_json():
        return split
    q, a = id_maps(data, model)
    answers = np.asarray(split.answers)
    return dataclasses.replace(split, questions=q[np.asarray(split.questions)],
                               answers=np.where(answers >= 0, a[answers.clip(min=0)], -1))


def new_words(base: Vocab, model: Vocab) -> list[str]:
    """The words `model` appended to `base`, in id order."""
    return [w for w, i in sorted(model.question_token_to_idx.items(), key=lambda kv: kv[1])
            if w not in base.question_token_to_idx]


@torch.no_grad()
def init_weights(model: nn.Module, init: Init, vocab: Vocab) -> int:
    """Load RUN's weights into `model` (built for `vocab`, which extends RUN's): every tensor
    as RUN had it; the embedding's rows of RUN's words too, those of new words keep the
    model's fresh initialisation. Returns the number of new rows."""
    if any(vocab.question_token_to_idx.get(w) != i for w, i in init.vocab.question_token_to_idx.items()):
        raise ValueError("the model's vocabulary must keep every id of RUN's (extend_vocab)")
    state = dict(init.state)
    old = state[EMBEDDING]
    fresh = model.get_submodule("question.embed").weight.detach().to("cpu", old.dtype).clone()
    if fresh.shape[0] < old.shape[0] or fresh.shape[1:] != old.shape[1:]:
        raise ValueError(f"embedding {tuple(fresh.shape)} cannot hold RUN's {tuple(old.shape)}")
    fresh[:old.shape[0]] = old
    state[EMBEDDING] = fresh
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"--init-from {init.source}: weights do not fit its saved model config "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return fresh.shape[0] - old.shape[0]


def freeze(model: nn.Module, train_only: str) -> tuple[str, ...]:
    """Freeze every part `train_only` does not train (model/freeze.py); returns their names."""
    if train_only not in TRAIN_ONLY:
        raise ValueError(f"train_only must be one of {sorted(TRAIN_ONLY)}, got {train_only!r}")
    trainable = TRAIN_ONLY[train_only]
    if trainable is None:
        return ()
    parts = {name for name, _ in model.named_children()}
    if not set(trainable) <= parts:
        raise UserError(f"--train-only {train_only}: this {model.cfg.arch} model has no "
                        f"{' or '.join(sorted(set(trainable) - parts))} (no FiLM-ed block?)")
    return model.freeze(trainable)

