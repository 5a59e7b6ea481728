"""`fastfilm preprocess`: decode every image once into a memory-mapped cache, tokenize questions.

Layout of a cache directory:
    meta.json             written last; without a valid one the directory is not a cache
    vocab.json
    <split>/images.npy    [I, S, S, 3] uint8, one row per distinct image of the split
    <split>/{questions,lengths,answers,image_index,types,families}.npy
    <split>/images.json   the image file of each row, relative to DATA/images
    <split>/image_stats.npy  [I, 2] int64 (size, mtime_ns) of each image file when it was
                          read, (-1, -1) for one that did not exist (skipped with --skip-bad)
A features cache (`prepare(..., features=True)`, DATA/.fastfilm_cache/features, for models
with input="features") holds no pixels: instead of images.npy and image_stats.npy it has
    <split>/feature_rows.npy  [I] int64, the row of each image in its feature file
and meta.json names that file with its size and mtime (data/features.py: where such files
live and how rows match images). The features are read in place, never copied.
A cache is built in a sibling temp directory and renamed into place when complete, so a
killed or failed build never leaves a directory with a meta.json that is not whole.

A cache is stale when a source it was built from now exists with other contents: a question
file or an image whose size or mtime changed, or an image skipped as missing that appeared;
a features cache when its feature file changed or is gone (it holds no copy of it).
Sources deleted since the build do not make it stale (the cache holds their pixels; raw
images may be removed to save space). Raw DATA gets a stale cache rebuilt; a built cache
given as DATA is refused when stale, since its source may be someone else's to preprocess.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastfilm.data import features as feats
from fastfilm.data import reader
from fastfilm.data.decode import QUIET_BELOW, choose_decoder, decode_images, describe_decoding
from fastfilm.data.vocab import SPECIAL_TOKENS, UNK, Vocab, tokenize
from fastfilm.atomic import current_umask, write_json
from fastfilm.errors import UserError

FORMAT = "fastfilm-cache"
VERSION = 1
META = "meta.json"
_ARRAYS = ("questions", "lengths", "answers", "image_index", "types", "families")
_STATS = "image_stats.npy"
# Questions longer than this many times the split's 99th-percentile length are reported at
# preprocessing: each costs its batch that many GRU steps (the eager path pads a batch only
# to its own longest question, but a compiled model pads to a length bucket).
LONG_QUESTION_FACTOR = 4


@dataclass
class SplitData:
    """One cached split (Q questions over I images of side S), arrays memory-mapped read-only."""
    images: np.ndarray | feats.FeatureView  # [I, S, S, 3] uint8, or [I, C, H, W] features (features cache)
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

    @property
    def input(self) -> str:
        """What `images` holds: "pixels" or "features" (ModelConfig.input)."""
        return "features" if isinstance(self.images, feats.FeatureView) else "pixels"


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
    features = _served(meta) == FEATURES
    image_array = "feature_rows" if features else "images"
    try:
        arrays = {name: np.load(d / f"{name}.npy", mmap_mode="r") for name in (image_array, *_ARRAYS)}
        files = json.loads((d / "images.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{d}: damaged cache split ({e}); delete the cache and preprocess again") from None
    size, q, n_img = meta["image_size"], info["questions"], info["images"]
    expected = {image_array: (n_img,) if features else (n_img, size, size, 3), "questions": (q, info["max_length"]),
                **{name: (q,) for name in _ARRAYS if name != "questions"}}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise UserError(f"{d / name}.npy: shape {arrays[name].shape}, meta.json says {shape}; "
                            "delete the cache and preprocess again")
    if features:
        arrays["images"] = feats.open_view(Path(meta["source"]), info["features"], arrays.pop("feature_rows"))
    return SplitData(**arrays, name=split, image_files=files)


# ------------------------------------------------------------------ where a cache lives

# What a features cache serves instead of an image size (its directory name too).
FEATURES = "features"


def _served(meta: dict) -> int | str:
    """What a cache serves: its image size, or FEATURES."""
    return FEATURES if meta.get("input") == FEATURES else meta["image_size"]


def _describe(served: int | str) -> str:
    return "precomputed features" if served == FEATURES else f"{served}px images"


def default_cache_dir(data: str | Path, image_size: int | str) -> Path:
    """DATA/.fastfilm_cache/<size> (or .../features for a features cache)."""
    return Path(data) / ".fastfilm_cache" / str(image_size)


def user_cache_dir(data: str | Path, image_size: int | str) -> Path:
    """The per-user cache of DATA, for a dataset directory this user cannot write:
    $XDG_CACHE_HOME/fastfilm/<DATA's name>-<hash of its absolute path>/<size> (~/.cache by default)."""
    data = Path(data).resolve()
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # XDG: a relative value is ignored
    return root / "fastfilm" / f"{data.name}-{hashlib.sha256(str(data).encode()).hexdigest()[:16]}" / str(image_size)


def _writable(directory: Path) -> bool:
    """Whether a cache can be built in `directory` (created with its parents if need be)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def _refuse_file(target: Path) -> None:
    """--cache DIR: refused before any work when it, or a directory it would go in, is a file."""
    for p in (target, *target.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"--cache {target}: {p} is a file, not a directory")
            return


# ------------------------------------------------------------------ is a cache stale?

def _file_stat(data: Path, path: Path) -> dict:
    st = path.stat()
    return {"file": str(path.relative_to(data)), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def image_stats(data: Path, files: list[str]) -> np.ndarray:
    """[I, 2] int64 (size, mtime_ns) of DATA/images/<file> for each file, (-1, -1) where none can be stat'ed."""
    out = np.full((len(files), 2), -1, dtype=np.int64)
    images = str(data / "images")  # joined as strings: a Path per file costs more than its stat
    for i, f in enumerate(files):
        try:
            st = os.stat(f"{images}/{f}")
        except OSError:
            continue
        out[i] = st.st_size, st.st_mtime_ns
    return out


def _changed_images(cache_dir: Path, data: Path, splits, unrecorded: str | None) -> str | None:
    """The first image of `splits` that exists now with another size or mtime than at the
    build (or appeared), else None; `unrecorded` is the answer for a split with no record."""
    for split in splits:
        try:
            recorded = np.load(cache_dir / split / _STATS)
            files = json.loads((cache_dir / split / "images.json").read_text())
        except (OSError, ValueError):
            if unrecorded:
                return unrecorded.format(split=split)
            continue
        if recorded.shape != (len(files), 2):
            return f"{cache_dir / split / _STATS} does not match images.json"
        now = image_stats(data, files)
        changed = np.flatnonzero((now[:, 0] >= 0) & (now != recorded).any(axis=1))
        if len(changed):
            i = int(changed[0])
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            return (f"image {data / 'images' / files[i]} {'appeared' if recorded[i, 0] < 0 else 'changed'} "
                    f"since it was built{more}")
    return None


def _changed_questions(meta: dict, splits) -> str | None:
    """A question file of `splits` that exists now with another size or mtime than at the build."""
    for split in splits:
        src = meta["splits"][split]["source"]
        path = Path(meta["source"]) / src["file"]
        try:
            st = path.stat()
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) != (src["size"], src["mtime_ns"]):
            return f"{path} changed since it was built"
    return None


def _mismatch(meta: dict, cache_dir: Path, data: Path, image_size: int, sources: dict, vocab: Vocab | None,
              explicit: bool) -> str | None:
    """Why an existing cache does not serve this request (None: it does). image_size: the
    side wanted, or FEATURES."""
    if explicit and meta["source"] != str(data):
        raise UserError(f"cache {meta.get('cache', '')} was built from {meta['source']}, not {data}; "
                        "pass another --cache or delete that one")
    if _served(meta) != image_size:
        return f"it serves {_describe(_served(meta))}, {_describe(image_size)} wanted"
    for split, src in sources.items():
        have = meta["splits"].get(split, {}).get("source")
        if have != src:
            return f"split {split!r} is {'new' if have is None else 'changed on disk'}"
    if vocab is not None and vocab.fingerprint() != meta["vocab_fingerprint"]:
        return "a different vocabulary was given"
    if image_size == FEATURES:
        return _changed_features(meta, data, sources)
    # Last, as the dearest check: a stat per image file.
    return _changed_images(cache_dir, data, sources,
                           unrecorded="split {split!r} has no record of its image files (an older fastfilm built it)")


def _check_built(cache_dir: Path, meta: dict, image_size: int, vocab: Vocab | None, vocab_file, splits) -> None:
    """A built cache given as DATA: refused when it does not serve the request or is stale."""
    source = meta["source"]
    how = "--input features" if image_size == FEATURES else f"--image-size {image_size}"
    if _served(meta) != image_size:
        wanted = "precomputed features" if image_size == FEATURES else f"{image_size}px"
        raise UserError(f"{cache_dir}: cache of {_describe(_served(meta))}, {wanted} wanted; run "
                        f"`fastfilm preprocess {source} {how}`")
    if vocab is not None and vocab.fingerprint() != meta["vocab_fingerprint"]:
        raise UserError(f"{cache_dir}: cache built with another vocabulary than {vocab_file}; preprocess "
                        f"{source} with --vocab {vocab_file}")
    splits = [s for s in splits if s in meta["splits"]]
    # Caches from before image stats were recorded cannot be checked: they are served as they are.
    why = _changed_questions(meta, splits) or (
        _changed_features(meta, Path(source), splits) if image_size == FEATURES
        else _changed_images(cache_dir, Path(source), splits, unrecorded=None))
    if why:
        raise UserError(f"{cache_dir}: stale cache: {why}; rebuild it with `fastfilm preprocess {source} --cache "
                        f"{cache_dir} {how}{' --skip-bad' if meta.get('skip_bad') else ''}`")


def _changed_features(meta: dict, data: Path, splits) -> str | None:
    """Why the feature file of one of `splits` is not the one the cache was built with, else None."""
    for split in splits:
        record = meta["splits"].get(split, {}).get("features")
        why = feats.changed(data, record) if record else None
        if why:
            return why
    return None


# ------------------------------------------------------------------ building

def prepare(data: str | Path, image_size: int, *, cache: str | Path | None = None,
            splits: tuple[str, ...] | list[str] = ("train", "val"), vocab: str | Path | None = None,
            decoder: str = "auto", device: str = "cpu", skip_bad: bool = False, workers: int = 0,
            force: bool = False, features: bool = False) -> Path:
    """Cache directory for DATA (a raw CLEVR-layout dir or a built cache), built if needed.

    Raw DATA: the cache lives in DATA/.fastfilm_cache/<size> unless `cache` is given, or in
    the per-user cache directory when DATA cannot be written (said in one line). It is
    reused when its image size, vocabulary and sources match (question files and images by
    size and mtime, see the module docstring) and rebuilt otherwise, keeping the vocabulary
    and --skip-bad it was built with unless `force`. An explicit `cache` built from another
    DATA is refused. Splits not present in DATA are left out. A built cache is returned
    after checking its size, vocabulary and sources.

    features=True: a features cache instead (module docstring), in DATA/.fastfilm_cache/features;
    image_size is then not used: no image is decoded.
    """
    if features:
        image_size = FEATURES
    data = Path(data).resolve()
    if not data.is_dir():
        raise UserError(f"{data}: no such directory")
    target = Path(cache).resolve() if cache else None
    if target is not None:
        _refuse_file(target)
    given_vocab = Vocab.load(vocab) if vocab else None
    meta = read_meta(data)
    if meta is not None:
        _check_built(data, meta, image_size, given_vocab, vocab, splits)
        return data
    present = [s for s in dict.fromkeys(splits) if reader.question_file(data, s) is not None]
    if not present:
        raise UserError(f"{data}: none of the splits {', '.join(splits)} has a question file "
                        f"(found splits: {', '.join(reader.list_splits(data)) or 'none'})")
    sources = {s: _file_stat(data, reader.question_file(data, s)) for s in present}
    explicit = target is not None
    target = target or default_cache_dir(data, image_size)
    if not _writable(target.parent):
        # A cache someone else built there still serves when it is complete and fresh.
        old = read_meta(target)
        if old is not None and not force and _mismatch(old, target, data, image_size, sources, given_vocab,
                                                       explicit) is None:
            return target
        if explicit:
            raise UserError(f"--cache {target}: cannot write in {target.parent}")
        fallback = user_cache_dir(data, image_size)
        if not _writable(fallback.parent):
            raise UserError(f"{data}: not writable, nor is {fallback.parent}; give a cache directory with "
                            f"`fastfilm preprocess {data} --cache DIR` and train on DIR")
        print(f"fastfilm: {target.parent} is not writable; using the per-user cache {fallback} "
              f"(`fastfilm preprocess {data} --cache DIR` puts it elsewhere)", file=sys.stderr)
        target = fallback
    with _lock(target):
        old = read_meta(target)
        if old is not None and not force:
            reason = _mismatch(old, target, data, image_size, sources, given_vocab, explicit)
            if reason is None:
                return target
            kept = []
            if given_vocab is None and old.get("vocab_source") == "given":
                given_vocab, kept = load_vocab(target), ["its given vocabulary"]
            if old.get("skip_bad") and not skip_bad:
                skip_bad, kept = True, [*kept, "--skip-bad"]
            print(f"fastfilm: rebuilding cache {target}: {reason}"
                  + (f" (keeping {' and '.join(kept)})" if kept else ""), file=sys.stderr)
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


def _needs_answers(split: str) -> bool:
    """Training splits need an answer for every question; val and test may have none (CLEVR's
    test split has no answers, and a val split without them is still evaluated on the rest)."""
    return split.startswith("train") or bool(reader.split_pattern("train").search(split))


def _build(data: Path, target: Path, image_size: int, present: list[str], sources: dict,
           vocab: Vocab | None, decoder: str, device: str, skip_bad: bool, workers: int) -> None:
    t0 = time.time()
    choice = None if image_size == FEATURES else choose_decoder(decoder, image_size, device=device)
    questions = {s: reader.read_split(data, s, skip_bad=skip_bad, require_answers=_needs_answers(s))
                 for s in present}
    if choice and decoder == "auto" and sum(len(set(q.image_files)) for q in questions.values()) >= QUIET_BELOW:
        print(f"fastfilm: {choice.why}", file=sys.stderr)
    backend = choice.backend if choice else None
    decoding = describe_decoding(backend, device, workers) if backend else None  # a features cache decodes none
    if backend and backend != "pillow" and device != "cpu":
        # Split across devices (JPEG on the GPU, PNG on the CPU): said when it starts. Kept in
        # meta.json and `preprocess`'s summary in every case, never as a line that would
        # precede a user error's one line.
        print(f"fastfilm: building cache {target}: {decoding}", file=sys.stderr)
    vocab_source = "given"
    if vocab is None:
        train = _train_split(data, present)
        if train not in questions:
            questions_train = reader.read_split(data, train, skip_bad=skip_bad, require_answers=True)
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
        features = image_size == FEATURES
        meta = {"format": FORMAT, "version": VERSION, "source": str(data), "cache": str(target),
                "input": FEATURES if features else "pixels", "image_size": None if features else image_size,
                "vocab_fingerprint": vocab.fingerprint(), "vocab_source": vocab_source,
                "skip_bad": skip_bad, "decoder": backend, "decoder_choice": choice.why if choice else None,
                "decoding": decoding, "built_s": round(time.time() - t0, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "splits": splits_meta}
        write_json(tmp / META, meta)  # last: only now is the directory a cache
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_split(data: Path, out: Path, q: reader.SplitQuestions, vocab: Vocab, size: int | str,
                 backend: str | None, device: str, skip_bad: bool, workers: int) -> dict:
    out.mkdir()
    rows: dict[str, int] = {}
    image_index = np.array([rows.setdefault(f, len(rows)) for f in q.image_files], dtype=np.int64)
    files = list(rows)
    extra: dict = {}
    if size == FEATURES:
        rows, bad, extra["features"] = feats.match_rows(data, q.name, q.file, files, skip_bad)
        np.save(out / "feature_rows.npy", rows)
    else:
        # Stat'ed before decoding: an image rewritten while the build runs is seen as changed.
        np.save(out / _STATS, image_stats(data, files))
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
    long = _warn_long_questions(q, lengths, np.array(q.records, dtype=np.int64)[keep])
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
            "long_questions": long,
            "skipped": (q.skipped + [f"{data / 'images' / files[i]}: {r}" for i, r in bad])[:100], **extra}


def _warn_long_questions(q: reader.SplitQuestions, lengths: np.ndarray, records: np.ndarray) -> int:
    """Say in one line how many questions are over LONG_QUESTION_FACTOR x the 99th-percentile
    length (lengths, records: [Q] int64, tokens and record index in q.file); returns the count."""
    # "lower": an actual length, so that in a small split one outlier does not raise its own bar.
    p99 = int(np.percentile(lengths, 99, method="lower"))
    long = np.flatnonzero(lengths > LONG_QUESTION_FACTOR * p99)
    if len(long):
        worst = long[np.argmax(lengths[long])]
        print(f"fastfilm: warning: {q.file}: {len(long)} question{'s' if len(long) > 1 else ''} "
              f"over {LONG_QUESTION_FACTOR}x the 99th-percentile length of {p99} tokens; the longest, "
              f"record {records[worst]}, has {lengths[worst]} tokens (each slows the batch it is in)",
              file=sys.stderr)
    return len(long)


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
                   force=cfg.force, features=cfg.input == FEATURES)
    meta = read_meta(path)
    served = (f"{meta['image_size']}px, {meta.get('decoding') or 'decoder ' + meta['decoder']}"
              if _served(meta) != FEATURES
              else "features read in place from " + ", ".join(sorted({i["features"]["file"]
                                                                     for i in meta["splits"].values()})))
    print(f"cache {path} ({served}, built in {meta['built_s']} s, ready in {time.time() - t0:.1f} s)")
    if meta.get("decoder_choice"):
        print(f"  {meta['decoder_choice']}")
    for name, info in meta["splits"].items():
        skipped = info["skipped_records"] + info["skipped_images"]
        print(f"  {name}: {info['questions']} questions, {info['images']} images, max length {info['max_length']}"
              + (f", skipped {info['skipped_records']} records and {info['skipped_images']} images"
                 if skipped else "")
              + (f", {info['unknown_answers']} answers not in the vocabulary" if info["unknown_answers"] else ""))
        for msg in info["skipped"][:5]:
            print(f"    skipped: {msg}")
    return 0
