"""Fault injection on training, evaluation and answering (issue 14), each driven through
`fastfilm.cli.main` as a user would.

Every test asserts the exit code (2 for a user's mistake, 3 for a non-finite loss), that the
message names the file, tensor, flag or process at fault, and that nothing was lost: the files
that must survive keep their sha256. The data layer's faults are in tests/test_faults_data.py;
a killed and a stalled DDP rank in tests/test_distributed.py
(test_a_failing_rank_fails_the_others_at_once, test_a_stalled_rank_brings_the_job_down_after_the_timeout),
where test_checkpoint_and_resume_on_two_ranks also checks that rank 1 opens no file in the run
directory for writing: only rank 0 takes the run's lock.
"""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastfilm.cli import main
from fastfilm.data.vocab import SPECIAL_TOKENS
from fastfilm.engine import rundir

CACHE = ".fastfilm_cache"
TRAIN_JSON = "questions/CLEVR_train_questions.json"
# One optimizer step per epoch on 8 questions: the machine is slow and shared.
TINY = ["--preset", "tiny", "--batch-size", "8", "--max-train-questions", "8", "--reference", "--device", "cpu"]
SPECIALS = set(SPECIAL_TOKENS)


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hex), caches left out."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and CACHE not in p.parts}


def error_line(capsys, command: str = "train") -> str:
    """The one error line of a refused command (notes may come before it), never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fastfilm {command}: "), err
    return last


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(CACHE))
    return dst


@pytest.fixture(scope="module")
def finished(generated_clevr, tmp_path_factory):
    """A finished one-epoch run (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", str(generated_clevr), "--out", str(run), "--epochs", "1", *TINY]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


def val_image(data: Path) -> Path:
    return sorted((data / "images" / "val").glob("*.png"))[0]


# ---------------------------------------------------------------- 1. a finished run is not overwritten

def test_finished_run_is_refused_unless_overwrite(run, generated_clevr, capsys):
    (run / "notes.txt").write_text("the user's own file")
    before = checksums(run)
    assert main(["train", str(generated_clevr), "--out", str(run), "--epochs", "1", *TINY]) == 2
    line = error_line(capsys)
    assert str(run) in line and f"--resume {run}" in line and "--overwrite" in line
    assert checksums(run) == before

    assert main(["train", str(generated_clevr), "--out", str(run), "--epochs", "1", "--overwrite", *TINY]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed" in err and "kept notes.txt" in err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # started clean, not appended
    assert (run / "notes.txt").read_text() == "the user's own file"
    assert not (run / rundir.LOCK).exists()  # released on exit


def test_overwrite_and_resume_together_are_refused(run, capsys):
    before = checksums(run)
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "--overwrite" in error_line(capsys) and checksums(run) == before


# ---------------------------------------------------------------- 2. one training per run directory

HOLD = textwrap.dedent("""
    import sys, time
    from fastfilm.engine.rundir import claim
    with claim(sys.argv[1], resume=False, overwrite=False):
        print("held", flush=True)
        time.sleep(120)
""")


def test_second_training_fails_at_once_naming_the_holder(generated_clevr, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(generated_clevr), "--out", str(run), "--epochs", "1", *TINY]) == 2
        line = error_line(capsys)
        assert f"process {holder.pid} on {socket.gethostname()}" in line and str(run) in line
        assert sorted(os.listdir(run)) == [rundir.LOCK]  # refused before any work (no vocab.json yet)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The dead holder's lock is recognised as stale and taken over, with a note naming it.
    with rundir.claim(run, resume=False, overwrite=False):
        assert f"{holder.pid}" in capsys.readouterr().err
        assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert not (run / rundir.LOCK).exists()


# ---------------------------------------------------------------- 3. --resume honours DATA, paths are absolute

def test_resume_uses_the_given_data_and_refuses_other_data(generated_clevr, tmp_path, monkeypatch, capsys):
    copy_data(generated_clevr, tmp_path / "CLEVR")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "CLEVR", "--out", "run", "--epochs", "1", *TINY]) == 0  # relative paths
    run = tmp_path / "run"
    meta = torch.load(run / "last.pt", weights_only=True)["meta"]
    assert meta["train_config"]["data"] == str(tmp_path / "CLEVR")  # stored absolute

    # From another directory, without DATA: the run's own data, found by its absolute path.
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--resume", str(run), "--epochs", "2", "--device", "cpu"]) == 0

    # The data moved: said clearly without DATA, used when given and the same.
    copy_data(tmp_path / "CLEVR", tmp_path / "moved")
    (tmp_path / "CLEVR").rename(tmp_path / "gone")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    line = error_line(capsys)
    assert str(tmp_path / "CLEVR") in line and "give its data" in line
    assert main(["train", str(tmp_path / "moved"), "--resume", str(run), "--epochs", "3"]) == 0
    assert "same questions and vocabulary" in capsys.readouterr().err
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["meta"]["train_config"]["data"] == str(tmp_path / "moved")
    assert json.loads(state["progress"])["epoch"] == 3

    # Other questions with the same vocabulary (two records swapped): refused, the run untouched.
    other = copy_data(tmp_path / "moved", tmp_path / "other")
    body = json.loads((other / TRAIN_JSON).read_text())
    body["questions"][:2] = body["questions"][1::-1]
    (other / TRAIN_JSON).write_text(json.dumps(body))
    before = checksums(run)
    assert main(["train", str(other), "--resume", str(run), "--epochs", "4"]) == 2
    line = error_line(capsys)
    assert str(other) in line and "training questions" in line and str(tmp_path / "moved") in line
    assert checksums(run) == before


# ---------------------------------------------------------------- 4. batch size 1 and batch norm

def test_batch_size_1_with_batch_norm_is_refused_before_any_work(generated_clevr, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(generated_clevr), "--out", str(out), *TINY, "--batch-size", "1"]) == 2
    line = error_line(capsys)
    assert "--batch-size 1" in line and "--no-batchnorm" in line
    assert not out.exists()


@pytest.mark.parametrize("arch, path", [("film", "--reference"), ("film", "--no-compile"), ("cnn_gru", "--reference"),
                                        ("question_only", "--reference")])
def test_batch_size_1_trains_without_batch_norm(generated_clevr, tmp_path, arch, path):
    out = tmp_path / "run"
    assert main(["train", str(generated_clevr), "--out", str(out), "--preset", "tiny", "--arch", arch, path,
                 "--amp", "off", "--no-batchnorm", "--batch-size", "1", "--max-train-questions", "3", "--epochs", "1",
                 "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["val_accuracy"] is not None


@pytest.mark.parametrize("group", ["1", "3"], ids=["independent", "grouped-by-image"])
def test_last_batch_of_one_question_is_skipped_with_batch_norm(generated_clevr, tmp_path, capsys, group):
    out = tmp_path / "run"
    # 17 questions at 8 per step: 8, 8, then 1 that batch norm cannot train on.
    assert main(["train", str(generated_clevr), "--out", str(out), *TINY, "--max-train-questions", "17",
                 "--group-questions", group, "--epochs", "1"]) == 0
    assert "last batch holds one question" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


# ---------------------------------------------------------------- 5. checkpoints

def test_truncated_best_falls_back_to_an_intact_last(run, generated_clevr, capsys):
    best = run / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    before = checksums(run)
    question = ["--image", str(val_image(generated_clevr)), "--question", "What color is the cube?"]
    assert main(["answer", str(run), *question]) == 0
    err = capsys.readouterr().err
    assert str(best) in err and f"using {run / 'last.pt'}" in err
    assert main(["answer", str(best), *question]) == 2  # the file named itself: refused, last.pt pointed to
    line = error_line(capsys, "answer")
    assert str(best) in line and "last.pt" in line
    assert checksums(run) == before


def test_wrong_shape_tensor_is_named_with_both_shapes(run, generated_clevr, capsys):
    best = run / "best.safetensors"
    tensors = load_file(best)
    expected = tuple(tensors["classifier.fc2.weight"].shape)
    tensors["classifier.fc2.weight"] = torch.zeros(3, 5)
    save_file(tensors, best)
    assert main(["answer", str(run), "--image", str(val_image(generated_clevr)), "--question", "what color"]) == 2
    line = error_line(capsys, "answer")
    assert "classifier.fc2.weight" in line and "(3, 5)" in line and str(expected) in line


class Payload:
    """Unpickling this runs `touch MARKER`; loading never must."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "weights-only", "malicious"])
def test_bad_last_pt_given_to_resume_is_one_line(run, tmp_path, capsys, damage):
    last, marker = run / "last.pt", tmp_path / "executed"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "foreign":
        torch.save({"weights": torch.ones(3)}, last)
    elif damage == "weights-only":  # a real checkpoint's model and meta, nothing to resume from
        state = torch.load(last, weights_only=True)
        torch.save({"model": state["model"], "meta": state["meta"]}, last)
    else:
        torch.save({"model": {}, "meta": {}, "payload": Payload(marker)}, last)
    before = checksums(run)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    line = error_line(capsys)
    assert str(last) in line
    assert checksums(run) == before and not marker.exists()


def test_malicious_safetensors_and_json_pair_never_executes(run, generated_clevr, tmp_path, capsys):
    marker = tmp_path / "executed"
    best = run / "best.safetensors"
    torch.save({"payload": Payload(marker)}, best)  # a pickle under the safetensors name
    meta = json.loads((run / "best.json").read_text())
    meta["model_config"]["__class__"] = "os.system"  # JSON is data: never looked up as code
    (run / "best.json").write_text(json.dumps(meta))
    assert main(["eval", str(best), str(generated_clevr), "--reference"]) == 2
    assert str(best) in error_line(capsys, "eval") and not marker.exists()
    (run / "last.pt").unlink()  # no fallback: the damaged pair is all there is
    assert main(["answer", str(run), "--image", str(val_image(generated_clevr)), "--question", "what color"]) == 2
    assert str(best) in error_line(capsys, "answer") and not marker.exists()


def test_non_finite_loss_in_the_first_epoch_says_what_exists(generated_clevr, tmp_path, monkeypatch, capsys):
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "run"
    assert main(["train", str(generated_clevr), "--out", str(out), "--epochs", "1", "--log-every", "1", *TINY]) == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "no checkpoint was written yet" in err and "vocab.json" in err
    assert "Traceback" not in err and not (out / "last.pt").exists()


# ---------------------------------------------------------------- 6. output paths, checked before work

def test_out_that_is_a_file_or_under_one(generated_clevr, tmp_path, capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    before = checksums(tmp_path)
    for out in (precious, precious / "run"):
        assert main(["train", str(generated_clevr), "--out", str(out), "--epochs", "1", *TINY]) == 2
        assert str(precious) in error_line(capsys)
    assert checksums(tmp_path) == before


READ_ONLY = textwrap.dedent("""
    import sys
    from fastfilm.cli import main
    data, ro = sys.argv[1], sys.argv[2]
    tiny = ["--preset", "tiny", "--epochs", "2", "--device", "cpu"]
    print("codes", main(["train", data, "--out", ro + "/new", *tiny]), main(["train", "--resume", ro + "/run", *tiny]))
""")
MOUNT_RO = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" || exit 77; exec "$2" -c "$3" "$4" "$1"'


def test_read_only_run_directory_or_parent(run, generated_clevr, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.move(str(run), ro / "run")
    before = checksums(ro)
    if os.geteuid() == 0:  # root ignores permission bits: a read-only bind mount, as a read-only disk is
        if not shutil.which("unshare"):
            pytest.skip("root without unshare cannot make a directory read-only")
        r = subprocess.run(["unshare", "-m", "sh", "-c", MOUNT_RO, "sh", str(ro), sys.executable, READ_ONLY,
                            str(generated_clevr)], capture_output=True, text=True, timeout=120)
        if r.returncode == 77:
            pytest.skip(f"no mount namespace here: {r.stderr.strip()}")
        out, err = r.stdout, r.stderr
    else:
        ro.chmod(0o555)
        (ro / "run").chmod(0o555)
        try:
            r = subprocess.run([sys.executable, "-c", READ_ONLY, str(generated_clevr), str(ro)], capture_output=True,
                               text=True, timeout=120)
        finally:
            ro.chmod(0o755)
            (ro / "run").chmod(0o755)
        out, err = r.stdout, r.stderr
    assert "codes 2 2" in out, err
    assert f"--out {ro / 'new'}: cannot create it" in err and f"--resume {ro / 'run'}: cannot write there" in err
    assert "Traceback" not in err and checksums(ro) == before


def test_eval_predictions_into_a_directory_is_refused_before_evaluating(finished, generated_clevr, tmp_path,
                                                                       monkeypatch, capsys):
    import fastfilm.commands.eval as eval_cmd

    def evaluated(*a, **k):
        raise AssertionError("the evaluation ran before --predictions was checked")

    monkeypatch.setattr(eval_cmd, "predict", evaluated)
    assert main(["eval", str(finished), str(generated_clevr), "--predictions", str(tmp_path), "--reference"]) == 2
    line = error_line(capsys, "eval")
    assert f"--predictions {tmp_path}" in line and "directory" in line


# ---------------------------------------------------------------- 7. answers

@pytest.mark.parametrize("question", ["", "   ", "?"])
def test_blank_question_is_refused(finished, generated_clevr, capsys, question):
    assert main(["answer", str(finished), "--image", str(val_image(generated_clevr)), "--question", question]) == 2
    assert "--question" in error_line(capsys, "answer")


def test_special_tokens_are_never_answers(run, generated_clevr, tmp_path, capsys):
    # A model whose classifier all but always picks <NULL>, <START>, <END> and <UNK>.
    table = json.loads((run / "vocab.json").read_text())["answer_token_to_idx"]
    best = run / "best.safetensors"
    tensors = load_file(best)
    for token in SPECIALS:
        tensors["classifier.fc2.bias"][table[token]] = 100.0
    save_file(tensors, best)
    assert main(["answer", str(run), "--image", str(val_image(generated_clevr)), "--question",
                 "What color is the cube?", "--top", "50"]) == 0
    offered = [line.split("%", 1)[1].strip() for line in capsys.readouterr().out.splitlines() if "%" in line]
    assert offered and not SPECIALS & set(offered)
    assert len(offered) == len(table) - len(SPECIALS)  # every real answer can still be offered
    preds = tmp_path / "preds.txt"
    assert main(["eval", str(run), str(generated_clevr), "--predictions", str(preds), "--reference"]) == 0
    assert not SPECIALS & set(preds.read_text().splitlines())


# ---------------------------------------------------------------- faults that already work

KILLABLE = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[3]))  # the same reductions as the uninterrupted run
    from fastfilm.cli import main
    sys.exit(main(["train", sys.argv[1], "--out", sys.argv[2], "--epochs", "3", *sys.argv[4:]]))
""")


def test_kill_9_mid_training_then_exact_resume(generated_clevr, tmp_path, capsys):
    # As tests/test_train.py's resume tests, with a real SIGKILL: the run resumes from its last
    # complete checkpoint, takes over the dead process's lock and ends with the weights and
    # metrics of an uninterrupted run.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["train", str(generated_clevr), "--out", str(straight), "--epochs", "3", *TINY]) == 0
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(generated_clevr), str(killed),
                             str(torch.get_num_threads()), *TINY], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the training ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "metrics.json").exists()  # killed mid-training
    assert json.loads((killed / rundir.LOCK).read_text())["pid"] == proc.pid  # its lock is left behind
    capsys.readouterr()
    assert main(["train", "--resume", str(killed), "--epochs", "3"]) == 0
    assert f"taking over the lock left by process {proc.pid}" in capsys.readouterr().err
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(killed / "last.pt", weights_only=True)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    epochs = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # each once, whatever the kill interrupted
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no temp file left
