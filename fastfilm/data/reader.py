"""Read any CLEVR v1.0-layout directory as it is: CLEVR, CoGenT, CLEVR-Humans, user data.

Layout: `DATA/questions/<file>.json` ({"questions": [...]} or a bare list), images under
`DATA/images/<split>/`, scenes (optional, unused here) under `DATA/scenes/`. The real
train question file is ~0.4 GB of JSON on one line, so records are streamed one at a time
and only the fields the cache needs are kept (programs are reduced to their type).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fastfilm.data.program import ProgramError
from fastfilm.data.types import UNKNOWN, type_id, type_of_program
from fastfilm.data.vocab import program_tokens
from fastfilm.errors import UserError

_CHUNK = 1 << 22  # characters read at a time
# A decode error this far before the end of the buffer cannot be "record not fully read yet".
_MARGIN = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
_CLEVR_NAME = re.compile(r"^CLEVR_([A-Za-z]+)_\d+\.\w+$")


class _Stream:
    """Incremental reader over one JSON text: values are parsed one at a time from a window."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, encoding="utf-8")
        self.buf, self.pos, self.eof, self.line = "", 0, False, 1
        self.decoder = json.JSONDecoder()

    def close(self) -> None:
        self.f.close()

    def _fill(self) -> None:
        try:
            data = self.f.read(_CHUNK)
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: not UTF-8 text ({e})") from None
        self.eof = not data
        self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def _advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """Next non-space character ('' at the end of the file)."""
        while True:
            self._advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self._fill()

    def expect(self, chars: str, where: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            got = repr(c) if c else "end of file"
            raise UserError(f"{self.path}, line {self.line}: malformed JSON {where}: expected "
                            f"{' or '.join(map(repr, chars))}, found {got}")
        self.pos += 1
        return c

    def value(self, where: str):
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.eof or e.pos < len(self.buf) - _MARGIN:
                    line = self.line + self.buf.count("\n", self.pos, e.pos)
                    raise UserError(f"{self.path}, line {line}: malformed JSON in {where}: {e.msg}") from None
                self._fill()
                continue
            if end >= len(self.buf) and not self.eof:  # a number may go on in the next chunk
                self._fill()
                continue
            self._advance(end)
            return obj


def stream_records(path: str | Path, key: str) -> Iterator[tuple[int, int, object]]:
    """Yield (record index, line, record) from `{key: [...]}` or a bare `[...]`, one at a time."""
    path = Path(path)
    try:
        s = _Stream(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        first = s.expect("[{", "at the start of the file")
        if first == "{":
            while True:
                if s.peek() == "}":
                    raise UserError(f"{path}: no {key!r} list in this JSON object")
                name = s.value("a key of the top-level object")
                if not isinstance(name, str):
                    raise UserError(f"{path}, line {s.line}: malformed JSON: object keys must be strings")
                s.expect(":", f"after key {name!r}")
                if name == key:
                    s.expect("[", f"at the start of {key!r}")
                    break
                s.value(f"field {name!r}")
                if s.expect(",}", "between top-level fields") == "}":
                    raise UserError(f"{path}: no {key!r} list in this JSON object")
        if s.peek() == "]":
            return
        index = 0
        while True:
            s.peek()  # so that `line` is the record's first line, not the one before
            line = s.line
            yield index, line, s.value(f"record {index}")
            if s.expect(",]", f"after record {index}") == "]":
                return
            index += 1
    finally:
        s.close()


# ------------------------------------------------------------------ files and splits

def split_pattern(split: str) -> re.Pattern:
    """Matches a file stem that holds `split` as a whole word."""
    # `train` must not match `trainA` (CoGenT) nor `CLEVR-Humans-train` match `val`.
    return re.compile(rf"(^|[^A-Za-z0-9]){re.escape(split)}([^A-Za-z0-9]|$)")


def _candidate_files(root: Path) -> list[Path]:
    found = []
    for d in (root / "questions", root):
        if d.is_dir():
            found += sorted(p for p in d.glob("*.json") if "scene" not in p.name.lower() and p.name != "vocab.json")
    return found


def question_file(root: str | Path, split: str) -> Path | None:
    """The question file of `split`: CLEVR's name first, else the one file whose name holds the split."""
    root = Path(root)
    exact = root / "questions" / f"CLEVR_{split}_questions.json"
    if exact.is_file():
        return exact
    matches = [p for p in _candidate_files(root) if split_pattern(split).search(p.stem)]
    if len(matches) > 1:
        raise UserError(f"{root}: several question files for split {split!r}: "
                        + ", ".join(str(p) for p in matches))
    return matches[0] if matches else None


def list_splits(root: str | Path) -> list[str]:
    """Split names of the question files under DATA/questions (or DATA), CLEVR naming first."""
    names = []
    for p in _candidate_files(Path(root)):
        m = re.match(r"^CLEVR_(.+)_questions$", p.stem)
        name = m.group(1) if m else re.split(r"[-_]", p.stem)[-1]
        if name not in names:
            names.append(name)
    return names


# ------------------------------------------------------------------ questions

@dataclass
class SplitQuestions:
    """The questions of one split, reduced to what training and evaluation need (Q = questions)."""
    name: str
    file: Path
    text: list[str] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)    # None: the file has no answer (test)
    image_files: list[str] = field(default_factory=list)       # relative to DATA/images
    families: list[int] = field(default_factory=list)          # question_family_index, -1 unknown
    types: list[int] = field(default_factory=list)             # index into QUESTION_TYPES, -1 unknown
    has_program: list[bool] = field(default_factory=list)
    records: list[int] = field(default_factory=list)           # record index in the file
    program_tokens: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)           # one message per skipped record

    def __len__(self) -> int:
        return len(self.text)


class _ImageDirs:
    """Which DATA/images/<dir> holds a record's image. CLEVR-Humans test questions name CLEVR val
    images, so the CLEVR_<split>_NNNNNN prefix of the file name wins over the record's split."""

    def __init__(self, root: Path, split: str):
        self.images = root / "images"
        self.split = split
        self.known: dict[tuple, str] = {}

    def __call__(self, filename: str, record_split: str | None) -> str:
        if "/" in filename:
            return filename
        m = _CLEVR_NAME.match(filename)
        key = (m.group(1) if m else None, record_split)
        if key not in self.known:
            candidates = [c for c in (*key, self.split) if c]
            self.known[key] = next((c for c in candidates if (self.images / c).is_dir()), self.split)
        return f"{self.known[key]}/{filename}"


def _bad(path: Path, index: int, line: int, what: str) -> str:
    return f"{path}, record {index} (line {line}): {what}"


def read_split(root: str | Path, split: str, *, skip_bad: bool = False,
               require_answers: bool = False) -> SplitQuestions:
    """Stream one split's question file. A malformed record (or, with `require_answers`, one
    without an answer) raises UserError naming the file, record index and field, or with
    `skip_bad` is skipped and listed in `.skipped`.
    JSON that is not parseable at all always raises: no record boundary can be trusted after it."""
    root = Path(root)
    path = question_file(root, split)
    if path is None:
        raise UserError(f"{root}: no question file for split {split!r} (looked for "
                        f"questions/CLEVR_{split}_questions.json and questions/*{split}*.json)")
    out = SplitQuestions(split, path)
    image_dir = _ImageDirs(root, split)
    records = tqdm(stream_records(path, "questions"), desc=f"{split} questions", unit="q", leave=False,
                   disable=path.stat().st_size < (8 << 20))
    for index, line, rec in records:
        try:
            row = _parse(rec, split, image_dir)
            if require_answers and not (row[1] or "").strip():
                raise ValueError(f"field 'answer' missing or blank (every question of split {split!r} needs one)")
        except ValueError as e:
            msg = _bad(path, index, line, str(e))
            if not skip_bad:
                raise UserError(msg) from None
            out.skipped.append(msg)
            continue
        text, answer, image, family, program, step_tokens = row
        out.text.append(text)
        out.answers.append(answer)
        out.image_files.append(image)
        out.families.append(family)
        out.types.append(type_id(type_of_program(program)) if program else UNKNOWN)
        out.has_program.append(bool(program))
        out.records.append(index)
        out.program_tokens.update(step_tokens)
    return out


def _parse(rec, split: str, image_dir: _ImageDirs) -> tuple:
    if not isinstance(rec, dict):
        raise ValueError(f"a question record must be a JSON object, not {type(rec).__name__}")
    text = rec.get("question")
    if not isinstance(text, str):
        raise ValueError("field 'question' missing or not a string")
    answer = rec.get("answer")
    if isinstance(answer, bool):
        answer = "yes" if answer else "no"
    elif isinstance(answer, int):
        answer = str(answer)
    elif answer is not None and not isinstance(answer, str):
        raise ValueError(f"field 'answer' must be a string, not {type(answer).__name__}")
    family = rec.get("question_family_index", UNKNOWN)
    if not isinstance(family, int) or isinstance(family, bool):
        raise ValueError("field 'question_family_index' must be an integer")
    program = rec.get("program") or []
    if not isinstance(program, list):
        raise ValueError("field 'program' must be a list of {function, inputs, value_inputs} objects")
    try:  # checks every step, in any spelling program.parse_step accepts
        step_tokens = program_tokens(program)
    except ProgramError as e:
        raise ValueError(f"field 'program', {e}") from None
    filename = rec.get("image_filename")
    if filename is None:
        idx = rec.get("image_index")
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError("needs field 'image_filename' or a non-negative integer 'image_index'")
        filename = f"CLEVR_{split}_{idx:06d}.png"
    elif not isinstance(filename, str) or not filename or filename.startswith("/") or ".." in filename.split("/"):
        raise ValueError("field 'image_filename' must be a file name relative to the images directory")
    record_split = rec.get("split") if isinstance(rec.get("split"), str) else None
    return text, answer, image_dir(filename, record_split), family, program, step_tokens


def family_type_map(splits: Iterable[SplitQuestions]) -> dict[int, int]:
    """question_family_index -> type id, learned from questions that have programs.
    A family seen with two types (a user's data) maps to unknown (-1)."""
    out: dict[int, int] = {}
    for s in splits:
        for fam, typ, has in zip(s.families, s.types, s.has_program):
            if has and fam != UNKNOWN:
                out[fam] = typ if out.get(fam, typ) == typ else UNKNOWN
    return out


def fill_types(split: SplitQuestions, family_types: dict[int, int]) -> int:
    """Give questions without a program the type of their family; returns how many got one."""
    filled = 0
    for i, (fam, has) in enumerate(zip(split.families, split.has_program)):
        if not has and family_types.get(fam, UNKNOWN) != UNKNOWN:
            split.types[i] = family_types[fam]
            filled += 1
    return filled
