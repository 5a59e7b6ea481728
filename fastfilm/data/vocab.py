"""Question, answer and program vocabularies in the original FiLM code's vocab.json layout.

ethanjperez/film (after clevr-iep) writes one JSON object with `question_token_to_idx`,
`answer_token_to_idx` and `program_token_to_idx`; every table starts with the same four
special tokens, the answer table included, so a vocab.json from that code loads here and
one written here loads there. Tokens after the specials are sorted, so building twice
from the same questions gives the same ids.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastfilm.atomic import write_json
from fastfilm.data.program import parse_step
from fastfilm.errors import UserError

NULL, START, END, UNK = "<NULL>", "<START>", "<END>", "<UNK>"
SPECIAL_TOKENS: dict[str, int] = {NULL: 0, START: 1, END: 2, UNK: 3}
PUNCT_TO_KEEP = (";", ",")
PUNCT_TO_REMOVE = ("?", ".")
_TABLES = ("question_token_to_idx", "answer_token_to_idx", "program_token_to_idx")


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Words of a question, as the original preprocessing splits them (without START/END).

    ';' and ',' become tokens of their own; '?' and '.' are dropped. Lowercased unless
    `lowercase=False` (the original code kept case: its vocab.json has both 'Are' and 'are').
    """
    s = text.lower() if lowercase else text
    for p in PUNCT_TO_KEEP:
        s = s.replace(p, f" {p}")
    for p in PUNCT_TO_REMOVE:
        s = s.replace(p, "")
    # split() rather than split(" "): runs of spaces or tabs must not make empty tokens.
    return s.split()


def program_tokens(program: Iterable[dict]) -> list[str]:
    """Tokens of a CLEVR program, as the original writes them: `function` or `function[value]`.

    Steps may be spelled any way program.parse_step accepts; a malformed one raises
    ProgramError naming the step.
    """
    out = []
    for i, step in enumerate(program):
        fn, _, values = parse_step(step, i)
        out.append(f"{fn}[{values[0]}]" if values else fn)
    return out


def _table(tokens: Iterable[str]) -> dict[str, int]:
    table = dict(SPECIAL_TOKENS)
    for tok in sorted(set(tokens) - set(SPECIAL_TOKENS)):
        table[tok] = len(table)
    return table


@dataclass
class Vocab:
    """Token <-> id tables. `<NULL>`=0 pads, `<START>`=1, `<END>`=2, `<UNK>`=3."""
    question_token_to_idx: dict[str, int]
    answer_token_to_idx: dict[str, int]
    program_token_to_idx: dict[str, int] = field(default_factory=lambda: dict(SPECIAL_TOKENS))

    def __post_init__(self) -> None:
        # A table with capitalised words was built without lowercasing (the original code):
        # tokenize the same way, or 'What' would become <UNK>.
        self.lowercase = all(t == t.lower() for t in self.question_token_to_idx if t not in SPECIAL_TOKENS)
        size = len(self.answer_token_to_idx)
        self.idx_to_answer: list[str] = [""] * size
        for tok, i in self.answer_token_to_idx.items():
            if not 0 <= i < size or self.idx_to_answer[i]:
                raise ValueError(f"answer_token_to_idx: ids must be 0..{size - 1}, each once (bad: {tok!r} -> {i})")
            self.idx_to_answer[i] = tok

    # -------------------------------------------------------------- building

    @classmethod
    def from_tokens(cls, question_tokens: Iterable[str], answers: Iterable[str],
                    program_tokens: Iterable[str] = ()) -> Vocab:
        """Tables from the tokens seen (any order, repeats allowed)."""
        return cls(_table(question_tokens), _table(answers), _table(program_tokens))

    @classmethod
    def build(cls, questions: Iterable[dict]) -> Vocab:
        """Build from CLEVR question records (the train split): `question`, optional `answer`, `program`."""
        words: set[str] = set()
        answers: set[str] = set()
        programs: set[str] = set()
        for q in questions:
            words.update(tokenize(q["question"]))
            if q.get("answer") is not None:
                answers.add(str(q["answer"]))
            if q.get("program"):
                programs.update(program_tokens(q["program"]))
        return cls.from_tokens(words, answers, programs)

    # -------------------------------------------------------------- files

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocab.json (this project's or the original FiLM code's)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: vocabulary file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a readable vocab.json ({e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a vocab.json must hold a JSON object")
        tables = {}
        for name in _TABLES:
            table = raw.get(name, dict(SPECIAL_TOKENS) if name == "program_token_to_idx" else None)
            if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
                raise UserError(f"{path}: field {name!r} must be an object of token -> integer id")
            if name != "answer_token_to_idx" and any(table.get(t) != i for t, i in SPECIAL_TOKENS.items()):
                raise UserError(f"{path}: field {name!r} must map {SPECIAL_TOKENS}")
            tables[name] = table
        try:
            return cls(**tables)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in _TABLES}

    def save(self, path: str | Path) -> Path:
        """Write vocab.json atomically (temp file in the same directory, then rename)."""
        return write_json(path, self.to_json(), indent=1)

    def fingerprint(self) -> str:
        """Short hash of the three tables: equal iff every token keeps its id."""
        body = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    # -------------------------------------------------------------- encoding

    @property
    def num_answers(self) -> int:
        """Classifier outputs (the four special tokens included, as in the original)."""
        return len(self.idx_to_answer)

    def encode_question(self, text: str) -> list[int]:
        """[<START>, words..., <END>]; a word not in the table becomes <UNK> (never raises)."""
        unk = self.question_token_to_idx[UNK]
        table = self.question_token_to_idx
        words = tokenize(text, self.lowercase)
        return [SPECIAL_TOKENS[START], *(table.get(w, unk) for w in words), SPECIAL_TOKENS[END]]

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` that encode_question maps to <UNK>, in order."""
        return [w for w in tokenize(text, self.lowercase) if w not in self.question_token_to_idx]

    def answer_to_idx(self, answer: str) -> int:
        """Id of an answer; one outside the table maps to <UNK> (or -1 if the table has none)."""
        return self.answer_token_to_idx.get(str(answer), self.answer_token_to_idx.get(UNK, -1))

    def __len__(self) -> int:
        return len(self.question_token_to_idx)
