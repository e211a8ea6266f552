"""Command-line flags <-> typed config: every dataclass field is a flag of the same name."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from softprompt.config import DataConfig, ModelConfig, RunConfig, TrainConfig

SECTIONS = (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig))


def _arg_type(annotation):
    hint = typing.get_origin(annotation)
    if hint in (typing.Union, types.UnionType):  # `str | None` -> str
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Soft prompt tuning of a frozen T5/mT5 under DeepSpeed ZeRO-3. "
        "Run as `deepspeed train.py ...` (any number of ranks) or `python train.py ...` (one process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for title, cls in SECTIONS:
        group = parser.add_argument_group(title, cls.__doc__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _arg_type(hints[f.name])
            if kind is bool:
                group.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
            else:
                group.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"],
                                   metavar=kind.__name__.upper())
    # Set by the deepspeed launcher; the rank really comes from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def parse(argv: list[str] | None = None) -> RunConfig:
    """Flags -> RunConfig; the dataclasses' __post_init__ checks raise ConfigError."""
    ns = vars(build_parser().parse_args(argv))
    parts = {}
    for title, cls in SECTIONS:
        parts[title] = cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)})
    return RunConfig(**parts)
