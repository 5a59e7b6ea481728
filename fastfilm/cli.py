"""`fastfilm` command line, derived one to one from the dataclasses in fastfilm/config.py.

Each subcommand is (config dataclass, "module:function"); the module is imported only when
its subcommand runs, so that `fastfilm --help` does not pay for torch's start-up. A field is
a flag, its `help` metadata the flag's help; `positional=True` makes it an argument; a
`nested(...)` field contributes the flags it names from another config; `optional=True` lets a
positional argument be left out.

Errors: a user's mistake (UserError) prints one line and exits 2; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing

from fastfilm import config as C
from fastfilm.errors import UserError

COMMANDS: dict[str, tuple[type, str, str]] = {
    "generate": (C.GenerateConfig, "fastfilm.data.generate:run",
                 "write a CLEVR v1.0-layout dataset (PNG images, scenes, questions with programs)"),
    "preprocess": (C.PreprocessConfig, "fastfilm.data.cache:run",
                   "decode and resize images once into a memory-mapped cache with tokenized questions"),
    "train": (C.TrainConfig, "fastfilm.commands.train:run",
              "train a FiLM model (or a baseline) on a CLEVR-layout dataset"),
    "eval": (C.EvalConfig, "fastfilm.commands.eval:run", "accuracy of a checkpoint: overall, per type, per family"),
    "answer": (C.AnswerConfig, "fastfilm.commands.answer:run", "answer a question about one image"),
    "quickstart": (C.QuickstartConfig, "fastfilm.commands.quickstart:run",
                   "generate a small dataset, train FiLM and the Table 1 baselines, print the per-type table"),
    "analyze": (C.AnalyzeConfig, "fastfilm.commands.analyze:run", "gamma/beta histograms, embedding, ablations"),
    "plot": (C.PlotConfig, "fastfilm.commands.plot:run", "learning curves of one or more runs, overlaid, as a PNG"),
}
# `train` also takes every ModelConfig field; its defaults come from --preset.
MODEL_FLAGS_FOR = ("train",)


def _own_fields_first(cls: type) -> list[dataclasses.Field]:
    """cls's fields, those it declares itself before those it inherits (its own are the
    command's main flags; inherited ones, like the fast-path switches, come after)."""
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in inherited] + [f for f in fields if f.name in inherited]


def add_dataclass_arguments(parser, cls: type, *, defaults_from_preset: bool = False, prefix: str = "",
                            only: tuple[str, ...] | None = None, defaults: dict | None = None) -> None:
    """One argparse argument per dataclass field (positional when metadata says so). Nested
    configs add the flags they expose; `prefix` keeps their destinations apart ("train.lr")."""
    hints = typing.get_type_hints(cls)
    for f in _own_fields_first(cls):
        if only is not None and f.name not in only:
            continue
        if "nested" in f.metadata:
            add_dataclass_arguments(parser, f.metadata["nested"], prefix=f"{prefix}{f.name}.",
                                    only=f.metadata["only"], defaults=f.metadata["defaults"])
            continue
        typ, help_text, dest = hints[f.name], f.metadata.get("help", ""), prefix + f.name
        if f.metadata.get("positional"):
            # optional: may be left out (nargs "?"); the command says when it is needed.
            extra = {"nargs": "?", "default": f.default} if f.metadata.get("optional") else {"nargs": f.metadata.get("nargs")}
            parser.add_argument(dest, type=f.metadata.get("type", typ), help=help_text, **extra)
            continue
        default = (defaults or {}).get(f.name, f.default)
        tristate = typ == bool | None  # None: "auto", resolved for the machine (engine/options.py)
        # None for a number: the --preset's value (config.TRAIN_PRESETS), named in the help.
        from_preset = typ in (int | None, float | None) and default is None
        if typ in (int | None, float | None):
            typ = int if typ == int | None else float
        shown = ("preset" if defaults_from_preset or from_preset else "auto" if tristate and default is None
                 else repr(default))
        kwargs: dict = {"dest": dest, "default": None if defaults_from_preset else default,
                        "help": f"{help_text} (default: {shown})"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        flag = "--" + f.name.replace("_", "-")
        if typ is bool or tristate:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=typ, metavar=None if "choices" in kwargs else f.name.upper(), **kwargs)


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


def _build(cls: type, values: dict, prefix: str = "", defaults: dict | None = None):
    """cls from the parsed values under `prefix`; fields without a flag keep `defaults` or cls's."""
    kwargs = dict(defaults or {})
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            kwargs[f.name] = _build(f.metadata["nested"], values, f"{prefix}{f.name}.", f.metadata["defaults"])
        elif prefix + f.name in values:
            kwargs[f.name] = values[prefix + f.name]
    return cls(**kwargs)


def split_namespace(command: str, ns: argparse.Namespace) -> tuple[object, dict]:
    """(command config, model overrides) from parsed arguments."""
    values = vars(ns)
    cfg = _build(COMMANDS[command][0], values)
    overrides = {}
    if command in MODEL_FLAGS_FOR:
        overrides = {f.name: values[f.name] for f in dataclasses.fields(C.ModelConfig) if values[f.name] is not None}
    return cfg, overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, overrides = split_namespace(args.command, args)
        C.validate(cfg)
        module, fn = COMMANDS[args.command][1].split(":")
        run = getattr(importlib.import_module(module), fn)
        result = run(cfg, **({"model_overrides": overrides} if args.command in MODEL_FLAGS_FOR else {}))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"fastfilm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)
