"""Batches of (image, question, answer) served from a cache: no decoding, exact epochs.

An epoch visits every question of the split (or of this shard) exactly once, in an order
that depends only on (seed, epoch); the last partial batch is kept unless `drop_last`.
On CUDA, batches are gathered into pinned memory by a background thread `prefetch`
batches ahead and copied with non_blocking=True; `resident=True` puts the whole image
array on the device once, so a step copies only question rows and indices (on the CPU,
resident reads the memory-mapped images into RAM once).

group=k > 1 keeps up to k questions about the same image together: an epoch shuffles each
image's questions, cuts them into chunks of at most k, shuffles the chunks and fills batches
with them. A batch then carries each distinct image once (`images` [M, ...], M <= B) and
`image_index` maps questions to those rows, so the model's stem runs once per image
instead of once per question (its share of a step's compute: docs/data.md).

A split of a features cache (data/features.py) is served the same way, with each image's
precomputed feature [C, H, W] (float16/float32, as stored) in place of its pixels: rows are
read from the feature file per batch, never the whole file.
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
        self.images_resident: torch.Tensor | None = None
        if resident and self.device.type == "cpu":
            self.images = np.array(split.images)  # in RAM: no page faults on the memmap (features: read once)
        elif resident:
            self.images_resident = self._upload(split.images)

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
        if not self.cuda or self.prefetch <= 0:
            for r in rows:
                yield self._gather(r).to(self.device)
            return
        yield from self._prefetched(rows, pin=True)

    def _gather(self, rows: np.ndarray, pin: bool = False) -> Batch:
        """Host batch for question rows [B]; images stay on the device when resident."""
        idx = torch.from_numpy(rows)
        lengths = self.lengths[idx]
        width = int(lengths.max())
        if self.buckets is not None:
            width = int(self.buckets[np.searchsorted(self.buckets, width)])
        q = self.questions[idx, : min(width, self.questions.shape[1])]
        if q.shape[1] < width:  # a bucket longer than every question of the split
            q = torch.nn.functional.pad(q, (0, width - q.shape[1]))
        img_rows = self.image_index[rows]
        if self.group > 1:  # each distinct image once
            img_rows, inverse = np.unique(img_rows, return_inverse=True)
            if self.image_multiple > 0 and len(img_rows) % self.image_multiple:
                pad = self.image_multiple - len(img_rows) % self.image_multiple
                img_rows = np.concatenate([img_rows, np.repeat(img_rows[-1:], pad)])
            image_index = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        else:
            image_index = torch.arange(len(rows))
        if self.features:
            images = self._gather_features(img_rows, pin)
        elif self.images_resident is not None:
            # Rows gathered as flat [I, S*S*3]: a 4-D uint8 gather is many times slower.
            s = self.images.shape[1]
            flat = self.images_resident.view(len(self.images_resident), -1)
            rows_dev = torch.from_numpy(img_rows).to(self.device)
            images = flat.index_select(0, rows_dev).view(len(img_rows), s, s, 3).permute(0, 3, 1, 2)
        else:
            s = self.images.shape[1]
            buf = torch.empty((len(img_rows), s, s, 3), dtype=torch.uint8, pin_memory=pin)
            np.take(self.images, img_rows, axis=0, out=buf.numpy())
            images = buf.permute(0, 3, 1, 2)
        small = [q, lengths, self.answers[idx], self.types[idx], self.families[idx], idx, image_index]
        if pin:  # images were gathered straight into pinned memory (or are on the device)
            small = [t.pin_memory() for t in small]
        return Batch(images, *small)

    def _gather_features(self, img_rows: np.ndarray, pin: bool) -> torch.Tensor:
        """[M, C, H, W] features of image rows [M], as stored (float16/float32)."""
        if self.images_resident is not None:
            return self.images_resident.index_select(0, torch.from_numpy(img_rows).to(self.device))
        if isinstance(self.images, FeatureView):
            block = self.images.take(img_rows)
        else:  # resident on the CPU: read into memory once
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
