"""How long each cached question is, in words and in reasoning steps (program functions).

The cache keeps tokens but not programs (fastfilm/data/cache.py SplitData), so program
lengths are read again from the split's question file and matched to the cached rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from fastfilm.data import reader
from fastfilm.data.cache import SplitData, read_meta
from fastfilm.data.vocab import Vocab


def question_words(split: SplitData, n: int) -> np.ndarray:
    """Words of each of the first n questions (tokens without <START>/<END>): [n] int64."""
    return np.asarray(split.lengths[:n], dtype=np.int64) - 2


def source_dir(data: str | Path) -> Path:
    """The CLEVR-layout directory behind DATA: DATA itself, or the one a cache was built from."""
    meta = read_meta(data)
    return Path(meta["source"]) if meta is not None else Path(data)


def program_lengths(data: str | Path, split: SplitData, vocab: Vocab, n: int,
                    progress: bool = False) -> tuple[np.ndarray | None, str]:
    """Functions in the program of each of the split's first n questions.

    Returns ([n] int64 with -1 where a question has no program, "") or (None, why not).
    Question records are matched to cached rows in order by their encoded tokens, so records
    the cache skipped (bad records or images under --skip-bad) are passed over; two equal
    questions next to each other could swap their programs, which then share a family and
    in CLEVR a length.
    """
    root = source_dir(data)
    path = reader.question_file(root, split.name) if root.is_dir() else None
    if path is None:
        return None, f"no question file for split {split.name!r} under {root}"
    out = np.full(n, -1, dtype=np.int64)
    row = 0
    records = tqdm(reader.stream_records(path, "questions"), desc=f"{split.name} programs", unit="q", leave=False,
                   disable=not progress or path.stat().st_size < (8 << 20))
    for _, _, rec in records:
        if row == n:
            break
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            continue
        length = int(split.lengths[row])
        if vocab.encode_question(rec["question"]) != split.questions[row, :length].tolist():
            continue  # a record the cache left out
        program = rec.get("program")
        out[row] = len(program) if isinstance(program, list) and program else -1
        row += 1
    if row < n:
        return None, f"{path}: only {row} of the cache's {n} questions were found in it (another version of the file?)"
    if (out < 0).all():
        return None, f"{path}: no question has a program"
    return out, ""
