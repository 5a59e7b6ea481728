"""Data-parallel training on 2 CPU processes with gloo: DDP steps equal one process with the
double batch, sharded evaluation equals single-process evaluation, checkpoints and resume,
failing or stalled ranks, and `torchrun -m fastfilm train`.

Ranks are spawned processes (fresh interpreters, one thread each) running functions of this
module; the single-process counterparts run in the test process.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastfilm import checkpoint as ckpt
from fastfilm.engine import distributed
from fastfilm.engine.build import load
from fastfilm.engine.metrics import accuracy_report
from fastfilm.engine.options import Execution
from fastfilm.engine.predictor import predict
from fastfilm.model import norm
from fastfilm.commands import eval as eval_cmd
from fastfilm.config import EvalConfig, TrainConfig, model_config
from fastfilm.errors import UserError
from helpers import assert_sensitive, sensitive_checkpoint, sensitive_film, split_batch

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

B = 8  # per-rank batch of the equivalence tests


def tiny_cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="tiny", epochs=1, batch_size=B, lr=3e-3, patience=0,
                log_every=1, device="cpu", reference=True, eval_batch_size=5)
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- launching ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, out: Path, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        with distributed.session("cpu", timeout_s=60) as dctx:
            result = fn(dctx, *args)
        torch.save({"result": result}, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)


@contextlib.contextmanager
def _one_thread_children():
    # Children inherit the environment at start: one OpenMP thread each on the shared cores.
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old


def launch(fn, tmp: Path, *args, world: int = 2, timeout: float = 240, expect_ok: bool = True) -> dict:
    """Run fn(dctx, *args) on `world` spawned ranks; {"results", "errors", "codes"} per rank."""
    import multiprocessing as mp

    out = tmp / f"ranks-{fn.__name__}"
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out, args)) for r in range(world)]
    t0 = time.monotonic()
    with _one_thread_children():
        for p in procs:
            p.start()
    for p in procs:
        p.join(max(0.0, timeout - (time.monotonic() - t0)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {r: (out / f"rank{r}.err").read_text() for r in range(world) if (out / f"rank{r}.err").exists()}
    if hung:
        pytest.fail(f"ranks {hung} still running after {timeout} s; errors: {errors}")
    if expect_ok and errors:
        pytest.fail("\n".join(f"rank {r}:\n{e}" for r, e in errors.items()))
    lost = [r for r in range(world) if r not in errors and not (out / f"rank{r}.pt").exists()]
    if lost:
        pytest.fail(f"ranks {lost} died without a result (exit codes {[p.exitcode for p in procs]})")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False)["result"] if r not in errors else None
               for r in range(world)]
    return {"results": results, "errors": errors, "codes": [p.exitcode for p in procs]}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, *, atol, rtol: float) -> None:
    """Elementwise |got - want| <= atol + rtol |want| (atol: a number or a tensor like want);
    a failure names the worst element."""
    err = (got.double() - want.double()).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(err) + rtol * want.double().abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {want.numel()} elements differ; worst at flat index {i}: "
                             f"got {got.flatten()[i]:.6g}, want {want.flatten()[i]:.6g}, allowed "
                             f"{bound.flatten()[i]:.3g}")


def gradients(state: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """The gradient of each parameter (weight decay included) from Adam's state after one
    step: exp_avg = (1 - beta1) g."""
    beta1 = state["optimizer"]["param_groups"][0]["betas"][0]
    moments = state["optimizer"]["state"]
    return {names[i]: moments[i]["exp_avg"] / (1 - beta1) for i in moments}


def assert_same_step(got: dict, want: dict, names: list[str], what: str) -> None:
    """One Adam step from the same weights gave the same gradients, weights and buffers.

    Gradients are compared, not only weights: a first Adam step moves a weight by
    lr * g / (|g| + eps) ~ lr * sign(g), which would hide a wrongly scaled gradient. The
    weights' tolerance is the gradient's carried through that step: tight wherever sign(g)
    is certain, up to 2 lr where |g| is at the noise level (biases followed by a batch norm,
    whose gradient is 0 in exact arithmetic)."""
    group = want["optimizer"]["param_groups"][0]
    lr, eps = group["lr"], group["eps"]
    g_got, g_want = gradients(got, names), gradients(want, names)
    scale = max(g.abs().max().item() for g in g_want.values())
    loose = total = 0
    for n in g_want:
        # fp32 sums in another order: noise relative to each tensor's largest gradient, with a
        # floor for the gradients that are 0 in exact arithmetic.
        tol = 5e-5 * g_want[n].abs().max().item() + 1e-6 * scale
        assert_close(g_got[n], g_want[n], f"{what}: gradient of {n}", atol=tol, rtol=0)
        # d(step)/dg = lr eps / (|g| + eps)^2, at its largest within the gradient's tolerance.
        slack = (lr * eps * tol / ((g_want[n].abs() - tol).clamp(min=0) + eps) ** 2).clamp(max=2 * lr)
        assert_close(got["model"][n], want["model"][n], f"{what}: weight {n}", atol=1e-6 + slack, rtol=1e-5)
        loose, total = loose + int((slack > 1e-5).sum()), total + slack.numel()
    # Without batch norm, units dead for the whole (tiny) batch give exact-zero gradients, whose
    # steps count as uncertain here: up to ~28% of the weights in the bn-off cases.
    assert loose < 0.35 * total, f"{what}: {loose} of {total} weights have a step too uncertain to compare"
    for k, w in want["model"].items():
        if k not in g_want:  # buffers (batch norm statistics, counters) and parameters without gradient
            assert_close(got["model"][k], w, f"{what}: buffer {k}", atol=1e-6, rtol=1e-4)


def last_state(run: Path) -> dict:
    return torch.load(run / ckpt.LAST, weights_only=True)


# ---------------------------------------------------------------- (a) one step, 2 ranks x B == 1 x 2B

CASES = {
    # name: (TrainConfig overrides, ModelConfig overrides)
    "bn_off": (dict(reference=True), dict(batchnorm=False)),
    # No FiLM-ed block: the question encoder gets no gradient, which DDP must be told.
    "no_film": (dict(reference=True), dict(batchnorm=False, film_blocks="none")),
    "sync_bn": (dict(reference=True, sync_bn=True), {}),
    # The fast model: sync-bn swaps the fused op for the unfused path; one process keeps the fused op.
    "sync_bn_fast": (dict(reference=False, compile=False, amp="off", sync_bn=True), {}),
}


def _one_step(dctx, data: str, root: Path) -> None:
    from fastfilm.engine.trainer import train

    for name, (kw, model_kw) in CASES.items():
        train(tiny_cfg(data, root / name / "ranks2", max_train_questions=2 * B, bn_stats="running", **kw),
              model_config("tiny", **model_kw))


def test_one_step_on_two_ranks_equals_one_process_with_double_batch(generated_clevr, tmp_path):
    from fastfilm.engine.trainer import train

    launch(_one_step, tmp_path, str(generated_clevr), tmp_path)
    for name, (kw, model_kw) in CASES.items():
        single = {k: v for k, v in kw.items() if k != "sync_bn"}
        # bn_stats="running" on both sides: the buffers compared are the step's own update of
        # the running statistics (precise BN would recompute them from other batches of B and 2B).
        train(tiny_cfg(generated_clevr, tmp_path / name / "single", max_train_questions=2 * B, batch_size=2 * B,
                       bn_stats="running", **single), model_config("tiny", **model_kw))
        got, want = last_state(tmp_path / name / "ranks2"), last_state(tmp_path / name / "single")
        assert json.loads(got["progress"])["step"] == json.loads(want["progress"])["step"] == 1
        assert got["meta"]["world_size"] == 2 and want["meta"]["world_size"] == 1
        assert_same_step(got, want, _param_names(kw, model_kw), name)


def _param_names(kw: dict, model_kw: dict) -> list[str]:
    """Parameter names in the optimizer's order (build_optimizer takes model.parameters())."""
    from fastfilm.model import build_model

    model = build_model(model_config("tiny", **model_kw), 40, 30, fast=not kw.get("reference", False))
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- shared single-process run


@pytest.fixture(scope="module")
def single_run(generated_clevr, tmp_path_factory) -> Path:
    """A one-process tiny run (one epoch) whose last.pt holds weights with answers that depend
    on the image and the question (helpers.sensitive_checkpoint): a checkpoint to evaluate
    and to resume."""
    from fastfilm.engine.trainer import train

    run = tmp_path_factory.mktemp("single") / "run"
    train(tiny_cfg(generated_clevr, run), model_config("tiny"))
    sensitive_checkpoint(run / ckpt.LAST, generated_clevr)
    return run


# ---------------------------------------------------------------- (b) sharded evaluation


def _load(checkpoint, device) -> tuple:
    """(reference model, checkpoint meta) of a checkpoint."""
    loaded = load(checkpoint, Execution(torch.device(device), reference=True))
    return loaded.model, loaded.meta


def _subset(split, n: int):
    """The first n questions of a cached split."""
    import dataclasses

    return dataclasses.replace(split, **{k: getattr(split, k)[:n] for k in
                                         ("questions", "lengths", "answers", "image_index", "types", "families")})


def _evaluate(dctx, data: str, checkpoint: str, out: Path) -> dict:
    import io

    from fastfilm.data.cache import load_split, prepare
    from fastfilm.data.loader import Loader

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        eval_cmd.run(EvalConfig(checkpoint=checkpoint, data=data, json=True, predictions=str(out / "ranks2.txt"),
                                batch_size=3, device="cpu", compile=False, amp="off"))
    # 15 questions over 2 ranks: rank 1's shard is one short and repeats a question.
    model, meta = _load(checkpoint, dctx.device)
    # Ranks whose batch norm statistics drifted apart (per-rank BN) evaluate rank 0's.
    for b in model.buffers():
        b.add_(dctx.rank)
    dctx.sync_buffers(model)
    split = _subset(load_split(prepare(data, meta["model_config"]["image_size"]), "val"), 15)
    local = predict(model, Loader(split, 4, shuffle=False, shard=(dctx.rank, dctx.world_size)), dctx.device)
    return {"stdout": buf.getvalue(), "local": local, "merged": dctx.merge_predictions(local.copy())}


def test_evaluation_over_two_ranks_equals_single_process(generated_clevr, single_run, tmp_path, capsys):
    from fastfilm.data.cache import load_split, prepare
    from fastfilm.data.loader import Loader

    ranks = launch(_evaluate, tmp_path, str(generated_clevr), str(single_run / ckpt.LAST), tmp_path)["results"]
    capsys.readouterr()
    eval_cmd.run(EvalConfig(checkpoint=str(single_run / ckpt.LAST), data=str(generated_clevr), json=True,
                            predictions=str(tmp_path / "single.txt"), batch_size=3, device="cpu", compile=False,
                            amp="off"))
    single_report = json.loads(capsys.readouterr().out)
    assert json.loads(ranks[0]["stdout"]) == single_report and single_report["count"] == 16
    assert ranks[1]["stdout"] == ""  # rank 0 reports
    assert (tmp_path / "ranks2.txt").read_text() == (tmp_path / "single.txt").read_text()

    model, meta = _load(single_run / ckpt.LAST, torch.device("cpu"))
    split = _subset(load_split(prepare(generated_clevr, meta["model_config"]["image_size"]), "val"), 15)
    want = predict(model, Loader(split, 15, shuffle=False), torch.device("cpu"))
    # Not vacuous: answers vary, and rank 1's drifted statistics would have changed some.
    for b in model.buffers():
        b.add_(1)
    assert len(set(want)) >= 3 and (predict(model, Loader(split, 15, shuffle=False), "cpu") != want).any()
    for r, res in enumerate(ranks):
        np.testing.assert_array_equal(res["merged"], want)
        # Each rank predicted its own round-robin shard only: 8 + 7 questions, no overlap.
        np.testing.assert_array_equal(np.flatnonzero(res["local"] >= 0), np.arange(r, 15, 2))
    report = lambda p: accuracy_report(p, split.answers, split.types, split.families)
    assert report(ranks[0]["merged"]) == report(want) and report(want)["count"] == 15


# ---------------------------------------------------------------- (c) checkpoints and resume


def _record_writes(root: str, writes: list):
    """An audit hook that records files created, opened for writing or renamed under root."""
    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, flags = args[0], args[2]
            writing = isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root):
            writes.append(f"{event} {os.fsdecode(path)}")
    return hook


def _train_and_resume(dctx, data: str, root: Path, single: str) -> dict:
    from fastfilm.engine import trainer as train_mod
    from fastfilm.engine.trainer import train

    writes: list[str] = []
    sys.addaudithook(_record_writes(str(root), writes))
    # The merged validation predictions the trainer reports on, epoch by epoch.
    val_preds, report = [], train_mod.accuracy_report
    train_mod.accuracy_report = lambda preds, *args: val_preds.append(preds.copy()) or report(preds, *args)
    # The model starts from weights whose answers depend on the image and the question, and a
    # small learning rate keeps them so for the run's 12 steps (checked on the result).
    import fastfilm.model

    fastfilm.model.ARCHITECTURES["film"] = sensitive_film(data)
    cfg = lambda out, **kw: tiny_cfg(data, root / out, epochs=2, batch_size=4, lr=1e-4, **kw)
    out = {"straight": train(cfg("straight"), model_config("tiny"))}
    out["val_preds"] = val_preds[-1]
    # Stops after step 1 of 12: the time budget is rank 0's verdict, heard by both ranks.
    out["cut"] = train(cfg("cut", max_minutes=1e-9), model_config("tiny"))
    train(cfg("unused", resume=str(root / "cut")), model_config("tiny"))
    try:
        train(cfg("unused", resume=single), model_config("tiny"))
    except UserError as e:
        out["other_world_error"] = str(e)
    return {**out, "writes": writes}


def test_checkpoint_and_resume_on_two_ranks(generated_clevr, single_run, tmp_path):
    from fastfilm.data.cache import load_split, prepare
    from fastfilm.data.loader import Loader
    from fastfilm.engine.trainer import train

    root = tmp_path / "runs"
    ranks = launch(_train_and_resume, tmp_path, str(generated_clevr), root, str(single_run))["results"]
    # Only rank 0 writes (and the audit hook does see its writes).
    assert ranks[1]["writes"] == []
    assert any(ckpt.LAST in w for w in ranks[0]["writes"])
    for run in ("straight", "cut"):
        assert {ckpt.LAST, ckpt.BEST, "best.json", "vocab.json", "metrics.json", "metrics.jsonl"} <= {
            p.name for p in (root / run).iterdir()}
    assert not (root / "unused").exists()
    for r in ranks:
        assert r["cut"]["stopped"] == "max_minutes" and r["cut"]["steps"] == 1
        drop = lambda m: {k: v for k, v in m.items() if k != "elapsed_s"}
        assert drop(r["straight"]) == drop(ranks[0]["straight"])  # every rank took the same decisions
    # Resumed mid-epoch on the same world size: exactly the uninterrupted run.
    a, b = last_state(root / "straight"), last_state(root / "cut")
    for part in ("model", "optimizer"):
        flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for k, v in flat_a.items():
            assert torch.equal(v, flat_b[k]) if isinstance(v, torch.Tensor) else v == flat_b[k], f"{part} {k}"
    assert json.loads(b["progress"])["step"] == 12 and b["meta"]["world_size"] == 2
    # The sharded, merged validation predictions are those of rank 0's weights (its batch norm
    # statistics included) evaluated in one process.
    model, _ = _load(root / "straight" / ckpt.LAST, torch.device("cpu"))
    val = load_split(prepare(generated_clevr, 32), "val")
    want = predict(model, Loader(val, 16, shuffle=False), torch.device("cpu"))
    # Answers that vary with the image and the question, none a near tie: a sensitive comparison.
    assert_sensitive(model, split_batch(generated_clevr, 32, "val"))
    for r in ranks:
        np.testing.assert_array_equal(r["val_preds"], want)
    line = [json.loads(l) for l in (root / "straight" / "metrics.jsonl").read_text().splitlines()][-1]
    report = accuracy_report(want, val.answers, val.types, val.families)
    assert (line["val_accuracy"], line["val_per_type"]) == (report["accuracy"], report["per_type"])
    # Another world size: a clear refusal, both ways.
    assert "trained by 1 process(es) and this launch has 2" in ranks[0]["other_world_error"]
    with pytest.raises(UserError, match=r"trained by 2 process\(es\) and this launch has 1.*torchrun and 2 processes"):
        train(tiny_cfg(generated_clevr, tmp_path / "x", resume=str(root / "straight")), model_config("tiny"))


def _flatten(state, prefix: str = "") -> dict:
    """Leaves (tensors, numbers, strings, None) of a nested state dict by dotted path."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: state}


# ---------------------------------------------------------------- (d) failures


def _fail_on_rank_1(dctx, data: str, root: Path) -> dict:
    from fastfilm.engine import step as step_mod
    from fastfilm.engine.trainer import train

    if dctx.rank == 1:
        real, calls = step_mod.TrainStep.__call__, []

        def failing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure on rank 1")
            return real(self, *args, **kwargs)

        step_mod.TrainStep.__call__ = failing
    t0 = time.monotonic()
    try:
        train(tiny_cfg(data, root / "run", epochs=2), model_config("tiny"))
    except Exception as e:
        if dctx.rank == 1:
            raise
        return {"error": str(e), "comm": distributed.is_comm_error(e), "seconds": time.monotonic() - t0}
    return {"error": None}


def test_a_failing_rank_fails_the_others_at_once(generated_clevr, tmp_path):
    """Rank 1 raises at its second step; its process group is destroyed on the way out, so
    rank 0's pending collective fails at once rather than after the 60 s timeout."""
    job = launch(_fail_on_rank_1, tmp_path, str(generated_clevr), tmp_path, expect_ok=False)
    assert "injected failure on rank 1" in job["errors"][1] and job["codes"][1] != 0
    rank0 = job["results"][0]
    assert rank0["error"] and rank0["comm"], rank0
    assert rank0["seconds"] < 30, rank0


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - t0


STALL = """
import os, sys, time
from fastfilm.engine import step as step_mod
from fastfilm.cli import main

if os.environ["RANK"] == "1":
    real, calls = step_mod.TrainStep.__call__, []

    def stalled(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(120)  # far beyond the 10 s timeout; bounded in case nothing kills it
        return real(self, *args, **kwargs)

    step_mod.TrainStep.__call__ = stalled
sys.exit(main(sys.argv[1:]))
"""


def test_a_stalled_rank_brings_the_job_down_after_the_timeout(generated_clevr, tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    proc, seconds = _torchrun([str(script), "train", str(generated_clevr), "--out", str(tmp_path / "run"),
                               "--preset", "tiny", "--epochs", "1", "--batch-size", "8", "--reference",
                               "--device", "cpu", "--dist-timeout-s", "10"], timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "rank 0 of 2: a collective operation failed" in out and "--dist-timeout-s 10 s" in out, out
    assert 10 <= seconds < 120, out


def test_torchrun_module_entry_point(generated_clevr, tmp_path):
    proc, _ = _torchrun(["-m", "fastfilm", "train", str(generated_clevr), "--out", str(tmp_path / "run"),
                         "--preset", "tiny", "--epochs", "1", "--batch-size", "8", "--reference", "--device", "cpu"],
                        timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3  # 48 questions / (2 ranks x 8)
    assert proc.stdout.count("val accuracy") == 1  # only rank 0 reports


# ---------------------------------------------------------------- compile inside DDP


def _compiled_and_eager_grads(dctx, data: str) -> dict:
    from fastfilm.data.cache import load_split, prepare
    from fastfilm.data.loader import Loader
    from fastfilm.config import FastConfig
    from fastfilm.data.vocab import Vocab
    from fastfilm.engine.batching import length_buckets
    from fastfilm.engine.build import build, build_optimizer
    from fastfilm.engine.options import resolve
    from fastfilm.engine.step import TrainStep

    cache = prepare(data, 32)
    vocab = Vocab.load(cache / "vocab.json")
    split = load_split(cache, "train")
    loader = Loader(split, B, shuffle=True, shard=(dctx.rank, dctx.world_size),
                    buckets=length_buckets(split.questions.shape[1]))
    batch = next(loader.epoch(0))
    out = {}
    for compile in (False, True):
        # The default fast model: fused op, per-rank batch norm.
        ex = resolve(FastConfig(amp="off", compile=compile), dctx.device)
        torch.manual_seed(0)
        model = build(model_config("tiny"), vocab, ex)
        step = TrainStep(distributed.wrap(model, dctx, compile=compile, sync_bn=False),
                         build_optimizer(model, 3e-3, 1e-5, ex), ex)
        model.train()
        loss, _ = step.loss(batch.images, batch.questions, batch.lengths, batch.answers,
                            torch.ones(len(batch), device=dctx.device))
        loss.backward()  # DDP averages the gradients over ranks here
        out[compile] = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "buffers": {n: b.clone() for n, b in model.named_buffers()}}
    return out


@pytest.mark.slow
def test_compiled_model_inside_ddp_matches_eager(generated_clevr, tmp_path):
    """torch.compile inside DDP (the trainer's default under torchrun): the same loss, averaged
    gradients and batch norm statistics as eager DDP, and the same gradients on both ranks."""
    ranks = launch(_compiled_and_eager_grads, tmp_path, str(generated_clevr), timeout=400)["results"]
    for r, res in enumerate(ranks):
        eager, compiled = res[False], res[True]
        # Inductor fuses and reorders fp32 sums: noise relative to each tensor's largest gradient,
        # with a floor for the gradients that are 0 in exact arithmetic (biases before a BN).
        assert_close(compiled["loss"], eager["loss"], f"rank {r} loss", atol=0, rtol=1e-5)
        scale = max(g.abs().max().item() for g in eager["grads"].values())
        for n, g in eager["grads"].items():
            assert_close(compiled["grads"][n], g, f"rank {r} gradient of {n}",
                         atol=5e-5 * g.abs().max().item() + 1e-6 * scale, rtol=0)
        for n, b in eager["buffers"].items():
            assert_close(compiled["buffers"][n], b, f"rank {r} buffer {n}", atol=1e-6, rtol=1e-4)
    for n, g in ranks[0][True]["grads"].items():
        assert torch.equal(ranks[1][True]["grads"][n], g), n
    assert not torch.equal(ranks[0][True]["loss"], ranks[1][True]["loss"])  # different shards


# ---------------------------------------------------------------- in one process


def test_global_batch_norm_is_batch_norm_without_a_process_group():
    import copy

    from fastfilm.model import build_model

    model = build_model(model_config("tiny"), 20, 10)
    plain = copy.deepcopy(model)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    norm.convert_sync_batchnorm(model)
    assert {type(m) for m in model.modules()} & {torch.nn.BatchNorm1d, torch.nn.BatchNorm2d} == set()
    # 2 in the stem, 1 per ResBlock, the classifier's 2d and 1d.
    assert sum(isinstance(m, norm.GlobalBatchNorm) for m in model.modules()) == 6
    # The same tensors under the same keys: optimizer and checkpoints are unaffected.
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    q, lengths = torch.randint(1, 20, (6, 7)), torch.full((6,), 7)
    for training in (True, False):
        model.train(training), plain.train(training)
        torch.testing.assert_close(model(x, q, lengths), plain(x, q, lengths), rtol=0, atol=0)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_single_process_session_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session("cpu", 5) as dctx:
        assert (dctx.rank, dctx.world_size, dctx.enabled, dctx.is_main) == (0, 1, False, True)
        assert not dist.is_initialized()
        assert dctx.totals(torch.tensor(2.5), torch.tensor(3), 4, True) == (2.5, 3, 4, True)
        preds = np.array([1, -1, 2])
        assert dctx.merge_predictions(preds) is preds
        assert dctx.broadcast_flag(False) is False


@pytest.mark.parametrize("env, timeout, match", [
    ({"WORLD_SIZE": "2"}, 5, "RANK is missing"),
    ({"WORLD_SIZE": "two"}, 5, "WORLD_SIZE='two'"),
    ({}, 0, "--dist-timeout-s must be > 0"),
])
def test_session_rejects_a_bad_launch(monkeypatch, env, timeout, match):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=match):
        with distributed.session("cpu", timeout):
            pass
