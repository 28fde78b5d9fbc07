"""How a command runs, whichever way it starts: `qformer X ...` (tasks/cli.py) or `python -m tasks.X ...`.

A command module declares its arguments once, in `add_arguments(parser)`, and does its work in `run(args)`;
`qformer X` mounts the same `add_arguments` as a subparser, `python -m tasks.X` calls `main` here. Either way the
log level (the parser's `log_level` default) and format are the same (`tasks.log`), and bad input (a missing
file, a config typo: FileNotFoundError or ValueError) ends in one line `qformer X: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from tasks.log import setup_logging

__all__ = ["BAD_INPUT", "add_config_arguments", "command_parser", "config_and_overrides", "execute", "main"]

BAD_INPUT = (FileNotFoundError, ValueError)

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


def command_parser(name: str, add_arguments: AddArguments, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of `qformer NAME`, as `python -m tasks.X` uses it."""
    parser = argparse.ArgumentParser(
        prog=f"qformer {name}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def execute(name: str, run: Run, args: argparse.Namespace, level: int | None = None) -> int:
    """Set up logging (at `level`, else the command's `log_level`, else INFO) and run the command; bad input is
    one line on stderr and exit code 2 instead of a traceback."""
    setup_logging(level if level is not None else getattr(args, "log_level", logging.INFO))
    try:
        return run(args)
    except BAD_INPUT as e:
        print(f"qformer {name}: error: {e}", file=sys.stderr)
        return 2


def main(
    name: str, add_arguments: AddArguments, run: Run, argv: list[str] | None = None, description: str | None = None
) -> int:
    """`python -m tasks.X [ARGS]`: exactly `qformer NAME [ARGS]`."""
    args = command_parser(name, add_arguments, description).parse_args(argv)
    return execute(name, run, args)


def add_config_arguments(parser: argparse.ArgumentParser, example_config: str, example_overrides: str) -> None:
    """`CONFIG [key=value ...]`, the arguments of the commands driven by a YAML config (train, eval)."""
    parser.add_argument("config", help=f"a YAML config, e.g. {example_config} (or the first key=value override)")
    parser.add_argument("overrides", nargs="*", default=[], help=f"key=value overrides, e.g. {example_overrides}")
    parser.set_defaults(log_level=logging.INFO)


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(config file or None, overrides): a first argument with `=` is an override, for config-less runs."""
    if "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)
