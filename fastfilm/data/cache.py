"""`fastfilm preprocess`: decode every image once into a memory-mapped cache, tokenize questions.

Layout of a cache directory:
    meta.json             written last; without a valid one the directory is not a cache
    vocab.json
    <split>/images.npy    [I, S, S, 3] uint8, one row per distinct image of the split
    <split>/{questions,lengths,answers,image_index,types,families}.npy
    <split>/images.json   the image file of each row, relative to DATA/images
A cache is built in a sibling temp directory and renamed into place when complete, so a
killed or failed build never leaves a directory with a meta.json that is not whole.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastfilm.data import reader
from fastfilm.data.decode import decode_images, resolve_backend
from fastfilm.data.vocab import SPECIAL_TOKENS, UNK, Vocab, tokenize
from fastfilm.atomic import current_umask, write_json
from fastfilm.errors import UserError

FORMAT = "fastfilm-cache"
VERSION = 1
META = "meta.json"
_ARRAYS = ("questions", "lengths", "answers", "image_index", "types", "families")


@dataclass
class SplitData:
    """One cached split (Q questions over I images of side S), arrays memory-mapped read-only."""
    images: np.ndarray        # [I, S, S, 3] uint8
    questions: np.ndarray     # [Q, L] int64, <START> ... <END> then <NULL>=0 padding
    lengths: np.ndarray       # [Q] int64, tokens including <START> and <END>
    answers: np.ndarray       # [Q] int64, -1 where the split has no answers (test)
    image_index: np.ndarray   # [Q] int64, row of `images`
    types: np.ndarray         # [Q] int64, index into QUESTION_TYPES, -1 unknown
    families: np.ndarray      # [Q] int64, question_family_index, -1 unknown
    name: str
    image_files: list[str] = field(default_factory=list)  # [I] file of each image row, relative to DATA/images

    def __len__(self) -> int:
        return len(self.lengths)


# ------------------------------------------------------------------ reading a cache

def read_meta(path: str | Path) -> dict | None:
    """The cache's meta.json, or None when `path` is not a complete cache of this version."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        return None
    return meta


def _require_meta(cache_dir: Path) -> dict:
    meta = read_meta(cache_dir)
    if meta is None:
        raise UserError(f"{cache_dir}: not a fastfilm cache (no valid {META}; an interrupted build "
                        "leaves none): run `fastfilm preprocess DATA`")
    return meta


def load_vocab(cache_dir: str | Path) -> Vocab:
    return Vocab.load(Path(cache_dir) / "vocab.json")


def load_split(cache_dir: str | Path, split: str) -> SplitData:
    """Memory-map one split of a cache; checks the arrays against meta.json."""
    cache_dir = Path(cache_dir)
    meta = _require_meta(cache_dir)
    info = meta["splits"].get(split)
    if info is None:
        raise UserError(f"{cache_dir}: no split {split!r} in this cache (it has {', '.join(meta['splits'])})")
    d = cache_dir / split
    try:
        arrays = {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in ("images", *_ARRAYS)}
        files = json.loads((d / "images.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{d}: damaged cache split ({e}); delete the cache and preprocess again") from None
    size, q, n_img = meta["image_size"], info["questions"], info["images"]
    expected = {"images": (n_img, size, size, 3), "questions": (q, info["max_length"]), **{
        name: (q,) for name in _ARRAYS if name != "questions"}}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise UserError(f"{d / name}.npy: shape {arrays[name].shape}, meta.json says {shape}; "
                            "delete the cache and preprocess again")
    return SplitData(**arrays, name=split, image_files=files)


# ------------------------------------------------------------------ building

def default_cache_dir(data: str | Path, image_size: int) -> Path:
    return Path(data) / ".fastfilm_cache" / str(image_size)


def _file_stat(data: Path, path: Path) -> dict:
    st = path.stat()
    return {"file": str(path.relative_to(data)), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _mismatch(meta: dict, data: Path, image_size: int, sources: dict, vocab: Vocab | None,
              explicit: bool) -> str | None:
    """Why an existing cache does not serve this request (None: it does)."""
    if explicit and meta["source"] != str(data):
        raise UserError(f"cache {meta.get('cache', '')} was built from {meta['source']}, not {data}; "
                        "pass another --cache or delete that one")
    if meta["image_size"] != image_size:
        return f"image size {meta['image_size']} != {image_size}"
    for split, src in sources.items():
        have = meta["splits"].get(split, {}).get("source")
        if have != src:
            return f"split {split!r} is {'new' if have is None else 'changed on disk'}"
    if vocab is not None and vocab.fingerprint() != meta["vocab_fingerprint"]:
        return "a different vocabulary was given"
    return None


def prepare(data: str | Path, image_size: int, *, cache: str | Path | None = None,
            splits: tuple[str, ...] | list[str] = ("train", "val"), vocab: str | Path | None = None,
            decoder: str = "auto", device: str = "cpu", skip_bad: bool = False, workers: int = 0,
            force: bool = False) -> Path:
    """Cache directory for DATA (a raw CLEVR-layout dir or a built cache), built if needed.

    Raw DATA: the cache lives in DATA/.fastfilm_cache/<size> unless `cache` is given; it is
    reused when its image size, question files (size and mtime) and vocabulary match, and
    rebuilt otherwise. An explicit `cache` built from another DATA is refused. Splits not
    present in DATA are left out. A built cache is returned after checking size and vocab.
    """
    data = Path(data).resolve()
    if not data.is_dir():
        raise UserError(f"{data}: no such directory")
    given_vocab = Vocab.load(vocab) if vocab else None
    meta = read_meta(data)
    if meta is not None:
        if meta["image_size"] != image_size:
            raise UserError(f"{data}: cache of {meta['image_size']}px images, {image_size}px wanted; run "
                            f"`fastfilm preprocess {meta['source']} --image-size {image_size}`")
        if given_vocab is not None and given_vocab.fingerprint() != meta["vocab_fingerprint"]:
            raise UserError(f"{data}: cache built with another vocabulary than {vocab}; preprocess "
                            f"{meta['source']} with --vocab {vocab}")
        return data
    present = [s for s in dict.fromkeys(splits) if reader.question_file(data, s) is not None]
    if not present:
        raise UserError(f"{data}: none of the splits {', '.join(splits)} has a question file "
                        f"(found splits: {', '.join(reader.list_splits(data)) or 'none'})")
    target = Path(cache).resolve() if cache else default_cache_dir(data, image_size)
    sources = {s: _file_stat(data, reader.question_file(data, s)) for s in present}
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target):
        old = read_meta(target)
        if old is not None and not force:
            reason = _mismatch(old, data, image_size, sources, given_vocab, explicit=cache is not None)
            if reason is None:
                return target
            print(f"fastfilm: rebuilding cache {target}: {reason}", file=sys.stderr)
            # Keep the splits the old cache had, so that train and eval asking for different
            # splits do not rebuild it in turn.
            for s in old["splits"]:
                f = reader.question_file(data, s) if s not in sources else None
                if f is not None:
                    present.append(s)
                    sources[s] = _file_stat(data, f)
        elif old is None and target.exists() and any(target.iterdir()):
            raise UserError(f"{target}: exists and is not a fastfilm cache; refusing to overwrite it")
        _build(data, target, image_size, present, sources, given_vocab, decoder, device, skip_bad, workers)
    return target


@contextlib.contextmanager
def _lock(target: Path):
    # Several processes (DDP ranks) may prepare the same cache: one builds, the others wait
    # and then find it complete.
    with open(target.parent / f".{target.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(target: Path) -> None:
    """Temp dirs of builds whose process died (killed mid-way) are removed."""
    for p in target.parent.glob(f".{target.name}.*-*"):
        pid = p.name.rsplit("-", 2)[-2] if p.name.count("-") >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train_split(data: Path, present: list[str]) -> str:
    if reader.question_file(data, "train") is not None:
        return "train"
    pattern = reader.split_pattern("train")
    for s in present:
        if s.startswith("train") or pattern.search(s):
            return s
    raise UserError(f"{data}: no train split to build the vocabulary from; pass --vocab vocab.json")


def _build(data: Path, target: Path, image_size: int, present: list[str], sources: dict,
           vocab: Vocab | None, decoder: str, device: str, skip_bad: bool, workers: int) -> None:
    t0 = time.time()
    backend = resolve_backend(decoder)
    questions = {s: reader.read_split(data, s, skip_bad=skip_bad) for s in present}
    vocab_source = "given"
    if vocab is None:
        train = _train_split(data, present)
        if train not in questions:
            questions_train = reader.read_split(data, train, skip_bad=skip_bad)
        else:
            questions_train = questions[train]
        vocab = Vocab.from_tokens((w for t in questions_train.text for w in tokenize(t)),
                                  (a for a in questions_train.answers if a is not None),
                                  questions_train.program_tokens)
        vocab_source = str(questions_train.file)
        family_types = reader.family_type_map([*questions.values(), questions_train])
    else:
        family_types = reader.family_type_map(questions.values())
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared dataset's cache from others
    try:
        vocab.save(tmp / "vocab.json")
        splits_meta = {}
        for name, q in questions.items():
            filled = reader.fill_types(q, family_types)
            info = _write_split(data, tmp / name, q, vocab, image_size, backend, device, skip_bad, workers)
            splits_meta[name] = {**info, "source": sources[name], "types_from_family": filled}
        meta = {"format": FORMAT, "version": VERSION, "source": str(data), "cache": str(target),
                "image_size": image_size, "vocab_fingerprint": vocab.fingerprint(), "vocab_source": vocab_source,
                "decoder": backend, "built_s": round(time.time() - t0, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "splits": splits_meta}
        write_json(tmp / META, meta)  # last: only now is the directory a cache
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_split(data: Path, out: Path, q: reader.SplitQuestions, vocab: Vocab, size: int, backend: str,
                 device: str, skip_bad: bool, workers: int) -> dict:
    out.mkdir()
    rows: dict[str, int] = {}
    image_index = np.array([rows.setdefault(f, len(rows)) for f in q.image_files], dtype=np.int64)
    files = list(rows)
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(files), size, size, 3))
    bad = decode_images([data / "images" / f for f in files], size, images, backend=backend, device=device,
                        workers=workers, skip_bad=skip_bad, desc=f"{q.name} images")
    images.flush()
    del images
    keep = np.ones(len(q), dtype=bool)
    if bad:  # questions about a skipped image are dropped; its zero row stays unused
        keep &= ~np.isin(image_index, [i for i, _ in bad])
    if not keep.any():
        raise UserError(f"{q.file}: no usable question left in split {q.name!r}")
    encoded = [vocab.encode_question(t) for t, k in zip(q.text, keep) if k]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    tokens = np.zeros((len(encoded), int(lengths.max())), dtype=np.int64)
    for i, e in enumerate(encoded):
        tokens[i, :len(e)] = e
    answers = np.array([-1 if a is None else vocab.answer_to_idx(a) for a in q.answers], dtype=np.int64)[keep]
    unk_answer = vocab.answer_token_to_idx.get(UNK, -1)
    arrays = {"questions": tokens, "lengths": lengths, "answers": answers, "image_index": image_index[keep],
              "types": np.array(q.types, dtype=np.int64)[keep], "families": np.array(q.families, dtype=np.int64)[keep]}
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    write_json(out / "images.json", files)
    return {"questions": len(encoded), "images": len(files), "max_length": int(lengths.max()),
            "skipped_records": len(q.skipped), "skipped_images": len(bad),
            "skipped_questions": int((~keep).sum()),
            "unknown_words": int((tokens == SPECIAL_TOKENS[UNK]).sum()),
            "unknown_answers": int(((answers == unk_answer) & (answers >= 0)).sum()),
            "skipped": (q.skipped + [f"{data / 'images' / files[i]}: {r}" for i, r in bad])[:100]}


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    # A directory cannot replace a non-empty one in one rename: move the old one aside first.
    # Between the two renames there is no cache at `target`, never a half one.
    old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ CLI

def run(cfg) -> int:
    """`fastfilm preprocess` (cfg: PreprocessConfig)."""
    t0 = time.time()
    splits = tuple(s.strip() for s in cfg.splits.split(",") if s.strip())
    if not splits:
        raise UserError("--splits: give at least one split name")
    path = prepare(cfg.data, cfg.image_size, cache=cfg.cache or None, splits=splits, vocab=cfg.vocab or None,
                   decoder=cfg.decoder, device=cfg.device, skip_bad=cfg.skip_bad, workers=cfg.workers,
                   force=cfg.force)
    meta = read_meta(path)
    print(f"cache {path} ({meta['image_size']}px, decoder {meta['decoder']}, built in {meta['built_s']} s, "
          f"ready in {time.time() - t0:.1f} s)")
    for name, info in meta["splits"].items():
        skipped = info["skipped_records"] + info["skipped_images"]
        print(f"  {name}: {info['questions']} questions, {info['images']} images, max length {info['max_length']}"
              + (f", skipped {info['skipped_records']} records and {info['skipped_images']} images"
                 if skipped else "")
              + (f", {info['unknown_answers']} answers not in the vocabulary" if info["unknown_answers"] else ""))
        for msg in info["skipped"][:5]:
            print(f"    skipped: {msg}")
    return 0
