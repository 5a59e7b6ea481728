"""The CLI is derived from the config dataclasses one to one."""
import dataclasses
import subprocess
import sys

import pytest

from fastfilm import config as C
from fastfilm.cli import COMMANDS, build_parser, split_namespace

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


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_is_a_flag_with_help(command):
    cls = COMMANDS[command][0]
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_model_flags_override_preset():
    ns = build_parser().parse_args(["train", "DATA", "--preset", "cpu", "--no-coords", "--gamma", "tanh",
                                    "--num-blocks", "2", "--lr", "1e-3"])
    cfg, overrides = split_namespace("train", ns)
    assert cfg.lr == 1e-3 and cfg.preset == "cpu"
    model = C.model_config(cfg.preset, **overrides)
    assert (model.coords, model.gamma, model.num_blocks) == (False, "tanh", 2)
    assert model.channels == C.PRESETS["cpu"]["channels"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        C.model_config("huge")


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "fastfilm", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--max-minutes" in out.stdout and "--preset" in out.stdout and "--film-position" in out.stdout


def test_plot_takes_several_runs():
    cfg, _ = split_namespace("plot", build_parser().parse_args(["plot", "a", "b", "--out", "x.png"]))
    assert cfg.runs == ("a", "b") and cfg.out == "x.png"
