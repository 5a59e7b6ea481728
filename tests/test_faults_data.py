"""Fault injection on the data layer (issue 14): bad inputs and interrupted or concurrent
`preprocess` runs, each driven through `fastfilm.cli.main` as a user would.

Every test asserts the exit code (2 for a user's mistake), that the message names the file
or record at fault, and that nothing was lost: the dataset's files keep their checksums and
a cache that was complete stays complete until a whole new one replaces it.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES, kill_after_decoding

from fastfilm.cli import main
from fastfilm.config import model_config
from fastfilm.data import cache
from fastfilm.data.cache import default_cache_dir, load_split, prepare, read_meta
from fastfilm.data.decode import decode_pillow
from fastfilm.data.loader import Loader
from fastfilm.model.fast import FastFiLMNet
from fastfilm.model.reference import FiLMNet

S = 16
CACHE = ".fastfilm_cache"
TRAIN_JSON = "questions/CLEVR_train_questions.json"


@pytest.fixture
def data(generated_clevr, tmp_path):
    """A private copy of the generated dataset (12 train / 4 val images, 48 / 16 questions),
    without any cache other tests built into the shared one."""
    out = tmp_path / "CLEVR"
    shutil.copytree(generated_clevr, out, ignore=shutil.ignore_patterns(CACHE))
    return out


def checksums(root: Path, skip: str | None = CACHE) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hex), leaving out the `skip` directory."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and (skip is None or skip not in p.parts)}


def preprocess(data: Path, *args: str) -> int:
    return main(["preprocess", str(data), "--image-size", str(S), "--decoder", "pillow", "--workers", "1", *args])


def image(data: Path, split: str, i: int) -> Path:
    return data / "images" / split / f"CLEVR_{split}_{i:06d}.png"


def cached_row(path: Path, split: str, image_file: Path) -> np.ndarray:
    """The cached pixels of one source image ([S, S, 3] uint8)."""
    s = load_split(path, split)
    rel = str(image_file.relative_to(image_file.parents[2] / "images"))
    return np.asarray(s.images[s.image_files.index(rel)])


def edit_questions(data: Path, edit, name: str = TRAIN_JSON) -> None:
    path = data / name
    body = json.loads(path.read_text())
    edit(body["questions"])
    path.write_text(json.dumps(body))


# ---------------------------------------------------------------- item 3: stale caches

def test_replaced_image_rebuilds_the_cache(data, capsys):
    assert preprocess(data) == 0
    path = default_cache_dir(data, S)
    target, other = image(data, "train", 3), image(data, "train", 7)
    assert not np.array_equal(cached_row(path, "train", target), decode_pillow(other.read_bytes(), S))
    shutil.copyfile(other, target)  # the user replaces one image by another
    sources = checksums(data)
    capsys.readouterr()
    assert preprocess(data) == 0
    err = capsys.readouterr().err
    assert err.count("rebuilding cache") == 1 and target.name in err
    assert np.array_equal(cached_row(path, "train", target), decode_pillow(other.read_bytes(), S))
    assert checksums(data) == sources  # preprocessing never touches the dataset


def test_touched_image_and_train_path_rebuild(data, capsys):
    # `train` and `eval` call prepare(DATA, size) exactly like this.
    path = prepare(data, S, decoder="pillow")
    built = read_meta(path)["created"], (path / "train" / "images.npy").stat().st_mtime_ns
    target = image(data, "val", 2)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime: the check is cheap
    capsys.readouterr()
    assert prepare(data, S, decoder="pillow") == path
    assert target.name in capsys.readouterr().err
    assert (read_meta(path)["created"], (path / "train" / "images.npy").stat().st_mtime_ns) != built
    assert prepare(data, S, decoder="pillow") == path and "rebuilding" not in capsys.readouterr().err


def test_skip_bad_cache_notices_repaired_and_appearing_images(data, capsys):
    broken, missing = image(data, "train", 2), image(data, "train", 5)
    good_broken, good_missing = broken.read_bytes(), missing.read_bytes()
    broken.write_bytes(good_broken[: len(good_broken) // 3])
    missing.unlink()
    assert preprocess(data, "--skip-bad") == 0
    path = default_cache_dir(data, S)
    info = read_meta(path)["splits"]["train"]
    assert info["skipped_images"] == 2 and info["questions"] == 48 - 8

    broken.write_bytes(good_broken)  # repaired
    capsys.readouterr()
    assert preprocess(data) == 0  # rebuilt with --skip-bad as the cache was: image 5 is still missing
    err = capsys.readouterr().err
    assert "rebuilding cache" in err and broken.name in err and "--skip-bad" in err
    info = read_meta(path)["splits"]["train"]
    assert info["skipped_images"] == 1 and info["questions"] == 48 - 4
    assert np.array_equal(cached_row(path, "train", broken), decode_pillow(good_broken, S))

    missing.write_bytes(good_missing)  # appears
    assert preprocess(data, "--skip-bad") == 0
    assert missing.name in capsys.readouterr().err
    info = read_meta(path)["splits"]["train"]
    assert info["skipped_images"] == 0 and info["questions"] == 48
    assert np.array_equal(cached_row(path, "train", missing), decode_pillow(good_missing, S))


def test_rebuild_that_fails_keeps_the_old_cache(data, capsys):
    assert preprocess(data) == 0
    path = default_cache_dir(data, S)
    kept = checksums(path, skip=None)
    bad = image(data, "train", 4)
    bad.write_bytes(bad.read_bytes()[:100])
    capsys.readouterr()
    assert preprocess(data) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert checksums(path, skip=None) == kept and read_meta(path) is not None
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_deleted_image_keeps_the_cache(data, capsys):
    # A cache outlives the removal of its sources (raw images may be deleted to save space):
    # only a file that exists with other contents than at the build makes the cache stale.
    assert preprocess(data) == 0
    path = default_cache_dir(data, S)
    kept = checksums(path, skip=None)
    image(data, "train", 6).unlink()
    capsys.readouterr()
    assert preprocess(data) == 0
    assert "rebuilding" not in capsys.readouterr().err and checksums(path, skip=None) == kept


def test_stale_built_cache_given_as_data_is_refused(data, capsys):
    assert preprocess(data) == 0
    path = default_cache_dir(data, S)
    assert prepare(path, S) == path  # a fresh cache serves as DATA
    target = image(data, "train", 1)
    shutil.copyfile(image(data, "train", 0), target)
    with pytest.raises(cache.UserError, match=rf"{target.name}.*fastfilm preprocess {data}"):
        prepare(path, S)


def test_given_vocabulary_survives_an_automatic_rebuild(data, tmp_path):
    assert preprocess(data) == 0
    path = default_cache_dir(data, S)
    vocab = json.loads((path / "vocab.json").read_text())
    vocab["question_token_to_idx"]["zeppelin"] = len(vocab["question_token_to_idx"])
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    assert preprocess(data, "--vocab", str(tmp_path / "vocab.json")) == 0
    shutil.copyfile(image(data, "train", 0), image(data, "train", 1))
    assert preprocess(data) == 0  # rebuilt for the image, with the vocabulary it was given
    assert "zeppelin" in json.loads((path / "vocab.json").read_text())["question_token_to_idx"]


# ---------------------------------------------------------------- a train question without an answer

def test_train_question_without_answer_is_named(data, capsys):
    edit_questions(data, lambda qs: qs[5].pop("answer"))
    sources = checksums(data)
    assert preprocess(data) == 2
    err = capsys.readouterr().err
    assert "CLEVR_train_questions.json, record 5" in err and "answer" in err and "Traceback" not in err
    assert read_meta(default_cache_dir(data, S)) is None
    assert preprocess(data, "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "skipped 1 records" in out and "record 5" in out
    info = read_meta(default_cache_dir(data, S))["splits"]["train"]
    assert info["skipped_records"] == 1 and info["questions"] == 47
    assert checksums(data) == sources


def test_val_and_test_questions_may_lack_answers(data):
    edit_questions(data, lambda qs: qs[2].pop("answer"), "questions/CLEVR_val_questions.json")
    # CLEVR's test split: no answer, program nor family (its images are named CLEVR_val_* here).
    body = json.loads((data / "questions/CLEVR_val_questions.json").read_text())
    body["questions"] = [{k: q[k] for k in ("image_index", "image_filename", "question_index", "question")}
                         for q in body["questions"]]
    (data / "questions/CLEVR_test_questions.json").write_text(json.dumps(body))
    assert preprocess(data, "--splits", "train,val,test") == 0
    path = default_cache_dir(data, S)
    assert load_split(path, "val").answers.tolist().count(-1) == 1
    assert (load_split(path, "test").answers == -1).all()


# ---------------------------------------------------------------- one pathological question

def add_long_question(data: Path, words: int = 5000) -> None:
    edit_questions(data, lambda qs: qs.append(dict(qs[0], question=" ".join(["red"] * words) + "?")))


def test_long_question_warned_and_padded_only_in_its_batch(data, capsys):
    add_long_question(data)
    assert preprocess(data) == 0
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if "99th-percentile" in line]
    assert len(warn) == 1 and "CLEVR_train_questions.json" in warn[0] and "5002 tokens" in warn[0]
    assert "1 question " in warn[0] and "record 48" in warn[0]
    split = load_split(default_cache_dir(data, S), "train")
    assert split.questions.shape[1] == 5002  # 5000 words, <START>, <END>
    widths = [(b.questions.shape[1], int(b.lengths.max())) for b in Loader(split, 8, shuffle=True).epoch(0)]
    assert all(w == longest for w, longest in widths)  # each batch padded to its own longest question
    assert sorted(w for w, _ in widths)[-2] < 100  # only the outlier's batch is long


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_model_does_not_depend_on_padding(fast):
    # Per-batch padding changes the question tensor's width from batch to batch; the GRU
    # state read at each question's last real token must not depend on it.
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = FastFiLMNet(cfg, 40, 11) if fast else FiLMNet(cfg, 40, 11)
    lengths = torch.tensor([7, 3, 5, 2, 7])  # batch 5: odd, longest first for the packed GRU
    q = torch.zeros(5, 7, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        q[i, :n] = torch.randint(4, 40, (n,))
    images = torch.randint(0, 256, (5, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    outs = []
    for width in (7, 19):
        model.zero_grad()
        logits = model(images, torch.nn.functional.pad(q, (0, width - 7)), lengths)
        logits.square().sum().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- read-only dataset, output paths

def read_only(data: Path, monkeypatch) -> None:
    """Make DATA read-only. Root ignores permission bits, so there the probe is told too."""
    for d in (data, *[p for p in data.rglob("*") if p.is_dir()]):
        d.chmod(0o555)
    if os.geteuid() == 0:
        real = cache._writable
        monkeypatch.setattr(cache, "_writable", lambda d: data not in (d, *d.parents) and real(d))


@pytest.fixture
def restore_permissions(data):
    yield
    for d in (data, *[p for p in data.rglob("*") if p.is_dir()]):
        d.chmod(0o755)


def test_read_only_dataset_uses_a_per_user_cache(data, tmp_path, monkeypatch, capsys, restore_permissions):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    read_only(data, monkeypatch)
    sources = checksums(data, skip=None)
    assert preprocess(data) == 0
    err = capsys.readouterr().err.splitlines()
    note = [line for line in err if "not writable" in line]
    assert len(note) == 1 and "--cache" in note[0]
    (fallback,) = (tmp_path / "xdg" / "fastfilm").glob(f"CLEVR-*/{S}")
    assert str(fallback) in note[0] and read_meta(fallback)["source"] == str(data)
    assert checksums(data, skip=None) == sources and not (data / CACHE).exists()
    assert prepare(data, S, decoder="pillow") == fallback  # train and eval find it again
    assert "rebuilding" not in capsys.readouterr().err
    assert preprocess(data, "--cache", str(tmp_path / "mine")) == 0  # --cache still wins
    assert read_meta(tmp_path / "mine") is not None and "not writable" not in capsys.readouterr().err


READ_ONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" || exit 77; exec "$2" -c "$3" "$1"'
PREPROCESS = ("import sys; from fastfilm.cli import main; sys.exit(main(['preprocess', sys.argv[1], '--image-size', "
              "'16', '--decoder', 'pillow', '--workers', '1']))")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a read-only bind mount needs root")
def test_read_only_mount_uses_a_per_user_cache(data, tmp_path):
    # The kernel's own refusal (EROFS), in a private mount namespace: what root meets on a
    # dataset mounted read-only, where permission bits would not stop it.
    sources = checksums(data, skip=None)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY_MOUNT, "sh", str(data), sys.executable, PREPROCESS],
                       capture_output=True, text=True, env=env, timeout=120)
    if r.returncode == 77:
        pytest.skip(f"no mount namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    (fallback,) = (tmp_path / "xdg" / "fastfilm").glob(f"CLEVR-*/{S}")
    assert f"not writable; using the per-user cache {fallback}" in r.stderr
    assert len(load_split(fallback, "train")) == 48 and not (data / CACHE).exists()
    assert checksums(data, skip=None) == sources


def test_fresh_cache_in_read_only_dataset_is_used(data, tmp_path, monkeypatch, capsys, restore_permissions):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert preprocess(data) == 0  # built by someone who could write there
    read_only(data, monkeypatch)
    capsys.readouterr()
    assert prepare(data, S, decoder="pillow") == default_cache_dir(data, S)
    assert "not writable" not in capsys.readouterr().err and not (tmp_path / "xdg").exists()


def test_cache_or_generate_path_that_is_a_file(data, tmp_path, capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    before = checksums(tmp_path)
    assert preprocess(data, "--cache", str(precious)) == 2
    assert f"{precious}" in capsys.readouterr().err
    assert preprocess(data, "--cache", str(precious / "sub")) == 2
    assert f"{precious}" in capsys.readouterr().err
    assert main(["generate", str(precious), "--train-images", "1", "--val-images", "0", "--image-width", "16",
                 "--image-height", "16", "--families", TINY_FAMILIES, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert str(precious) in err and "Traceback" not in err
    assert checksums(tmp_path) == before


# ---------------------------------------------------------------- faults that already work

@pytest.mark.parametrize("kind", ["truncated", "empty", "missing"])
def test_bad_image_is_named_or_skipped(data, capsys, kind):
    bad = image(data, "val", 1)
    if kind == "missing":
        bad.unlink()
    else:
        bad.write_bytes(bad.read_bytes()[:200] if kind == "truncated" else b"")
    sources = checksums(data)
    assert preprocess(data) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1
    assert preprocess(data, "--skip-bad") == 0
    assert f"skipped: {bad}" in capsys.readouterr().out
    assert checksums(data) == sources


@pytest.mark.parametrize("damage, named", [
    (lambda text: text[: len(text) // 2], "line 1: malformed JSON"),
    (lambda text: text.replace('"questions": [', '"questions": [17, ', 1), "record 0 (line 1): a question record"),
])
def test_bad_json_is_named(data, capsys, damage, named):
    qfile = data / TRAIN_JSON
    qfile.write_text(damage(qfile.read_text()))
    assert preprocess(data) == 2
    err = capsys.readouterr().err
    assert f"{qfile}" in err and named in err and err.count("\n") == 1


KILLED_PREPROCESS = """
    from fastfilm.cli import main
    main(["preprocess", sys.argv[1], "--image-size", "16", "--decoder", "pillow", "--workers", "1", "--force"])
"""


def test_kill_9_mid_rebuild_keeps_the_old_cache(data, capsys):
    assert preprocess(data) == 0
    path = default_cache_dir(data, S)
    kept, sources = checksums(path, skip=None), checksums(data)
    kill_after_decoding(KILLED_PREPROCESS, data)
    assert checksums(path, skip=None) == kept  # the complete cache is untouched by the killed rebuild
    assert [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # its temp dir is left behind
    assert preprocess(data, "--force") == 0  # a clean rebuild removes it
    assert read_meta(path) is not None and len(load_split(path, "train")) == 48
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    assert checksums(data) == sources


CONCURRENT = textwrap.dedent("""
    import sys
    from fastfilm.cli import main
    import fastfilm.data.cache as c
    real = c._build
    def build(*a, **k):
        print("building", flush=True)
        return real(*a, **k)
    c._build = build
    sys.exit(main(["preprocess", sys.argv[1], "--image-size", "16", "--decoder", "pillow", "--workers", "1"]))
""")


def test_concurrent_preprocessing_builds_once(data):
    sources = checksums(data)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(data)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(out.count("building") for out, _ in outs) == 1  # the second waited and reused it
    path = default_cache_dir(data, S)
    assert len(load_split(path, "train")) == 48 and len(load_split(path, "val")) == 16
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert checksums(data) == sources
