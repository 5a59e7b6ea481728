"""The CLI is derived from the config dataclasses one to one."""
import argparse
import dataclasses
import subprocess
import sys

import pytest

from fastfilm import config as C
from fastfilm.cli import COMMANDS, MODEL_FLAGS_FOR, build_parser, split_namespace

POSITIONAL = {"generate": ["OUT"], "preprocess": ["DATA"], "train": ["DATA"], "eval": ["CKPT", "DATA"],
              "answer": ["CKPT"], "quickstart": [], "analyze": ["RUN", "DATA"], "plot": ["RUN"]}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_defaults_equal_dataclass_defaults(command):
    cls = COMMANDS[command][0]
    ns = build_parser().parse_args([command, *POSITIONAL[command]])
    cfg, overrides = split_namespace(command, ns)
    positional = [f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    expected = cls(**dict(zip(positional, POSITIONAL[command])))
    assert cfg == expected
    assert overrides == {}


def _flag_fields(cls, only=None, prefix=""):
    """(argparse destination, field) of every flag a config contributes, nested configs included."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if "nested" in f.metadata:
            yield from _flag_fields(f.metadata["nested"], f.metadata["only"], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_is_a_flag_with_help(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices[command]._actions}
    flags = list(_flag_fields(COMMANDS[command][0]))
    if command in MODEL_FLAGS_FOR:
        flags += list(_flag_fields(C.ModelConfig))
    for dest, f in flags:
        assert f.metadata.get("help"), f"{dest} has no help text"
        action = actions[dest]
        assert action.help.startswith(f.metadata["help"]), dest
        if not f.metadata.get("positional"):
            assert action.option_strings[0] == "--" + f.name.replace("_", "-"), dest


def test_nested_flags_reach_the_nested_configs():
    """The quickstart's generator and trainer flags are declared once, in GenerateConfig and
    TrainConfig, and land in its nested configs; unexposed fields keep the nested defaults."""
    ns = build_parser().parse_args(["quickstart", "--train-images", "10", "--lr", "0.01", "--no-fused", "--seed", "3"])
    cfg, _ = split_namespace("quickstart", ns)
    assert (cfg.generate.train_images, cfg.train.lr, cfg.train.fused, cfg.train.seed) == (10, 0.01, False, 3)
    assert cfg.generate.val_images == 300 and cfg.train.patience == 0 and cfg.train.compile is False
    assert cfg == C.QuickstartConfig(generate=C.GenerateConfig(**{**dataclasses.asdict(C.QuickstartConfig().generate),
                                                                   "train_images": 10}),
                                     train=C.TrainConfig(**{**dataclasses.asdict(C.QuickstartConfig().train),
                                                            "lr": 0.01, "fused": False, "seed": 3}))


@pytest.mark.parametrize("args, flag", [
    (["train", "D", "--film-blocks", "0,9"], "--film-blocks"),
    (["train", "D", "--batch-size", "0"], "--batch-size"),
    (["train", "D", "--lr", "nan"], "--lr"),
    (["train", "D", "--lr", "-1"], "--lr"),
    (["train", "D", "--epochs", "0"], "--epochs"),
    (["train", "D", "--max-minutes", "-1"], "--max-minutes"),
    (["train", "D", "--conv2-kernel", "2"], "--conv2-kernel"),
    (["eval", "C", "D", "--batch-size", "-3"], "--batch-size"),
    (["quickstart", "--film-minutes", "-2"], "--film-minutes"),
])
def test_bad_values_are_one_line_naming_the_flag(args, flag, capsys, tmp_path):
    from fastfilm.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0], err


def test_unknown_preset_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "D", "--preset", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def test_model_flags_override_preset():
    ns = build_parser().parse_args(["train", "DATA", "--preset", "cpu", "--no-coords", "--gamma", "tanh",
                                    "--num-blocks", "2", "--lr", "1e-3"])
    cfg, overrides = split_namespace("train", ns)
    assert cfg.lr == 1e-3 and cfg.preset == "cpu"
    model = C.model_config(cfg.preset, **overrides)
    assert (model.coords, model.gamma, model.num_blocks) == (False, "tanh", 2)
    assert model.channels == C.PRESETS["cpu"]["channels"]


def test_recipe_flags_default_to_the_preset_and_say_its_values():
    """--lr, --batch-size, --weight-decay, --group-questions: None (the preset's value, resolved
    by config.train_recipe) unless given, parsed as numbers when given, and --help names each
    preset's value."""
    cfg, _ = split_namespace("train", build_parser().parse_args(["train", "DATA", "--preset", "cpu"]))
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.group_questions) == (None, None, None, None)
    cfg, _ = split_namespace("train", build_parser().parse_args(
        ["train", "DATA", "--lr", "2e-3", "--batch-size", "32", "--weight-decay", "0", "--group-questions", "2"]))
    assert (cfg.lr, cfg.batch_size, cfg.weight_decay, cfg.group_questions) == (2e-3, 32, 0.0, 2)
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.lr, float)
    out = subprocess.run([sys.executable, "-m", "fastfilm", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    flat = " ".join(out.split())
    assert "preset: paper 3e-4, cpu " in flat and "(default: preset)" in flat


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(C.UserError, match="--preset 'huge'"):
        C.model_config("huge")


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "fastfilm", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--max-minutes" in out.stdout and "--preset" in out.stdout and "--film-position" in out.stdout


def test_plot_takes_several_runs():
    cfg, _ = split_namespace("plot", build_parser().parse_args(["plot", "a", "b", "--out", "x.png"]))
    assert cfg.runs == ("a", "b") and cfg.out == "x.png"


@pytest.mark.parametrize("flag", ["compile", "fused", "channels_last"])
def test_fast_path_switches_default_to_auto_and_still_override(flag):
    """--fused/--no-fused (etc.) set the switch; no flag leaves it None, resolved per machine
    kind (engine/options.py), and --help says 'auto'."""
    parser = build_parser()
    option = "--" + flag.replace("_", "-")
    for args, expected in (([], None), ([option], True), ([option.replace("--", "--no-")], False)):
        cfg, _ = split_namespace("train", parser.parse_args(["train", "D", *args]))
        assert getattr(cfg, flag) is expected, args
    train = parser._subparsers._group_actions[0].choices["train"]
    action = next(a for a in train._actions if a.dest == flag)
    assert action.option_strings == [option, option.replace("--", "--no-")]
    assert action.help.endswith("(default: auto)")
    assert C.FastConfig().amp == "auto" and "auto" in C.FastConfig.__dataclass_fields__["amp"].metadata["choices"]
