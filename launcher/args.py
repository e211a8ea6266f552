"""Command-line pieces shared by the launchers and the benchmarks: one-line usage errors, help that shows
each default once, renamed flags, comma-separated lists and the train.py flags after `--`."""

from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """Bad command-line input: one line on stderr, exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" to an option's help, except where
    there is nothing to show (no default, a switch that is off) or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with HelpFormatter whose errors raise UsageError instead of exiting."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message):
        raise UsageError(message)


class _Renamed(argparse.Action):
    """A flag's former name: hidden from --help, stores into the new flag and says so on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is now {self.new}; the old name will be removed in the next release",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Accept `old` (hidden) as another spelling of the existing flag `new`; kwargs: its `type`."""
    parser.add_argument(old, dest=new.lstrip("-"), action=_Renamed, new=new, **kwargs)


def add_output_dir(parser: argparse.ArgumentParser, help: str, **kwargs) -> None:
    """`--output_dir DIR`, as train.py spells it, with the former `--out` still accepted."""
    parser.add_argument("--output_dir", metavar="DIR", help=help, **kwargs)
    add_renamed(parser, "--out", "--output_dir")


def require(args: argparse.Namespace, *flags: str) -> None:
    """Like argparse's required=True, for flags that also have a former name."""
    if missing := [f for f in flags if getattr(args, f.lstrip("-")) is None]:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")


def parse_list(flag: str, text: str, kind=str) -> list:
    """A comma-separated list of distinct `kind` values."""
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or not all(items):
        raise UsageError(f"{flag} needs a comma-separated list, got {text!r}")
    try:
        values = [kind(s) for s in items]
    except ValueError:
        noun = {int: "integers", float: "numbers"}.get(kind, kind.__name__)
        raise UsageError(f"{flag}: {text!r} is not a list of {noun}") from None
    if len(set(values)) != len(values):
        raise UsageError(f"{flag}: {text!r} repeats a value")
    return values


def choices(flag: str, text: str, allowed: tuple[str, ...], noun: str) -> list[str]:
    """A comma-separated list whose every item is one of `allowed` (a `noun`, in the error)."""
    values = parse_list(flag, text)
    if unknown := [v for v in values if v not in allowed]:
        raise UsageError(f"{flag}: unknown {noun} {unknown[0]!r} (choose from {', '.join(allowed)})")
    return values


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our flags, the train.py flags after `--`)."""
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def reject(extra: list[str], flags: tuple[str, ...], owner: str) -> None:
    """The first train.py flag in `extra` that `owner` sets itself is a usage error."""
    if clash := [a.split("=")[0] for a in extra if a.split("=")[0] in flags]:
        raise UsageError(f"{clash[0]} is set by {owner}; remove it after --")
