"""The training loader: exact epochs, determinism, exact resume, buckets, shards, image pairing."""
import numpy as np
import pytest
import torch
from clevr_fixture import make_clevr

from fastfilm.data.cache import SplitData, load_split, prepare
from fastfilm.data.loader import Batch, Loader

S = 6


def synthetic(q: int = 103, n_images: int = 20, max_len: int = 12, seed: int = 0) -> SplitData:
    """Image row r is filled with (3r + channel) % 256, so a batch's pairing can be checked."""
    rng = np.random.default_rng(seed)
    images = np.empty((n_images, S, S, 3), np.uint8)
    for r in range(n_images):
        images[r] = (3 * r + np.arange(3)) % 256
    lengths = rng.integers(3, max_len + 1, q)
    lengths[0] = max_len
    questions = np.zeros((q, max_len), np.int64)
    for i, n in enumerate(lengths):
        questions[i, :n] = [1, *rng.integers(4, 50, n - 2), 2]
    return SplitData(images=images, questions=questions, lengths=lengths.astype(np.int64),
                     answers=rng.integers(4, 30, q), image_index=rng.integers(0, n_images, q),
                     types=rng.integers(-1, 5, q), families=rng.integers(-1, 90, q), name="synthetic")


def rows(loader: Loader, epoch: int = 0, start: int = 0) -> list[list[int]]:
    return [b.index.tolist() for b in loader.epoch(epoch, start)]


def check_batch(b: Batch, split: SplitData) -> None:
    idx = b.index.numpy()
    size = split.images.shape[1]
    assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, size, size)
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.image_index.shape == (len(idx),) and b.image_index.dtype == torch.int64
    expected = np.transpose(split.images[split.image_index[idx]], (0, 3, 1, 2))
    assert np.array_equal(b.images[b.image_index].numpy(), expected)
    width = b.questions.shape[1]
    assert width >= b.lengths.max()
    full = np.zeros((len(idx), max(width, split.questions.shape[1])), np.int64)
    full[:, : split.questions.shape[1]] = split.questions[idx]
    assert np.array_equal(b.questions.numpy(), full[:, :width])
    for name in ("lengths", "answers", "types", "families"):
        assert np.array_equal(getattr(b, name).numpy(), getattr(split, name)[idx]), name


@pytest.mark.parametrize("batch_size", [1, 10, 103, 200])
def test_exact_epoch_keeps_last_partial_batch(batch_size):
    split = synthetic()
    loader = Loader(split, batch_size, shuffle=True, seed=3)
    got = rows(loader)
    assert len(got) == len(loader) == -(-103 // batch_size)
    assert sorted(sum(got, [])) == list(range(103))  # every question exactly once
    assert all(len(r) == batch_size for r in got[:-1]) and len(got[-1]) == 103 - batch_size * (len(got) - 1)


def test_drop_last():
    loader = Loader(synthetic(), 10, shuffle=True, drop_last=True)
    got = rows(loader)
    assert len(got) == len(loader) == 10 and all(len(r) == 10 for r in got)
    assert len(set(sum(got, []))) == 100
    with pytest.raises(ValueError, match="too few"):
        Loader(synthetic(), 200, shuffle=True, drop_last=True)


def test_batches_pair_images_and_questions():
    split = synthetic()
    for b in Loader(split, 16, shuffle=True).epoch(0):
        check_batch(b, split)


def test_deterministic_from_seed_and_epoch():
    split = synthetic()
    a, b = Loader(split, 8, shuffle=True, seed=1), Loader(split, 8, shuffle=True, seed=1)
    assert rows(a, 0) == rows(b, 0) and rows(a, 5) == rows(b, 5)
    assert rows(a, 0) != rows(a, 1)
    assert rows(a, 0) != rows(Loader(split, 8, shuffle=True, seed=2), 0)
    np.random.seed(123)
    torch.manual_seed(123)  # global RNG state must not matter
    first = rows(a, 2)
    np.random.seed(7)
    torch.manual_seed(7)
    assert rows(a, 2) == first
    assert sum(rows(Loader(split, 8, shuffle=False), 0), []) == list(range(103))


@pytest.mark.parametrize("start", [0, 1, 7, 12, 13])
def test_start_batch_resumes_exactly(start):
    loader = Loader(synthetic(), 8, shuffle=True, seed=4)
    assert rows(loader, 3, start) == rows(loader, 3)[start:]


def test_buckets_pad_to_smallest_fitting_length():
    split = synthetic(max_len=12)
    loader = Loader(split, 4, shuffle=True, buckets=(4, 8, 16))
    widths = set()
    for b in loader.epoch(0):
        check_batch(b, split)
        longest = int(b.lengths.max())
        width = b.questions.shape[1]
        widths.add(width)
        assert width == min(x for x in (4, 8, 16) if x >= longest)
    assert widths <= {4, 8, 16} and 16 in widths  # row 0 has 12 tokens: padded past the split's 12
    short = Loader(split, 4, shuffle=True, buckets=(5,))  # no bucket fits 12: the split's length is added
    assert {b.questions.shape[1] for b in short.epoch(0)} <= {5, 12}


def test_unbucketed_batches_padded_to_their_own_longest_question():
    split = synthetic(max_len=6)  # and one outlier of 40 tokens, row 17
    wide = np.zeros((len(split), 40), np.int64)
    wide[:, :6] = split.questions
    wide[17] = [1, *range(4, 42), 2]
    split.questions, split.lengths[17] = wide, 40
    widths = {}
    for b in Loader(split, 8, shuffle=True).epoch(0):
        check_batch(b, split)
        assert b.questions.shape[1] == int(b.lengths.max())
        widths[17 in b.index.tolist()] = max(widths.get(17 in b.index.tolist(), 0), b.questions.shape[1])
    assert widths == {True: 40, False: 6}  # only the outlier's batch is 40 wide


@pytest.mark.parametrize("q, world, batch_size", [(103, 4, 8), (103, 2, 10), (9, 4, 2), (100, 4, 5), (9, 8, 2)])
def test_shards_disjoint_covering_equal_steps(q, world, batch_size):
    split = synthetic(q=q)
    loaders = [Loader(split, batch_size, shuffle=True, seed=9, shard=(r, world)) for r in range(world)]
    per_rank = [rows(loader, 1) for loader in loaders]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(loaders[0])
    sets = [set(sum(p, [])) for p in per_rank]
    assert set().union(*sets) == set(range(q))
    assert sum(len(s) for s in sets) == q  # pairwise disjoint
    # A rank one question short repeats one of its own questions, nothing else.
    served = [sum(p, []) for p in per_rank]
    assert all(len(r) - len(set(r)) <= 1 for r in served)
    assert all(len(r) == -(-q // world) for r in served)


def test_shards_with_drop_last():
    split = synthetic(q=103)
    loaders = [Loader(split, 5, shuffle=True, shard=(r, 4), drop_last=True) for r in range(4)]
    served = [sum(rows(loader), []) for loader in loaders]
    assert all(len(r) == 25 for r in served)  # floor(103 / 4) = 25 per rank, 5 full batches
    assert len(set().union(*map(set, served))) == 100
    with pytest.raises(ValueError, match="shard"):
        Loader(split, 5, shuffle=True, shard=(4, 4))
    with pytest.raises(ValueError, match="too few"):  # a rank would have no question at all
        Loader(synthetic(q=7), 1, shuffle=True, shard=(0, 8))


def test_limit_and_resident():
    split = synthetic()
    limited = Loader(split, 8, shuffle=True, limit=30)
    assert sorted(sum(rows(limited), [])) == list(range(30)) and len(limited) == 4
    resident = Loader(split, 8, shuffle=True, resident=True)  # the device path, run on the CPU
    plain = Loader(split, 8, shuffle=True)
    for a, b in zip(resident.epoch(2), plain.epoch(2), strict=True):
        check_batch(a, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.questions, b.questions)


def test_batch_to_keeps_channels_last():
    b = next(iter(Loader(synthetic(), 8, shuffle=False).epoch(0)))
    moved = b.to("cpu", non_blocking=True)
    assert moved.images.is_contiguous(memory_format=torch.channels_last) and len(moved) == 8


def test_from_a_real_cache(tmp_path):
    info = make_clevr(tmp_path / "clevr")
    path = prepare(info["root"], 8, splits=("train", "test"), decoder="pillow")
    train = load_split(path, "train")
    batches = list(Loader(train, 3, shuffle=True, buckets=(8, 16)).epoch(0))
    assert sorted(sum((b.index.tolist() for b in batches), [])) == list(range(len(train)))
    for b in batches:
        check_batch(b, train)
    test = next(iter(Loader(load_split(path, "test"), 8, shuffle=False).epoch(0)))
    assert (test.answers == -1).all()


def test_prefetch_thread_serves_the_same_batches():
    # The CUDA path's thread and queue, run on the CPU (pinning needs CUDA, so pin=False).
    split = synthetic()
    loader = Loader(split, 8, shuffle=True, prefetch=2)
    order = loader.order(1)
    chunks = [order[i:i + 8] for i in range(0, len(order), 8)]
    threaded = [b.index.tolist() for b in loader._prefetched(chunks, pin=False)]
    assert threaded == rows(loader, 1)
    it = loader._prefetched(chunks, pin=False)
    next(it)
    it.close()  # a consumer stopping early must not leave the producer blocked on a full queue
    bad = [order[:8], np.array([10**9])]  # the second batch fails inside the thread
    it = loader._prefetched(bad, pin=False)
    assert len(next(it)) == 8
    with pytest.raises(IndexError):
        next(it)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("resident", [False, True])
def test_cuda_prefetch_matches_cpu(resident):
    split = synthetic()
    gpu = Loader(split, 16, shuffle=True, device="cuda", resident=resident, prefetch=2, buckets=(8, 16))
    cpu = Loader(split, 16, shuffle=True, buckets=(8, 16))
    for a, b in zip(gpu.epoch(1, 2), cpu.epoch(1, 2), strict=True):
        assert a.images.is_cuda and a.questions.is_cuda
        assert a.images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a.images.cpu(), b.images) and torch.equal(a.questions.cpu(), b.questions)
    it = gpu.epoch(0)
    next(it)
    it.close()  # stopping mid-epoch must not leave the prefetch thread blocked


# ---------------------------------------------------------------- questions grouped by image

def test_ungrouped_batches_have_a_row_per_question():
    for b in Loader(synthetic(), 16, shuffle=True).epoch(0):
        assert len(b.images) == len(b) and b.image_index.tolist() == list(range(len(b)))


@pytest.mark.parametrize("group", [2, 3, 5])
def test_grouped_epoch_keeps_each_images_questions_in_chunks(group):
    split = synthetic(q=200, n_images=23)
    loader = Loader(split, 16, shuffle=True, seed=5, group=group)
    order = loader.order(0)
    assert sorted(order) == list(range(200))
    # Each image's questions sit in runs of consecutive positions; cutting the order into
    # runs of one image gives at most ceil(count / group) runs per image, each <= group
    # long unless two of its chunks happen to be neighbours.
    images = split.image_index[order]
    cuts = np.flatnonzero(np.r_[True, images[1:] != images[:-1], True])
    runs: dict[int, list[int]] = {}
    for a, b in zip(cuts[:-1], cuts[1:]):
        runs.setdefault(int(images[a]), []).append(int(b - a))
    for image, lengths in runs.items():
        count = int((split.image_index == image).sum())
        assert sum(lengths) == count and len(lengths) <= -(-count // group), (image, lengths)
    assert max(max(v) for v in runs.values()) > 1
    batches = list(loader.epoch(0))
    for b in batches:
        check_batch(b, split)
        assert len(b.images) == len(np.unique(split.image_index[b.index.numpy()]))  # each image once
    assert sum(len(b.images) for b in batches) < 200 * 0.75  # the point: fewer stem passes
    assert loader.order(0).tolist() == order.tolist() and loader.order(1).tolist() != order.tolist()
    assert rows(loader, 2, 4) == rows(loader, 2)[4:]  # exact resume


def test_grouped_images_padded_to_a_multiple():
    split = synthetic(q=200, n_images=23)
    for b in Loader(split, 16, shuffle=True, group=3, image_multiple=4).epoch(0):
        check_batch(b, split)
        assert len(b.images) % 4 == 0 and len(b.images) - len(np.unique(b.image_index)) < 4


@pytest.mark.parametrize("q, world", [(200, 2), (103, 4), (9, 8)])
def test_grouped_shards_cover_with_equal_steps(q, world):
    split = synthetic(q=q, n_images=11)
    loaders = [Loader(split, 4, shuffle=True, seed=2, shard=(r, world), group=3) for r in range(world)]
    served = [sum(rows(loader, 1), []) for loader in loaders]
    assert len({len(s) for s in served}) == 1 and len({len(loader) for loader in loaders}) == 1
    assert set().union(*map(set, served)) == set(range(q))
    assert sum(map(len, served)) - q == world * -(-q // world) - q  # only the make-up repeats
