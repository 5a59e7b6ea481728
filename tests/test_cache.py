"""`fastfilm preprocess`: decode-once cache, DALI vs Pillow, bad inputs, interruption, reuse rules."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from clevr_fixture import TRAIN, make_clevr
from conftest import kill_after_decoding
from PIL import Image

from fastfilm.cli import main as cli_main
from fastfilm.data import cache, decode
from fastfilm.data.cache import load_split, load_vocab, prepare, read_meta
from fastfilm.data.decode import decode_images, decode_pillow, read_encoded
from fastfilm.data.reader import read_split
from fastfilm.data.vocab import Vocab
from fastfilm.errors import UserError

S = 16
BACKENDS = ["pillow", pytest.param("dali", marks=pytest.mark.skipif(not decode.dali_available(),
                                                                     reason="nvidia-dali not installed"))]
# DALI and Pillow both resample with an antialiased bicubic filter, but place and weight the
# taps slightly differently (and their JPEG IDCTs differ): measured mean |diff| <= 0.2 of 255
# on the fixture and on 480x320 images; single pixels on sharp edges differ by up to ~20.
MEAN_ABS_BOUND = 0.5


@pytest.fixture
def clevr(tmp_path):
    return make_clevr(tmp_path / "CLEVR_v1.0")


def _train_image(clevr, i):
    return clevr["root"] / "images" / "train" / clevr["train_images"][i]


def test_cache_contents(clevr):
    root = clevr["root"]
    path = prepare(root, S, splits=("train", "val", "test"), decoder="pillow")
    assert path == root / ".fastfilm_cache" / str(S)
    meta = read_meta(path)
    assert meta["source"] == str(root.resolve()) and meta["image_size"] == S
    vocab = load_vocab(path)
    assert meta["vocab_fingerprint"] == vocab.fingerprint()
    raw = read_split(root, "train")
    train = load_split(path, "train")
    assert isinstance(train.images, np.memmap) and train.images.dtype == np.uint8
    assert train.images.shape == (4, S, S, 3)  # 8 questions, 4 distinct images: decoded once each
    for i, text in enumerate(raw.text):
        ids = vocab.encode_question(text)
        assert train.lengths[i] == len(ids)
        assert train.questions[i, :len(ids)].tolist() == ids and not train.questions[i, len(ids):].any()
        assert train.image_files[train.image_index[i]] == raw.image_files[i]
        assert vocab.idx_to_answer[train.answers[i]] == raw.answers[i]
    assert train.questions.shape[1] == train.lengths.max()
    assert train.types.tolist() == raw.types and train.families.tolist() == raw.families
    for row, f in enumerate(train.image_files):
        expected = decode_pillow((root / "images" / f).read_bytes(), S)
        assert np.array_equal(train.images[row], expected), f
    for a in (train.questions, train.lengths, train.answers, train.image_index, train.types, train.families):
        assert a.dtype == np.int64
    test = load_split(path, "test")
    assert (test.answers == -1).all() and test.types.tolist() == [0, 1, -1]  # from families; 99 unseen


def test_images_decoded_once_per_image(clevr, monkeypatch):
    calls = []
    real = decode.decode_pillow
    monkeypatch.setattr(decode, "decode_pillow", lambda data, size: calls.append(1) or real(data, size))
    prepare(clevr["root"], S, splits=("train", "val"), decoder="pillow")
    assert len(calls) == 4 + 2  # train has 8 questions over 4 images, val 3 over 2


@pytest.mark.skipif(not decode.dali_available(), reason="nvidia-dali not installed")
@pytest.mark.parametrize("size", [16, 64])
def test_dali_and_pillow_agree(clevr, size):
    paths = [_train_image(clevr, i) for i in range(4)]  # RGBA PNGs, an RGB PNG and a JPEG, odd sizes
    a, b = (np.zeros((4, size, size, 3), np.uint8) for _ in range(2))
    decode_images(paths, size, a, backend="dali")
    decode_images(paths, size, b, backend="pillow")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    for i, p in enumerate(paths):
        assert diff[i].mean() < MEAN_ABS_BOUND, f"{p.name}: mean |dali - pillow| = {diff[i].mean():.3f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rgba_alpha_is_dropped_not_composited(tmp_path, backend):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    alpha = np.zeros((20, 30, 1), np.uint8)
    alpha[:, :15] = 255  # half transparent: compositing would change the right half
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = np.zeros((2, 8, 8, 3), np.uint8)
    decode_images([tmp_path / "rgba.png", tmp_path / "rgb.png"], 8, out, backend=backend)
    assert np.array_equal(out[0], out[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_16_bit_png(tmp_path, backend):
    grey = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 113).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    Image.fromarray((grey >> 8).astype(np.uint8)).save(tmp_path / "g8.png")
    out = np.zeros((2, 12, 12, 3), np.uint8)
    decode_images([tmp_path / "g16.png", tmp_path / "g8.png"], 12, out, backend=backend)
    assert np.abs(out[0].astype(int) - out[1]).max() <= 1


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"IEND\xaeB`\x82")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no_iend":
        path.write_bytes(data[:-12])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        path.unlink()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["garbage", "truncated", "no_iend", "empty", "missing"])
def test_bad_image_names_the_file_or_is_skipped(clevr, backend, kind):
    bad = _train_image(clevr, 1)
    _corrupt(bad, kind)
    with pytest.raises(UserError) as e:
        prepare(clevr["root"], S, splits=("train",), decoder=backend)
    assert str(bad) in str(e.value)
    assert read_meta(clevr["root"] / ".fastfilm_cache" / str(S)) is None
    path = prepare(clevr["root"], S, splits=("train",), decoder=backend, skip_bad=True)
    info = read_meta(path)["splits"]["train"]
    used = sum(1 for i in range(len(TRAIN)) if i % 4 == 1)  # questions about image 1
    assert info["skipped_images"] == 1 and info["skipped_questions"] == used
    assert info["questions"] == len(TRAIN) - used and str(bad) in info["skipped"][0]
    train = load_split(path, "train")
    assert 1 not in train.image_index.tolist() and not train.images[1].any()


def test_bad_json_record_names_file_and_record(clevr):
    qfile = clevr["root"] / "questions" / "CLEVR_train_questions.json"
    body = json.loads(qfile.read_text())
    del body["questions"][3]["question"]
    qfile.write_text(json.dumps(body))
    with pytest.raises(UserError, match=r"CLEVR_train_questions.json, record 3 .*'question'"):
        prepare(clevr["root"], S, decoder="pillow")
    path = prepare(clevr["root"], S, decoder="pillow", skip_bad=True)
    info = read_meta(path)["splits"]["train"]
    assert info["skipped_records"] == 1 and info["questions"] == len(TRAIN) - 1


def test_interrupted_build_leaves_no_cache(clevr, monkeypatch):
    real, calls = cache.decode_images, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # train's images are written, val's are being decoded
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "decode_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(clevr["root"], S, decoder="pillow")
    parent = clevr["root"] / ".fastfilm_cache"
    assert not (parent / str(S)).exists()
    assert [p.name for p in parent.iterdir()] == [f".{S}.lock"]  # temp dir cleaned up


def test_killed_build_leaves_no_valid_cache(clevr, tmp_path):
    kill_after_decoding('c.prepare(sys.argv[1], 16, decoder="pillow")', clevr["root"])
    target = clevr["root"] / ".fastfilm_cache" / "16"
    leftovers = [p for p in target.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers and not any(p.joinpath("meta.json").exists() for p in leftovers)
    assert read_meta(target) is None
    with pytest.raises(UserError, match="not a fastfilm cache"):
        load_split(target, "train")
    path = prepare(clevr["root"], 16, decoder="pillow")  # a new build removes the dead one's temp dir
    assert read_meta(path) is not None and len(load_split(path, "train")) == len(TRAIN)
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


def test_reused_when_matching(clevr, monkeypatch):
    path = prepare(clevr["root"], S, decoder="pillow")
    monkeypatch.setattr(cache, "_build", lambda *a, **k: pytest.fail("rebuilt a matching cache"))
    assert prepare(clevr["root"], S, decoder="pillow") == path
    assert prepare(clevr["root"], S, splits=("train",)) == path  # a subset is served too
    assert prepare(path, S) == path  # DATA may be the cache itself


def test_rebuilt_when_questions_change(clevr, capsys):
    path = prepare(clevr["root"], S, decoder="pillow")
    qfile = clevr["root"] / "questions" / "CLEVR_train_questions.json"
    body = json.loads(qfile.read_text())
    body["questions"].append(dict(body["questions"][0], question="Are there any purple cubes?"))
    qfile.write_text(json.dumps(body))
    assert prepare(clevr["root"], S, decoder="pillow") == path
    assert "rebuilding" in capsys.readouterr().err
    assert len(load_split(path, "train")) == len(TRAIN) + 1 and "purple" in load_vocab(path).question_token_to_idx


def test_rebuild_keeps_earlier_splits(clevr):
    path = prepare(clevr["root"], S, splits=("train", "val"), decoder="pillow")
    prepare(clevr["root"], S, splits=("test",), decoder="pillow")
    assert set(read_meta(path)["splits"]) == {"train", "val", "test"}


def test_vocab_given(clevr, tmp_path):
    other = Vocab.build([{"question": "Is it a cube?", "answer": "yes"}, {"question": "Any sphere?", "answer": "no"}])
    other.save(tmp_path / "vocab.json")
    path = prepare(clevr["root"], S, decoder="pillow")
    assert load_vocab(path).fingerprint() != other.fingerprint()
    assert prepare(clevr["root"], S, vocab=tmp_path / "vocab.json", decoder="pillow") == path  # rebuilt
    assert load_vocab(path).fingerprint() == other.fingerprint()
    assert read_meta(path)["splits"]["train"]["unknown_words"] > 0
    Vocab.build([{"question": "something else", "answer": "x"}]).save(tmp_path / "v2.json")
    with pytest.raises(UserError, match="another vocabulary"):
        prepare(path, S, vocab=tmp_path / "v2.json")


def test_refusals(clevr, tmp_path):
    path = prepare(clevr["root"], S, decoder="pillow")
    with pytest.raises(UserError, match=f"cache of {S}px images, 32px wanted"):
        prepare(path, 32)
    other = make_clevr(tmp_path / "other")
    explicit = tmp_path / "explicit_cache"
    prepare(clevr["root"], S, cache=explicit, decoder="pillow")
    with pytest.raises(UserError, match="was built from"):
        prepare(other["root"], S, cache=explicit, decoder="pillow")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a fastfilm cache; refusing"):
        prepare(clevr["root"], S, cache=tmp_path / "precious", decoder="pillow")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="none of the splits"):
        prepare(clevr["root"], S, splits=("trainA",))
    with pytest.raises(UserError, match="no split 'trainA'"):
        load_split(path, "trainA")


def test_damaged_cache_is_refused(clevr):
    path = prepare(clevr["root"], S, decoder="pillow")
    np.save(path / "train" / "lengths.npy", np.zeros(3, np.int64))
    with pytest.raises(UserError, match="lengths.npy: shape"):
        load_split(path, "train")


def test_cli_preprocess(clevr, tmp_path, capsys):
    assert cli_main(["preprocess", str(clevr["root"]), "--cache", str(tmp_path / "c"), "--image-size", "8",
                     "--decoder", "pillow", "--splits", "train,val,test"]) == 0
    out = capsys.readouterr().out
    assert f"train: {len(TRAIN)} questions, 4 images" in out and "test: 3 questions" in out
    assert load_split(tmp_path / "c", "val").images.shape[1:] == (8, 8, 3)
    assert cli_main(["preprocess", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_pillow_fallback_without_dali(clevr, monkeypatch):
    monkeypatch.setattr(decode, "dali_available", lambda: False)
    assert decode.resolve_backend("auto") == "pillow"
    with pytest.raises(UserError, match="nvidia-dali is not installed"):
        decode.resolve_backend("dali")
    assert read_meta(prepare(clevr["root"], S, splits=("val",)))["decoder"] == "pillow"


def test_read_encoded_is_strict(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:-2])
    with pytest.raises(ValueError, match="truncated JPEG"):
        read_encoded(tmp_path / "cut.jpg")


@pytest.mark.gpu
def test_dali_mixed_gpu_matches_cpu(clevr):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not decode.dali_available():
        pytest.skip("needs CUDA and nvidia-dali")
    paths = [_train_image(clevr, i) for i in range(4)]
    gpu, cpu = (np.zeros((4, 32, 32, 3), np.uint8) for _ in range(2))
    decode_images(paths, 32, gpu, backend="dali", device="gpu")
    decode_images(paths, 32, cpu, backend="dali", device="cpu")
    # nvJPEG (GPU) and libjpeg-turbo differ slightly on the JPEG; PNGs decode on the CPU either way.
    assert np.abs(gpu.astype(int) - cpu).mean() < MEAN_ABS_BOUND


def test_image_stats_recorded_and_older_caches(clevr, capsys):
    path = prepare(clevr["root"], S, splits=("train",), decoder="pillow")
    stats = np.load(path / "train" / "image_stats.npy")
    files = load_split(path, "train").image_files
    for (size, mtime_ns), f in zip(stats, files, strict=True):
        st = (clevr["root"] / "images" / f).stat()
        assert (size, mtime_ns) == (st.st_size, st.st_mtime_ns)
    (path / "train" / "image_stats.npy").unlink()  # as a cache from before image stats were recorded
    assert prepare(path, S) == path  # given as DATA it cannot be checked: served as it is
    assert prepare(clevr["root"], S, splits=("train",), decoder="pillow") == path
    assert "no record of its image files" in capsys.readouterr().err  # raw DATA: rebuilt, now with stats
    assert (path / "train" / "image_stats.npy").exists()
