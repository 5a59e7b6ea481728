"""What a training run shows: the bar's questions/s and the epoch's remaining time, and the
per-epoch log line's questions/s and epoch time."""
import io
import re

from tqdm import tqdm

from fastfilm.config import TrainConfig, model_config
from fastfilm.engine import trainer as train_mod


def render(steps: int, total: int, elapsed: float, questions_per_step: int, initial: int = 0, postfix=None) -> str:
    """The bar after `steps` of `total` (epoch_bar counts questions: steps x questions_per_step)."""
    q = questions_per_step
    return tqdm.format_meter(n=steps * q, total=total * q, elapsed=elapsed, initial=initial * q, prefix="epoch 1/80",
                             unit=" q", bar_format=train_mod.BAR_FORMAT, postfix=postfix, ncols=None)


def test_bar_shows_questions_per_second_and_the_epochs_remaining_time():
    # 10 steps of 64 questions in 8 s, 100 steps in the epoch: 80 q/s, 90 steps (72 s) to go.
    line = render(10, 100, 8.0, 64, postfix="loss=0.912, acc=0.610")
    assert "640/6400 questions" in line and "80.00 q/s" in line
    assert "00:08 done, epoch ends in 01:12" in line and line.endswith("loss=0.912, acc=0.610]")


def test_bar_rate_counts_every_rank_and_only_this_sessions_steps():
    # Resumed at step 50 of 100, 10 more steps of 2 ranks x 32 questions in 4 s: 160 q/s, 40 steps (16 s) left.
    line = render(60, 100, 4.0, 2 * 32, initial=50)
    assert "160.00 q/s" in line and "epoch ends in 00:16" in line


def test_bar_counts_questions_from_where_the_epoch_resumed():
    out = io.StringIO()
    bar = train_mod.epoch_bar(7, 2, 16, desc="epoch 1/2", file=out, mininterval=0)
    assert "32/112 questions" in out.getvalue()  # 2 steps of 16 done before
    for _ in range(5):
        bar.update(16)
    assert "112/112 questions" in out.getvalue()


def test_epoch_log_line_shows_questions_per_second_and_epoch_time(generated_clevr, tmp_path, capsys):
    cfg = TrainConfig(data=str(generated_clevr), out=str(tmp_path / "run"), preset="tiny", epochs=1, batch_size=16,
                      patience=0, device="cpu", reference=True, log_every=1)
    train_mod.train(cfg, model_config("tiny"), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"\[run\] epoch 1: train loss [\d.]+, val [\d.]+% [^\n]*, \d+ q/s, epoch trained in \d\d:\d\d\n", err), err
    assert re.search(r"\d+/\d+ questions \[ *[\d.]+ q/s, \d\d:\d\d done, epoch ends in ", err), err
