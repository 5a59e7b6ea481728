"""The CLI is derived from the config dataclasses one to one."""
import argparse
import dataclasses
import subprocess
import sys

import pytest

from fastfilm import config as C
from fastfilm.cli import COMMANDS, MODEL_FLAGS_FOR, build_parser, split_namespace

POSITIONAL = {"generate": ["OUT"], "preprocess": ["DATA"], "train": ["DATA"], "eval": ["CKPT", "DATA"],
              "answer": ["CKPT"], "quickstart": []}


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
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices[command]._actions}
    classes = [COMMANDS[command][0], *([C.ModelConfig] if command in MODEL_FLAGS_FOR else [])]
    for f in (f for cls in classes for f in dataclasses.fields(cls)):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        action = actions[f.name]
        assert action.help.startswith(f.metadata["help"]), f.name
        if not f.metadata.get("positional"):
            assert action.option_strings[0] == "--" + f.name.replace("_", "-"), f.name


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
