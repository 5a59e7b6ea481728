"""`fastfilm` command line, derived one to one from the dataclasses in fastfilm/config.py.

Each subcommand is (config dataclass, "module:function"); the function is imported only
when its subcommand runs, so `fastfilm --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing

from fastfilm import config as C
from fastfilm.analysis import config as A
from fastfilm.errors import UserError

COMMANDS: dict[str, tuple[type, str, str]] = {
    "generate": (C.GenerateConfig, "fastfilm.data.generate:run",
                 "write a CLEVR v1.0-layout dataset (PNG images, scenes, questions with programs)"),
    "preprocess": (C.PreprocessConfig, "fastfilm.data.cache:run",
                   "decode and resize images once into a memory-mapped cache with tokenized questions"),
    "train": (C.TrainConfig, "fastfilm.train:run", "train a FiLM model (or a baseline) on a CLEVR-layout dataset"),
    "eval": (C.EvalConfig, "fastfilm.evaluate:run", "accuracy of a checkpoint: overall, per type, per family"),
    "answer": (C.AnswerConfig, "fastfilm.inference:run", "answer a question about one image"),
    "quickstart": (C.QuickstartConfig, "fastfilm.quickstart:run",
                   "generate a small dataset, train FiLM and the Table 1 baselines, print the per-type table"),
    "analyze": (A.AnalyzeConfig, "fastfilm.commands.analyze:run", "gamma/beta histograms, embedding, ablations"),
    "plot": (A.PlotConfig, "fastfilm.commands.plot:run", "learning curves of one or more runs, overlaid, as a PNG"),
}
# `train` also takes every ModelConfig field; its defaults come from --preset.
MODEL_FLAGS_FOR = ("train",)


def _type_of(f: dataclasses.Field, hints: dict) -> type:
    return hints[f.name]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, defaults_from_preset: bool = False) -> None:
    """One argparse argument per dataclass field (positional when metadata says so)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = _type_of(f, hints)
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=f.metadata.get("type", typ), help=help_text,
                                nargs=f.metadata.get("nargs"))
            continue
        flag = "--" + f.name.replace("_", "-")
        default = None if defaults_from_preset else f.default
        shown = "preset" if defaults_from_preset else repr(f.default)
        kwargs: dict = {"dest": f.name, "default": default, "help": f"{help_text} (default: {shown})"}
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, type=typ, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfilm",
        description="Train, verify and serve FiLM visual-reasoning models on CLEVR-style data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, _, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=(cls.__doc__ or summary).strip())
        add_dataclass_arguments(p, cls)
        if name in MODEL_FLAGS_FOR:
            group = p.add_argument_group("model (defaults from --preset; the paper's values for 'paper')")
            add_dataclass_arguments(group, C.ModelConfig, defaults_from_preset=True)
    return parser


def split_namespace(command: str, ns: argparse.Namespace) -> tuple[object, dict]:
    """(command config, model overrides) from parsed arguments."""
    cls = COMMANDS[command][0]
    values = vars(ns)
    cfg = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
    overrides = {}
    if command in MODEL_FLAGS_FOR:
        overrides = {f.name: values[f.name] for f in dataclasses.fields(C.ModelConfig) if values[f.name] is not None}
    return cfg, overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, overrides = split_namespace(args.command, args)
    module, fn = COMMANDS[args.command][1].split(":")
    run = getattr(importlib.import_module(module), fn)
    try:
        result = run(cfg, **({"model_overrides": overrides} if args.command in MODEL_FLAGS_FOR else {}))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"fastfilm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)
