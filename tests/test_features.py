"""Precomputed image features: files in both formats, the features cache, the loader, and
train/eval/answer on a model that reads them (data/features.py, docs/features.md)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastfilm import checkpoint as ckpt
from fastfilm.cli import main
from fastfilm.config import GenerateConfig, TrainConfig, model_config
from fastfilm.data import features as feats
from fastfilm.data.cache import load_split, prepare, read_meta
from fastfilm.data.loader import Loader
from fastfilm.engine import trainer as train_mod
from fastfilm.errors import UserError

try:
    import h5py  # optional (the `features` extra); the HDF5 cases need it
except ImportError:
    h5py = None
NEEDS_H5PY = pytest.mark.skipif(h5py is None, reason="h5py is not installed")
HDF5 = pytest.param("hdf5", marks=NEEDS_H5PY)

# One-hot maps of a scene's ground truth: what a perfect feature extractor could give.
COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
ATTRIBUTES = (("color", COLORS), ("shape", ("cube", "sphere", "cylinder")), ("material", ("rubber", "metal")),
              ("size", ("large", "small")))
GT_CHANNELS = sum(len(values) for _, values in ATTRIBUTES)


# Tiny tensors on a shared 2-core machine: one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def ground_truth_features(data: Path, split: str, grid: int = 4) -> np.ndarray:
    """[N, GT_CHANNELS, grid, grid] float16: each object's attributes one-hot in the cell of its
    centre, row i for image i (the scenes file's image_index)."""
    info = json.loads((data / "scenes" / f"CLEVR_{split}_scenes.json").read_text())
    width, height = info["info"]["image_size"]
    out = np.zeros((len(info["scenes"]), GT_CHANNELS, grid, grid), np.float16)
    for scene in info["scenes"]:
        for obj in scene["objects"]:
            x, y = obj["pixel_coords"][:2]
            gx, gy = min(grid - 1, int(x * grid / width)), min(grid - 1, int(y * grid / height))
            offset = 0
            for key, values in ATTRIBUTES:
                out[scene["image_index"], offset + values.index(obj[key]), gy, gx] = 1
                offset += len(values)
    return out


def questions_only(src: Path, dst: Path, reverse: bool = False) -> Path:
    """A copy of DATA without its images: a features cache must not need them. reverse: the
    train questions in reverse order, so that the cache's image rows (in order of first
    mention) differ from the images' numbers, which are what picks a feature row."""
    dst.mkdir(parents=True)
    for sub in ("questions", "scenes"):
        shutil.copytree(src / sub, dst / sub)
    if reverse:
        path = dst / "questions" / "CLEVR_train_questions.json"
        body = json.loads(path.read_text())
        body["questions"].reverse()
        path.write_text(json.dumps(body))
    return dst


def write_features(data: Path, image_dir: str, array: np.ndarray, fmt: str) -> Path:
    (data / "features").mkdir(exist_ok=True)
    npy, h5 = feats.candidates(data, image_dir)
    if fmt == "npy":
        np.save(npy, array)
        return npy
    with h5py.File(h5, "w") as f:  # as clevr-iep's extract_features.py writes it
        f.create_dataset("features", data=array)
    return h5


@pytest.fixture(scope="module")
def one_object(tmp_path_factory):
    """Scenes of one object and questions about its color or shape: the answer is in the
    image alone, so a model that sees the ground truth can answer what a question-only model
    can only guess."""
    from fastfilm.data.generate import run

    out = tmp_path_factory.mktemp("features") / "one_object"
    run(GenerateConfig(out=str(out), train_images=60, val_images=20, questions_per_image=4, image_width=32,
                       image_height=32, min_objects=1, max_objects=1, seed=0, workers=1,
                       families="zero_hop_query_color,zero_hop_query_shape"))
    for split in ("train", "val"):
        write_features(out, split, ground_truth_features(out, split), "npy")
    return out


def random_features(n: int, dtype) -> np.ndarray:
    """[n, 5, 3, 2]: odd sizes, every row different."""
    return np.random.default_rng(n).standard_normal((n, 5, 3, 2)).astype(dtype)


# ------------------------------------------------------------------ files and the loader


@pytest.mark.parametrize("fmt, dtype", [("npy", np.float16), ("npy", np.float32),
                                        pytest.param("hdf5", np.float32, marks=NEEDS_H5PY),
                                        pytest.param("hdf5", np.float16, marks=NEEDS_H5PY)])
@pytest.mark.parametrize("group", [1, 3], ids=["independent", "grouped"])
def test_loader_serves_the_row_of_each_questions_image(generated_clevr, tmp_path, fmt, dtype, group):
    data = questions_only(generated_clevr, tmp_path / "data", reverse=True)
    # More rows than images (as in a file for all of CLEVR's val when a subset is used).
    arrays = {s: random_features(n + 3, dtype) for s, n in (("train", 12), ("val", 4))}
    for split, array in arrays.items():
        write_features(data, split, array, fmt)
    cache = prepare(data, 32, features=True)
    assert cache.name == "features" and not list(cache.glob("*/images.npy"))
    assert {s["features"]["format"] for s in read_meta(cache)["splits"].values()} == {fmt}
    questions = json.loads((data / "questions" / "CLEVR_train_questions.json").read_text())["questions"]
    split = load_split(cache, "train")
    assert split.input == "features" and split.images.shape == (12, 5, 3, 2)
    assert split.image_files[0] == "train/CLEVR_train_000011.png"  # row 0 is image 11
    loader = Loader(split, 7, shuffle=True, seed=1, group=group)
    seen = 0
    for batch in loader.epoch(0):
        assert batch.images.dtype == torch.from_numpy(np.zeros(0, dtype)).dtype
        for q, k in zip(batch.index.tolist(), batch.image_index.tolist()):
            row = questions[q]["image_index"]  # CLEVR_train_<row>.png
            torch.testing.assert_close(batch.images[k], torch.from_numpy(arrays["train"][row]), rtol=0, atol=0)
            seen += 1
    assert seen == len(questions)


@pytest.mark.parametrize("fmt", ["npy", HDF5])
def test_feature_file_reads_rows_in_any_order_with_repeats(tmp_path, fmt):
    array = random_features(9, np.float32)
    file = feats.FeatureFile(write_features(tmp_path, "val", array, fmt))
    rows = np.array([7, 2, 7, 0, 8])
    np.testing.assert_array_equal(file.read(rows), array[rows])
    with pytest.raises(IndexError):
        file.read(np.array([9]))


@NEEDS_H5PY
def test_hdf5_without_h5py_is_a_clear_error(tmp_path, monkeypatch):
    path = write_features(tmp_path, "val", random_features(2, np.float32), "hdf5")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    with pytest.raises(UserError, match=r"needs h5py: pip install h5py.*val\.npy"):
        feats.FeatureFile(path)


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda p: h5py.File(p, "w").create_dataset("feats", data=np.zeros((2, 1, 1, 1), np.float32)),
                 "no dataset named 'features'", marks=NEEDS_H5PY),
    (lambda p: np.save(p, np.zeros((2, 3), np.float32)), r"\[N, C, H, W\] float16 or float32"),
    (lambda p: np.save(p, np.zeros((2, 1, 1, 1), np.int64)), "float16 or float32"),
    (lambda p: p.write_bytes(b"not an array"), "not a readable feature file"),
], ids=["hdf5-dataset-name", "not-4d", "integer", "garbage"])
def test_bad_feature_files_are_named(tmp_path, make, match):
    path = tmp_path / ("x_features.h5" if "dataset" in match else "x.npy")
    result = make(path)
    if hasattr(result, "file"):
        result.file.close()
    with pytest.raises(UserError, match=match):
        feats.FeatureFile(path)


def test_missing_features_name_the_expected_files(generated_clevr, tmp_path):
    data = questions_only(generated_clevr, tmp_path / "data")
    with pytest.raises(UserError, match=r"features/train\.npy or features/train_features\.h5"):
        prepare(data, 32, features=True)


def test_too_few_rows_names_the_image_and_skip_bad_drops_its_questions(generated_clevr, tmp_path):
    data = questions_only(generated_clevr, tmp_path / "data")
    write_features(data, "train", random_features(11, np.float32), "npy")  # no row for image 11
    write_features(data, "val", random_features(4, np.float32), "npy")
    with pytest.raises(UserError, match=r"CLEVR_train_000011\.png.*no row 11"):
        prepare(data, 32, features=True)
    cache = prepare(data, 32, features=True, skip_bad=True)
    split = load_split(cache, "train")
    questions = json.loads((data / "questions" / "CLEVR_train_questions.json").read_text())["questions"]
    assert len(split) == sum(q["image_index"] != 11 for q in questions)
    assert "train/CLEVR_train_000011.png" not in {split.image_files[i] for i in np.unique(split.image_index)}


def test_a_changed_feature_file_rebuilds_raw_data_and_refuses_a_built_cache(generated_clevr, tmp_path):
    data = questions_only(generated_clevr, tmp_path / "data")
    write_features(data, "val", random_features(4, np.float32), "npy")
    path = write_features(data, "train", random_features(12, np.float32), "npy")
    cache = prepare(data, 32, features=True)
    built = (cache / "meta.json").stat().st_mtime_ns
    assert prepare(data, 32, features=True) == cache and (cache / "meta.json").stat().st_mtime_ns == built
    new = random_features(12, np.float32) + 1
    np.save(path, new)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(UserError, match=r"stale cache: feature file .*train\.npy changed"):
        prepare(cache, 32, features=True)
    prepare(data, 32, features=True)  # raw DATA: rebuilt, and the loader reads the new rows
    torch.testing.assert_close(torch.from_numpy(load_split(cache, "train").images.take(np.array([5]))),
                               torch.from_numpy(new[5:6]))
    # A pixel cache is another cache: asking for one does not touch the features cache.
    with pytest.raises(UserError, match="cache of precomputed features, 32px wanted"):
        prepare(cache, 32)


# ------------------------------------------------------------------ training, eval, answer


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="tiny", epochs=12, batch_size=32, lr=1e-2, patience=0,
                device="cpu", reference=True)
    return TrainConfig(**{**base, **kw})


def test_features_that_carry_the_answer_beat_question_only(one_object, tmp_path):
    """The scenes' ground truth as features: FiLM reads the object's color or shape from them,
    which the question alone cannot tell (each question names nothing about the answer)."""
    film = train_mod.train(_cfg(one_object, tmp_path / "film"),
                           model_config("tiny", input="features", feature_channels=GT_CHANNELS), progress=False)
    blind = train_mod.train(_cfg(one_object, tmp_path / "question_only"),
                            model_config("tiny", arch="question_only", input="features",
                                         feature_channels=GT_CHANNELS), progress=False)
    # Question-only can do no better than the most frequent color or shape; the margin and
    # the figures behind it: docs/features.md, "Tests".
    assert film["val_accuracy"] > blind["val_accuracy"] + 0.25, (film, blind)


def test_eval_and_answer_on_a_features_run(one_object, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--preset", "tiny", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--no-compile",
             "--amp", "off"]
    assert main(["train", str(one_object), "--out", str(run), "--input", "features", "--feature-channels",
                 str(GT_CHANNELS), *flags]) == 0
    preds = tmp_path / "preds.txt"
    capsys.readouterr()
    assert main(["eval", str(run), str(one_object), "--json", "--reference", "--predictions", str(preds)]) == 0
    report = json.loads(capsys.readouterr().out)
    best = json.loads((run / "best.json").read_text())
    assert report["accuracy"] == pytest.approx(best["val_accuracy"])
    # `answer` about question 5's image gives the answer eval predicted for it.
    q = json.loads((one_object / "questions" / "CLEVR_val_questions.json").read_text())["questions"][5]
    predicted = preds.read_text().splitlines()[5]
    val = one_object / "features" / "val.npy"
    assert main(["answer", str(run), "--question", q["question"], "--features-file", str(val),
                 "--feature-index", str(q["image_index"]), "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == predicted
    # The row may come from the image's file name instead.
    assert main(["answer", str(run), "--question", q["question"], "--features-file", str(val), "--image",
                 q["image_filename"], "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == predicted
    # Pixels alone cannot be answered about: one line saying what is needed.
    image = one_object / "images" / "val" / q["image_filename"]
    assert main(["answer", str(run), "--question", q["question"], "--image", str(image)]) == 2
    assert "--features-file" in capsys.readouterr().err
    # A model of another feature width is refused, naming the flag.
    with pytest.raises(UserError, match=f"--feature-channels {GT_CHANNELS}"):
        train_mod.train(_cfg(one_object, tmp_path / "wide", epochs=1),
                        model_config("tiny", input="features", feature_channels=8), progress=False)


@NEEDS_H5PY
def test_hdf5_and_npy_train_the_same_weights(one_object, tmp_path):
    """Both formats serve the same numbers: one epoch on each, bit-identical weights (fast model)."""
    h5_data = questions_only(one_object, tmp_path / "h5")
    for split in ("train", "val"):
        write_features(h5_data, split, np.load(one_object / "features" / f"{split}.npy"), "hdf5")
    model_cfg = model_config("tiny", input="features", feature_channels=GT_CHANNELS)
    kw = dict(epochs=1, reference=False, compile=False, amp="off", group_questions=2)
    train_mod.train(_cfg(one_object, tmp_path / "npy_run", **kw), model_cfg, progress=False)
    train_mod.train(_cfg(h5_data, tmp_path / "h5_run", **kw), model_cfg, progress=False)
    a = torch.load(tmp_path / "npy_run" / ckpt.LAST, weights_only=True)["model"]
    b = torch.load(tmp_path / "h5_run" / ckpt.LAST, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
