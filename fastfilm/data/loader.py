"""Batches of (image, question, answer) served from a cache: no decoding, exact epochs.

An epoch visits every question of the split (or of this shard) exactly once, in an order
that depends only on (seed, epoch); the last partial batch is kept unless `drop_last`.
On CUDA, batches are gathered into pinned memory by a background thread `prefetch`
batches ahead and copied with non_blocking=True.

resident=True puts the image array and the question arrays on the device once (on the CPU:
reads them into RAM) and builds batches there. Whatever depends on values (the epoch's
order, each batch's question width, with grouping its distinct images) is worked out on the
host from host copies and uploaded once per epoch; a batch is then device slices and
gathers, so the host never waits for the device within an epoch (tests/test_resident.py
runs it on meta tensors, where a read of a device value raises). `resident_decision`
decides from free device memory whether a split fits (`--resident auto|on|off`).

group=k > 1 keeps up to k questions about the same image together: an epoch shuffles each
image's questions, cuts them into chunks of at most k, shuffles the chunks and fills batches
with them. A batch then carries each distinct image once (`images` [M, ...], M <= B) and
`image_index` maps questions to those rows, so the model's stem runs once per image
instead of once per question (its share of a step's compute: docs/data.md).

A split of a features cache (data/features.py) is served the same way, with each image's
precomputed feature [C, H, W] (float16/float32, as stored) in place of its pixels: rows are
read from the feature file per batch, never the whole file (unless resident: then once).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from fastfilm.data.cache import SplitData
from fastfilm.data.features import FeatureView
from fastfilm.errors import UserError

# --resident auto keeps a split on the GPU when it takes at most this share of the free
# device memory: the rest is for the model, its activations and the CUDA graphs' pools.
RESIDENT_SHARE = 0.5


@dataclass
class Batch:
    """B questions about M <= B images. `images` is a channels_last view of NHWC uint8 (no copy,
    no normalisation), or for a features split the features as stored; without grouping M = B
    and image_index is arange(B)."""
    images: torch.Tensor     # [M, 3, S, S] uint8, channels_last; features: [M, C, H, W] float16/float32
    questions: torch.Tensor  # [B, L'] int64, 0-padded
    lengths: torch.Tensor    # [B] int64, tokens including <START> and <END>
    answers: torch.Tensor    # [B] int64, -1: no answer (test split)
    types: torch.Tensor      # [B] int64, index into QUESTION_TYPES, -1 unknown
    families: torch.Tensor   # [B] int64, question_family_index, -1 unknown
    index: torch.Tensor      # [B] int64, question rows of the split
    image_index: torch.Tensor  # [B] int64, row of `images` each question is about

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        # Tensor.to keeps the channels_last strides of `images` (preserve_format).
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return len(self.index)


# Loader attributes holding one value per question ([Q] or [Q, L] CPU tensors).
_PER_QUESTION = ("questions", "lengths", "answers", "types", "families")


def resident_bytes(split: SplitData, limit: int = 0) -> int:
    """Bytes a resident Loader of `split` puts on its device: images and per-question arrays."""
    n = min(limit, len(split)) if limit > 0 else len(split)
    per_question = sum(getattr(split, name)[:1].nbytes for name in _PER_QUESTION)
    images = int(np.prod(split.images.shape)) * np.dtype(split.images.dtype).itemsize  # a FeatureView has no nbytes
    return images + n * per_question


def resident_decision(mode: str, device: torch.device, nbytes: int, what: str) -> tuple[bool, str]:
    """--resident auto|on|off for `nbytes` of data (`what`, for the message) on `device`.

    Returns (resident, one line saying why, or "" when there is nothing to say). auto: on
    CUDA, resident when nbytes <= RESIDENT_SHARE x the free device memory (mem_get_info, so
    after the model and any resident split already there); elsewhere not (the page cache
    serves a memory-mapped split as well as a copy in RAM would). on: resident, or a
    UserError when the data exceeds the free memory outright; on the CPU it reads the split
    into RAM. off: never.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"resident mode must be auto, on or off, got {mode!r}")
    if mode == "off" or (device.type != "cuda" and mode == "auto"):
        return False, ""
    if device.type != "cuda":
        return True, f"--resident on: {what} ({nbytes / 2**30:.2f} GiB) read into RAM"
    free, _total = torch.cuda.mem_get_info(device)
    sizes = f"{what}: {nbytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free on {device}"
    if mode == "on":
        if nbytes > free:
            raise UserError(f"--resident on: {sizes}; it does not fit (--resident auto decides from free memory)")
        return True, f"resident on the GPU ({sizes}); batches are built on the device"
    if nbytes <= RESIDENT_SHARE * free:
        return True, f"resident on the GPU ({sizes}); batches are built on the device"
    return False, (f"not resident ({sizes}: more than {RESIDENT_SHARE:.0%} of it); batches are gathered on the host "
                   "into pinned memory")


class Loader:
    """Shuffled batches of one cached split.

    shard=(rank, world): the epoch's order is dealt round-robin to `world` ranks, so ranks get
    disjoint questions that together cover the split. Without drop_last, a rank with one
    question fewer than the others repeats its own first question of the epoch so that every
    rank takes the same number of steps (at most one repeat per rank and epoch, none when
    world=1 or world divides the question count). With drop_last each rank keeps the same
    floor(Q / world) questions and drops its last partial batch.

    group: questions about one image kept together (see the module docstring); with shards,
    each rank takes a contiguous share of the epoch's order instead of every world-th question,
    and shares that come up short are filled with the epoch's first questions.
    image_multiple: with group > 1, pad `images` to a multiple of this many rows by repeating
    the last one (static shapes for torch.compile); 0: no padding.

    buckets: lengths the question tensor may have (static shapes for torch.compile); a batch
    is padded to the smallest bucket >= its longest question. The split's longest question
    length is added as a last bucket if every bucket is shorter. None (eager): each batch is
    cut to its own longest question, so one very long question slows only its own batch.
    """

    def __init__(self, split: SplitData, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 device: torch.device | str = "cpu", buckets: tuple[int, ...] | None = None, resident: bool = False,
                 shard: tuple[int, int] = (0, 1), prefetch: int = 2, limit: int = 0, group: int = 1,
                 image_multiple: int = 0):
        rank, world = shard
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group < 1:
            raise ValueError(f"group must be >= 1 (questions per image kept together), got {group}")
        self.group, self.image_multiple = group, image_multiple
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world, self.prefetch = drop_last, rank, world, prefetch
        self.device = torch.device(device)
        self.num_questions = min(limit, len(split)) if limit > 0 else len(split)
        max_len = split.questions.shape[1]
        self.buckets = None
        if buckets:
            b = sorted(set(int(x) for x in buckets))
            self.buckets = np.array(b if b[-1] >= max_len else [*b, max_len], dtype=np.int64)
        n = self.num_questions
        self.per_rank = n // world if drop_last else -(-n // world)
        if n < world or (drop_last and self.per_rank < batch_size):
            raise ValueError(f"{split.name}: {n} questions are too few for batch {batch_size} over {world} ranks"
                             + (" with drop_last" if drop_last else ""))
        # Per-question arrays are read into memory once (np.array copies the read-only memmap);
        # only the images stay memory-mapped.
        self.questions = torch.from_numpy(np.array(split.questions[:n]))
        self.lengths = torch.from_numpy(np.array(split.lengths[:n]))
        self.answers = torch.from_numpy(np.array(split.answers[:n]))
        self.types = torch.from_numpy(np.array(split.types[:n]))
        self.families = torch.from_numpy(np.array(split.families[:n]))
        self.image_index = np.array(split.image_index[:n])
        self.cuda = self.device.type == "cuda"
        self.features = split.input == "features"
        self.images = split.images
        self.resident = resident
        if resident:
            # [I, S, S, 3] uint8 (features: [I, C, H, W] as stored) on the device, read once.
            self.images_resident = self._upload(split.images)
            # Per-question arrays on the device; the host copies above stay for what the host decides.
            self.on_device = {name: getattr(self, name).to(self.device) for name in _PER_QUESTION}

    def _upload(self, images: np.ndarray | FeatureView, chunk: int = 1024) -> torch.Tensor:
        """The whole [I, ...] image (or feature) array on the device, copied in chunks (no second host copy)."""
        dtype = torch.from_numpy(np.zeros(0, images.dtype)).dtype
        out = torch.empty(images.shape, dtype=dtype, device=self.device)
        for i in range(0, len(images), chunk):
            rows = np.arange(i, min(i + chunk, len(images)))
            block = images.take(rows) if isinstance(images, FeatureView) else np.array(images[i:i + chunk])
            out[i:i + chunk] = torch.from_numpy(block)
        return out

    def __len__(self) -> int:
        """Batches per epoch for this shard."""
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's question rows for `epoch`, in serving order ([per_rank] int64)."""
        n = self.num_questions
        if self.shuffle:
            # A Generator seeded from (seed, epoch): no global RNG state, same order on every rank.
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n) if self.group == 1 else self._grouped(rng)
        else:
            perm = np.arange(n)
        if self.group == 1:
            mine = perm[self.rank::self.world]
        else:  # a contiguous share per rank, so that chunks stay together; the last ranks
            # make up a short share with the epoch's first questions
            mine = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            if len(mine) < self.per_rank:
                mine = np.concatenate([mine, np.resize(perm, self.per_rank - len(mine))])
        if len(mine) < self.per_rank:  # only without drop_last: repeat own first question
            mine = np.concatenate([mine, mine[: self.per_rank - len(mine)]])
        mine = mine[: self.per_rank]
        if self.drop_last:
            mine = mine[: len(self) * self.batch_size]
        return mine.astype(np.int64)

    def _grouped(self, rng: np.random.Generator) -> np.ndarray:
        """A permutation of the questions in which each image's questions come in shuffled
        chunks of at most `group` consecutive questions ([num_questions] int64)."""
        shuffled = rng.permutation(self.num_questions)
        # Stable sort by image: each image's questions stay in their shuffled order.
        by_image = shuffled[np.argsort(self.image_index[shuffled], kind="stable")]
        images = self.image_index[by_image]
        starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
        # Position of each question among its image's questions; a chunk starts at a new image
        # or every `group` questions into one.
        nth = np.arange(len(by_image)) - np.repeat(starts, np.diff(np.r_[starts, len(by_image)]))
        chunk = np.cumsum(np.r_[True, (images[1:] != images[:-1]) | (nth[1:] % self.group == 0)]) - 1
        chunk_order = rng.permutation(chunk[-1] + 1) if len(chunk) else chunk
        # Questions sorted by the chunk's new position, keeping their order within a chunk.
        return by_image[np.argsort(np.argsort(chunk_order)[chunk], kind="stable")]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of `epoch`, from batch `start_batch` on (exact resume after a stop)."""
        order = self.order(epoch)
        rows = [order[i:i + self.batch_size] for i in range(start_batch * self.batch_size, len(order), self.batch_size)]
        if self.resident:
            yield from self._resident(rows)
            return
        if not self.cuda or self.prefetch <= 0:
            for r in rows:
                yield self._gather(r).to(self.device)
            return
        yield from self._prefetched(rows, pin=True)

    def _width(self, rows: np.ndarray) -> int:
        """The question width of the batch of question rows [B]: its longest question, or the
        smallest bucket that holds it. From the host copy of the lengths."""
        width = int(self.lengths.numpy()[rows].max())
        if self.buckets is not None:
            width = int(self.buckets[np.searchsorted(self.buckets, width)])
        return width

    def _image_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(image rows [M] of the batch of question rows [B], each question's position among
        them [B] or None when M = B in question order). Grouped: each distinct image once,
        padded to a multiple of image_multiple by repeating the last."""
        img_rows = self.image_index[rows]
        if self.group == 1:
            return img_rows, None
        img_rows, inverse = np.unique(img_rows, return_inverse=True)
        if self.image_multiple > 0 and len(img_rows) % self.image_multiple:
            pad = self.image_multiple - len(img_rows) % self.image_multiple
            img_rows = np.concatenate([img_rows, np.repeat(img_rows[-1:], pad)])
        return img_rows, inverse.reshape(-1).astype(np.int64)

    def _gather(self, rows: np.ndarray, pin: bool = False) -> Batch:
        """Host batch for question rows [B] (into pinned memory when `pin`)."""
        idx = torch.from_numpy(rows)
        width = self._width(rows)
        q = self.questions[idx, : min(width, self.questions.shape[1])]
        if q.shape[1] < width:  # a bucket longer than every question of the split
            q = torch.nn.functional.pad(q, (0, width - q.shape[1]))
        img_rows, inverse = self._image_rows(rows)
        image_index = torch.arange(len(rows)) if inverse is None else torch.from_numpy(inverse)
        if self.features:
            images = self._gather_features(img_rows, pin)
        else:
            s = self.images.shape[1]
            buf = torch.empty((len(img_rows), s, s, 3), dtype=torch.uint8, pin_memory=pin)
            np.take(self.images, img_rows, axis=0, out=buf.numpy())
            images = buf.permute(0, 3, 1, 2)
        small = [q, self.lengths[idx], self.answers[idx], self.types[idx], self.families[idx], idx, image_index]
        if pin:  # images were gathered straight into pinned memory
            small = [t.pin_memory() for t in small]
        return Batch(images, *small)

    def _resident(self, rows: list[np.ndarray]) -> Iterator[Batch]:
        """Batches built on the device from the resident arrays (see the module docstring).

        What depends on values is decided here on the host, for the whole epoch: widths [K],
        and one upload of the question rows, image rows and image_index of every batch,
        concatenated. Each batch is then slices of that upload and gathers: no host sync.
        """
        if not rows:
            return
        widths = [self._width(r) for r in rows]
        parts = [self._image_rows(r) for r in rows]
        grouped = self.group > 1
        host = np.concatenate([*rows, *(p[0] for p in parts), *((p[1] for p in parts) if grouped else ())])
        uploaded = torch.from_numpy(host.astype(np.int64))
        uploaded = uploaded.pin_memory().to(self.device, non_blocking=True) if self.cuda else uploaded.to(self.device)
        counts = [len(r) for r in rows] + [len(p[0]) for p in parts] + ([len(r) for r in rows] if grouped else [])
        pieces = uploaded.split(counts)
        k = len(rows)
        flat = self.images_resident.view(len(self.images_resident), -1)  # a 4-D uint8 gather is many times slower
        s = self.images.shape[1]
        d = self.on_device
        for i, width in enumerate(widths):
            idx, img_rows = pieces[i], pieces[k + i]
            q = d["questions"][idx, : min(width, self.questions.shape[1])]
            if q.shape[1] < width:  # a bucket longer than every question of the split
                q = torch.nn.functional.pad(q, (0, width - q.shape[1]))
            if self.features:  # [M, C, H, W] as stored
                images = self.images_resident.index_select(0, img_rows)
            else:
                images = flat.index_select(0, img_rows).view(len(img_rows), s, s, 3).permute(0, 3, 1, 2)
            image_index = pieces[2 * k + i] if grouped else torch.arange(len(idx), device=self.device)
            yield Batch(images, q, d["lengths"][idx], d["answers"][idx], d["types"][idx], d["families"][idx], idx,
                        image_index)

    def _gather_features(self, img_rows: np.ndarray, pin: bool) -> torch.Tensor:
        """[M, C, H, W] features of image rows [M], as stored (float16/float32), on the host."""
        if isinstance(self.images, FeatureView):
            block = self.images.take(img_rows)
        else:
            block = np.take(self.images, img_rows, axis=0)
        out = torch.from_numpy(block)
        return out.pin_memory() if pin else out

    def _prefetched(self, rows: list[np.ndarray], pin: bool) -> Iterator[Batch]:
        """Batches gathered by a background thread, `prefetch` ahead of the consumer."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def work() -> None:
            try:
                for r in rows:
                    if stop.is_set():
                        return
                    q.put(self._gather(r, pin=pin))
            except BaseException as e:  # re-raised in the consumer
                q.put(e)
                return
            q.put(None)

        thread = threading.Thread(target=work, daemon=True, name="fastfilm-prefetch")
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item.to(self.device, non_blocking=True)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.01)
