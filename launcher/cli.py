"""Command-line flags <-> typed config: every dataclass field is a flag of the same name and a key of
config.yaml. `--config FILE` reads a run's config.yaml first; flags given after it override it."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from softprompt.config import SECTIONS, ConfigError, RunConfig, choices
from softprompt.io import read_yaml

from .args import HelpFormatter


def _arg_type(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `str | None` -> str
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (typing.Literal, dict) or annotation is dict:
        return str  # Literal choices are strings; a dict (ds_config) comes only from config.yaml
    return annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Soft prompt tuning of a frozen T5/mT5 under DeepSpeed. Run as `deepspeed train.py ...` "
                    "(any number of ranks), `python train.py ...` or `softprompt-train ...` (one process).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a run's config.yaml (written into every --output_dir): its settings become the "
                             "defaults, and the flags given here override them")
    for title, cls in SECTIONS.items():
        group = parser.add_argument_group(title, cls.__doc__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _arg_type(hints[f.name])
            if kind is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                   help=f.metadata["help"])
            else:
                group.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"],
                                   choices=choices(cls, f.name), metavar=None if choices(cls, f.name) else
                                   kind.__name__.upper())
    # Set by the deepspeed launcher; the rank really comes from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parse(argv: list[str] | None = None) -> RunConfig:
    """Flags (and --config FILE) -> RunConfig; bad input raises ConfigError (exit code 2)."""
    parser = build_parser()
    parser.__class__ = _Parser  # one-line errors with exit code 2, like every other input error
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        values = read_yaml(pre.config)
        RunConfig.from_dict(values, f"--config {pre.config}")  # unknown keys and bad values, named by the file
        parser.set_defaults(**{k: v for section in values.values() for k, v in (section or {}).items()})
    ns = vars(parser.parse_args(argv))
    return RunConfig(**{title: cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)})
                        for title, cls in SECTIONS.items()})
