"""The resident epoch (--resident): the decision from free device memory, batches built on the
device equal to the memory-mapped path's, no device value read on the host within an epoch,
and the log line that says which device decodes PNG and JPEG when a cache is built."""
import dataclasses

import pytest
import torch

from fastfilm.data import decode
from fastfilm.data.loader import RESIDENT_SHARE, Batch, Loader, resident_bytes, resident_decision
from fastfilm.errors import UserError
from test_loader import check_batch, synthetic

CUDA = torch.device("cuda", 0)  # a device object only: mem_get_info is replaced below
GIB = 2 ** 30


@pytest.fixture
def free_memory(monkeypatch):
    """set(free bytes): what torch.cuda.mem_get_info reports from then on."""
    state = {"free": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GIB))
    return lambda free: state.update(free=free)


def test_auto_keeps_a_split_on_the_gpu_when_it_fits_in_the_free_share(free_memory):
    free_memory(40 * GIB)
    on, why = resident_decision("auto", CUDA, int(RESIDENT_SHARE * 40 * GIB), "train split")
    assert on and "resident on the GPU" in why and "train split" in why and "40.00 GiB free" in why
    on, why = resident_decision("auto", CUDA, int(RESIDENT_SHARE * 40 * GIB) + 1, "train split")
    assert not on and "not resident" in why and "pinned memory" in why and "\n" not in why
    free_memory(10 * GIB)  # the same data on a fuller device
    assert resident_decision("auto", CUDA, 6 * GIB, "val split")[0] is False


def test_on_and_off_are_honoured_and_on_refuses_what_cannot_fit(free_memory):
    free_memory(10 * GIB)
    assert resident_decision("on", CUDA, 9 * GIB, "train split")[0] is True  # over the share: the user asked
    with pytest.raises(UserError, match=r"--resident on: train split: 11.00 GiB, 10.00 GiB free .*does not fit"):
        resident_decision("on", CUDA, 11 * GIB, "train split")
    assert resident_decision("off", CUDA, 1, "train split") == (False, "")
    with pytest.raises(ValueError, match="auto, on or off"):
        resident_decision("always", CUDA, 1, "train split")


def test_on_the_cpu_auto_is_off_and_on_reads_into_ram(monkeypatch):
    def no_cuda(*a, **k):
        raise AssertionError("the CPU decision must not ask CUDA")
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    cpu = torch.device("cpu")
    assert resident_decision("auto", cpu, 10 * GIB, "train split") == (False, "")
    on, why = resident_decision("on", cpu, GIB, "train split")
    assert on and "read into RAM" in why


def test_resident_bytes_counts_images_and_question_arrays():
    split = synthetic(q=103, n_images=20)
    per_question = split.questions[0].nbytes + 4 * 8  # questions row, lengths, answers, types, families
    assert resident_bytes(split) == split.images.nbytes + 103 * per_question
    assert resident_bytes(split, limit=30) == split.images.nbytes + 30 * per_question


# ---------------------------------------------------------------- the batches


def assert_same_batches(a: Batch, b: Batch) -> None:
    for f in dataclasses.fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), f.name
    assert a.images.is_contiguous(memory_format=torch.channels_last)


LOADERS = {
    "plain": dict(),
    "buckets": dict(buckets=(4, 8)),
    "grouped": dict(group=3, image_multiple=8, buckets=(8, 16)),
    "shard": dict(shard=(1, 3), group=2),
    "drop_last": dict(drop_last=True),
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_resident_batches_equal_the_memory_mapped_ones(kind):
    """The resident path (device code, run on the CPU) and the host gather serve the same
    batches, field by field, from the start of an epoch and from a resumed batch."""
    split = synthetic(q=103, n_images=20)
    kw = dict(shuffle=True, seed=4, **LOADERS[kind])
    resident, mapped = Loader(split, 16, resident=True, **kw), Loader(split, 16, **kw)
    for epoch, start in ((0, 0), (3, 2)):
        got = list(resident.epoch(epoch, start))
        assert len(got) == len(resident) - start
        for a, b in zip(got, mapped.epoch(epoch, start), strict=True):
            assert_same_batches(a, b)
            check_batch(a, split)
    assert list(resident.epoch(0, len(resident))) == []  # resumed after the last batch


@pytest.mark.parametrize("group", [1, 3], ids=["independent", "grouped"])
def test_resident_features_equal_the_file_reads(tmp_path, group):
    """A features split (rows of a [N, C, H, W] float16 file, data/features.py) resident: the
    same batches as reading the file per batch, features as stored."""
    import numpy as np

    from fastfilm.data.features import FeatureFile, FeatureView

    base = synthetic(q=103, n_images=20)
    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((23, 5, 3, 2)).astype(np.float16))
    split = dataclasses.replace(base, images=FeatureView(FeatureFile(tmp_path / "f.npy"), np.arange(20)[::-1] + 3))
    kw = dict(shuffle=True, seed=1, group=group, image_multiple=8 if group > 1 else 0)
    assert resident_bytes(split) == 20 * 5 * 3 * 2 * 2 + 103 * (split.questions[0].nbytes + 4 * 8)
    resident, read = Loader(split, 16, resident=True, **kw), Loader(split, 16, **kw)
    for a, b in zip(resident.epoch(2), read.epoch(2), strict=True):
        assert a.images.dtype == torch.float16 and a.images.shape[1:] == (5, 3, 2)
        for f in dataclasses.fields(Batch):
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name


def test_resident_epoch_reads_no_device_value_on_the_host():
    """On meta tensors (shapes, no values) any .item()/.tolist()/.numpy() of a device tensor
    raises: building every batch of an epoch on the device does none, grouped or not."""
    split = synthetic(q=103, n_images=20)
    for kw in (dict(), dict(group=3, image_multiple=8, buckets=(8, 16))):
        meta = Loader(split, 16, shuffle=True, device="meta", resident=True, **kw)
        host = Loader(split, 16, shuffle=True, **kw)
        for a, b in zip(meta.epoch(1), host.epoch(1), strict=True):
            assert a.images.device.type == "meta" and a.questions.device.type == "meta"
            for f in dataclasses.fields(Batch):
                assert getattr(a, f.name).shape == getattr(b, f.name).shape, f.name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["plain", "grouped"])
def test_cuda_resident_epoch_matches_and_never_syncs(kind):
    """On CUDA: every field on the device, equal to the host path's batches, and no
    synchronising call while the epoch's batches are built (torch's sync debug mode raises)."""
    split = synthetic(q=103, n_images=20)
    kw = dict(shuffle=True, seed=2, **LOADERS[kind])
    gpu, cpu = Loader(split, 16, device="cuda", resident=True, **kw), Loader(split, 16, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(gpu.epoch(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(batches, cpu.epoch(1), strict=True):
        assert all(getattr(a, f.name).is_cuda for f in dataclasses.fields(Batch))
        assert_same_batches(a, b)


# ---------------------------------------------------------------- decoding when a cache is built

def test_the_build_log_says_which_device_decodes_png_and_jpeg():
    assert decode.describe_decoding("pillow", "cpu", 2) == (
        "Pillow on the CPU (2 threads): PNG and JPEG decoded and resized on the CPU")
    assert decode.describe_decoding("dali", "cpu", 3).startswith("DALI on the CPU (3 threads): PNG and JPEG")
    mixed = decode.describe_decoding("dali", "gpu:1", 4)
    assert "GPU 1" in mixed and "JPEG decoded on the GPU" in mixed and "PNG on the CPU (4 threads" in mixed
    assert decode.describe_decoding("dali", "gpu", 4).startswith("DALI 'mixed' on GPU 0")
    assert decode.describe_decoding("dali+pillow", "cpu", 1) == (
        "DALI on the CPU (1 thread): PNG and JPEG decoded on the CPU, resized by Pillow")
    assert decode.describe_decoding("dali+pillow", "gpu:0", 1).endswith("; resized by Pillow on the CPU")


def test_a_cache_build_records_its_decoding(generated_clevr, tmp_path, capsys):
    """Every build keeps the line in meta.json and `preprocess` prints it; stderr gets it only
    when decoding is split across devices (a user error's one line stays alone otherwise)."""
    from fastfilm.cli import main
    from fastfilm.data.cache import read_meta

    assert main(["preprocess", str(generated_clevr), "--image-size", "8", "--cache", str(tmp_path / "c"),
                 "--splits", "val", "--decoder", "pillow", "--workers", "1"]) == 0
    out = capsys.readouterr()
    line = "Pillow on the CPU (1 thread): PNG and JPEG decoded and resized on the CPU"
    assert read_meta(tmp_path / "c")["decoding"] == line and line in out.out and "building cache" not in out.err


def test_a_mixed_dali_build_says_which_device_decodes_what(generated_clevr, tmp_path, capsys, monkeypatch):
    """The build with DALI's 'mixed' pipeline (what training on a GPU asks for), run here with
    the decoder replaced (no GPU, maybe no DALI): the line is said and recorded."""
    from fastfilm.data import cache

    def fake_decode(paths, size, out, **kw):
        assert (kw["backend"], kw["device"]) == ("dali", "gpu:0")
        out[:] = 0
        return []
    monkeypatch.setattr(cache, "choose_decoder", lambda decoder, size, device: decode.DecoderChoice("dali", "test"))
    monkeypatch.setattr(cache, "decode_images", fake_decode)
    path = cache.prepare(generated_clevr, 8, cache=tmp_path / "c", splits=("val",), decoder="dali", device="gpu:0",
                         workers=2)
    err = capsys.readouterr().err
    expected = decode.describe_decoding("dali", "gpu:0", 2)
    assert f"building cache {path}: {expected}" in err and cache.read_meta(path)["decoding"] == expected
    assert "JPEG decoded on the GPU" in expected and "PNG on the CPU" in expected


def test_training_on_a_gpu_builds_the_cache_with_dali_mixed():
    from fastfilm.engine.trainer import dali_device

    assert dali_device(torch.device("cpu")) == "cpu"
    assert dali_device(torch.device("cuda", 3)) == "gpu:3"


# ---------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_training_resident_equals_memory_mapped(generated_clevr, tmp_path, capsys):
    """`train --resident on` (the device path, here in RAM) trains the same weights as
    `--resident off`, grouped questions included, and says so once per split."""
    from fastfilm import checkpoint as ckpt
    from fastfilm.config import TrainConfig, model_config
    from fastfilm.engine.trainer import train

    weights = {}
    for mode in ("on", "off"):
        cfg = TrainConfig(data=str(generated_clevr), out=str(tmp_path / mode), preset="tiny", epochs=2, batch_size=16,
                          lr=3e-3, patience=0, device="cpu", reference=True, group_questions=2, resident=mode)
        train(cfg, model_config("tiny"))
        weights[mode] = torch.load(tmp_path / mode / ckpt.LAST, weights_only=True)["model"]
        err = capsys.readouterr().err
        assert err.count("read into RAM") == (2 if mode == "on" else 0), err
    for name, w in weights["on"].items():
        assert torch.equal(w, weights["off"][name]), name
