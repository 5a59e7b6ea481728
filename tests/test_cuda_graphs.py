"""--cuda-graphs: one FastConfig switch for train, eval and answer; off with a one-line note
anywhere but CUDA; the training step graphs only the compiled fast path and the Predictor any
model, both handing out copies of the graphs' outputs. On CUDA (gpu-marked): graphed training
and inference equal eager ones, with no graph skipped."""
from __future__ import annotations

import copy

import pytest
import torch

from fastfilm.cli import build_parser, main, split_namespace
from fastfilm.config import FastConfig, model_config
from fastfilm.engine import options, predictor as predictor_mod, step as step_mod
from fastfilm.engine.options import Execution, resolve
from fastfilm.engine.predictor import Predictor
from fastfilm.engine.step import TrainStep
from fastfilm.model.fast import FastFiLMNet
from fastfilm.model.reference import FiLMNet
from test_fastpath import ANSWERS, FP32, VOCAB, batch, close

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA: a device object; nothing runs there off the gpu tests


@pytest.fixture
def fresh_notes(monkeypatch):
    """options.note says each line once per process: start from none said."""
    monkeypatch.setattr(options, "_NOTED", set())


@pytest.fixture
def compile_calls(monkeypatch):
    """engine.compile.compiled, as the step and the predictor call it, recorded and replaced by
    the function itself (what is chosen, not what inductor makes of it)."""
    calls = []

    def fake(fn, **kw):
        calls.append(kw)
        return fn
    monkeypatch.setattr(step_mod, "compiled", fake)
    monkeypatch.setattr(predictor_mod, "compiled", fake)
    return calls


def tiny(fast: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return (FastFiLMNet if fast else FiLMNet)(model_config("tiny"), VOCAB, ANSWERS)


def test_one_flag_for_train_eval_and_answer():
    parser = build_parser()
    for command, args, get in (("train", ["D"], lambda c: c.cuda_graphs), ("eval", ["C", "D"], lambda c: c.cuda_graphs),
                               ("answer", ["C"], lambda c: c.fast.cuda_graphs)):
        assert get(split_namespace(command, parser.parse_args([command, *args]))[0]) is False
        assert get(split_namespace(command, parser.parse_args([command, *args, "--cuda-graphs"]))[0]) is True
    answer = split_namespace("answer", parser.parse_args(["answer", "C", "--cuda-graphs"]))[0]
    assert answer.fast.reference and not answer.fast.compile  # answer keeps its eager oracle


def test_off_cuda_it_is_off_with_one_line(fresh_notes, capsys):
    for cfg in (FastConfig(cuda_graphs=True), FastConfig(cuda_graphs=True, reference=True, amp="off", compile=False,
                                                         fused=False, channels_last=False)):
        assert resolve(cfg, CPU).cuda_graphs is False
    err = [line for line in capsys.readouterr().err.splitlines() if "graphs" in line]
    assert len(err) == 1 and "--cuda-graphs" in err[0] and "cpu" in err[0] and "without them" in err[0]
    assert resolve(FastConfig(), CPU).cuda_graphs is False and "graphs" not in capsys.readouterr().err


def test_on_cuda_it_is_on_for_the_fast_path_and_the_oracle(monkeypatch, fresh_notes, capsys):
    monkeypatch.setattr(options, "machine_kind", lambda device: "cuda-sm90")  # no GPU asked
    ex = resolve(FastConfig(cuda_graphs=True, amp="off"), CUDA)
    assert ex.cuda_graphs is True and "CUDA graphs" in capsys.readouterr().err  # the line saying what runs
    assert resolve(FastConfig(cuda_graphs=True, reference=True, amp="off", compile=False, fused=False,
                              channels_last=False), CUDA).cuda_graphs is True
    assert resolve(FastConfig(amp="off"), CUDA).cuda_graphs is False


def test_training_step_graphs_only_the_compiled_fast_path(compile_calls, fresh_notes, capsys):
    graphs = Execution(device=CPU, compile=True, cuda_graphs=True)  # as resolve() gives it on CUDA
    model = tiny()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), graphs)
    assert step.cuda_graphs and compile_calls[-1]["mode"] == "reduce-overhead"
    assert capsys.readouterr().err == ""
    plain = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), Execution(device=CPU, compile=True))
    assert not plain.cuda_graphs and compile_calls[-1]["mode"] is None
    n = len(compile_calls)
    for model, ex in ((tiny(fast=False), graphs), (tiny(), Execution(device=CPU, cuda_graphs=True))):
        s = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), ex)
        assert not s.cuda_graphs and s.loss == s._loss
    assert len(compile_calls) == n  # neither the reference nor the uncompiled fast model is compiled
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graphs" in err[0] and "compiled fast path" in err[0]


def test_graphed_step_marks_each_step_and_hands_out_copies(compile_calls, monkeypatch):
    """Each replay overwrites the graph's outputs: the step starts a new graph step, and returns
    copies (equal values, other storage) of the loss and the correct count."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = tiny()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), Execution(device=CPU, compile=True,
                                                                                 cuda_graphs=True))
    outputs = []
    loss_fn = step.loss
    step.loss = lambda *a: outputs.append(loss_fn(*a)) or outputs[-1]
    for i in range(2):
        loss, correct = step(*batch(seed=i))
        graph_loss, graph_correct = outputs[-1]
        assert loss.data_ptr() != graph_loss.data_ptr() and correct.data_ptr() != graph_correct.data_ptr()
        assert torch.equal(loss, graph_loss.detach()) and torch.equal(correct, graph_correct)
    assert len(marks) == 2


def test_predictor_graphs_any_model_with_static_shapes(compile_calls, monkeypatch):
    fast, ref = tiny(), tiny(fast=False)
    p = Predictor(fast, Execution(device=CUDA, compile=True, cuda_graphs=True), batch_size=8)
    assert p.cuda_graphs and compile_calls[-1]["mode"] == "reduce-overhead" and p.padding.static
    p = Predictor(ref, Execution(device=CUDA, reference=True, cuda_graphs=True), batch_size=8)
    assert compile_calls[-1]["backend"] == "cudagraphs" and not compile_calls[-1]["fullgraph"] and p.padding.static
    assert not Predictor(ref, Execution(device=CUDA, reference=True), batch_size=8).padding.static
    with pytest.raises(ValueError, match="CUDA"):  # resolve() never asks this of a CPU
        Predictor(fast, Execution(device=CPU, cuda_graphs=True))
    # The call path (run on the CPU with the compile replaced): a new graph step per batch,
    # a padded partial batch cut back, and a copy of the graph's output.
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    outputs = []
    forward = p.forward
    p.forward = lambda *a: outputs.append(forward(*a)) or outputs[-1]
    ref.eval()
    for b in (8, 3):
        images, q, lengths, _ = batch(b=b, seed=b)
        logits = p(images, q, lengths)
        assert outputs[-1].shape[0] == 8 and logits.shape[0] == b
        assert logits.data_ptr() != outputs[-1].data_ptr()
        with torch.no_grad():
            close(logits, ref(images, q, lengths), f"batch {b}", **FP32)
    assert len(marks) == 2


@pytest.mark.slow
def test_commands_on_the_cpu_run_without_graphs_and_say_so(generated_clevr, tmp_path, capsys, fresh_notes):
    """train, eval and answer given --cuda-graphs on a CPU: one note each, and the same results
    as without the flag."""
    common = ["--preset", "tiny", "--epochs", "1", "--batch-size", "16", "--reference", "--device", "cpu"]
    runs = {}
    for graphs in ([], ["--cuda-graphs"]):
        run = tmp_path / f"run{len(graphs)}"
        assert main(["train", str(generated_clevr), "--out", str(run), *common, *graphs]) == 0
        runs[bool(graphs)] = run
        assert ("CUDA graphs need a CUDA device" in capsys.readouterr().err) == bool(graphs)
        options._NOTED.clear()
    assert (runs[False] / "metrics.json").read_text().split('"elapsed_s"')[0] == \
        (runs[True] / "metrics.json").read_text().split('"elapsed_s"')[0]
    image = next((generated_clevr / "images" / "val").glob("*.png"))
    outputs = {}
    for graphs in ([], ["--cuda-graphs"]):
        assert main(["eval", str(runs[False]), str(generated_clevr), "--reference", "--device", "cpu", *graphs]) == 0
        assert main(["answer", str(runs[False]), "--image", str(image), "--question", "What color is the cube?",
                     "--device", "cpu", *graphs]) == 0
        out = capsys.readouterr()
        outputs[bool(graphs)] = out.out
        assert out.err.count("CUDA graphs need a CUDA device") == (1 if graphs else 0), out.err
        options._NOTED.clear()
    assert outputs[True] == outputs[False]


# ---------------------------------------------------------------- on CUDA

@pytest.mark.gpu
@pytest.mark.slow  # three inductor compilations (two training shapes, one inference shape)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphed_training_and_inference_match_eager():
    """The compiled fast model on CUDA with --cuda-graphs, fp32, against the same model eager:
    three SGD steps on a row per question and three grouped by image (a shape's first call
    warms up, the second records, the third replays), then inference batches (full and padded)
    from recorded graphs; every loss, the weights after the steps and the logits agree, and no
    graph was skipped (a CPU tensor or an unsupported mutation in the graph would make
    inductor fall back without an error)."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    skips = counters["inductor"]["cudagraph_skips"]
    models, steps, predictors = {}, {}, {}
    for graphs in (False, True):
        ex = Execution(device=CUDA, compile=graphs, fused=True, channels_last=True, cuda_graphs=graphs)
        models[graphs] = tiny().to(CUDA)
        # A small lr: rounding differences between compiled and eager grow with each step.
        steps[graphs] = TrainStep(models[graphs], torch.optim.SGD(models[graphs].parameters(), lr=0.01), ex)
        predictors[graphs] = Predictor(models[graphs], ex, batch_size=8)
    assert steps[True].cuda_graphs and predictors[True].cuda_graphs and not steps[False].cuda_graphs
    index = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3], device=CUDA)
    for i, grouped in enumerate([False] * 3 + [True] * 3):
        images, q, lengths, answers = (t.to(CUDA) for t in batch(length=8, seed=i))
        kw = dict(image_index=index) if grouped else {}
        images = images[:4] if grouped else images
        losses = [steps[g](images, q, lengths, answers, **kw)[0] for g in (False, True)]
        close(losses[1], losses[0], f"step {i} loss", **FP32)
    for name, p in models[False].named_parameters():
        close(dict(models[True].named_parameters())[name], p, f"after 6 steps: {name}", **FP32)
    for b in (8, 8, 8, 3):
        images, q, lengths, _ = (t.to(CUDA) for t in batch(b=b, length=8, seed=20 + b))
        close(predictors[True](images, q, lengths), predictors[False](images, q, lengths), f"eval {b}", **FP32)
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False) is not None
