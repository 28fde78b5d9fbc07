"""How a command runs, whichever way it starts: `qformer X ...` (tasks/cli.py) or `python -m tasks.X ...`.

A command module declares its arguments once, in `add_arguments(parser)`, and does its work in `run(args)`;
`qformer X` mounts the same `add_arguments` as a subparser, `python -m tasks.X` calls `main` here. Either way the
log level (the parser's `log_level` default) and format are the same (`tasks.log`), and `execute` here is the one
place that turns an exception into what the user reads:

- bad input (`BAD_INPUT`: a missing file or folder, a file where a folder belongs, a config typo, an invalid JSON or
  YAML file, an unreadable image; every error of ours that subclasses ValueError) is one line
  `qformer X: error: ...` and exit code 2; a run that stopped for a reason its message gives (`RunFailed`, e.g.
  divergence) is one line and exit code 1;
- `-v`/`--verbose` (INFO logs) and `--debug` (DEBUG logs) also print the traceback above that line; both are
  accepted before or after the command name (`qformer -v train ...`, `qformer train ... -v`, `python -m tasks.train
  ... -v`);
- anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from tasks.log import setup_logging

__all__ = [
    "BAD_INPUT",
    "HelpFormatter",
    "RunFailed",
    "add_config_arguments",
    "add_verbosity_arguments",
    "command_parser",
    "config_and_overrides",
    "execute",
    "main",
    "one_line",
]

# What a user can fix from the message alone. Our own input errors are ValueErrors (ConfigError, CheckpointError,
# ImageReadError, TooManyBadSamples, ...); the OSErrors are a path that is missing, of the wrong kind or unreadable.
BAD_INPUT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


class RunFailed(RuntimeError):
    """A run that stopped for a reason its message says in full (e.g. training diverged): one line, exit code 1."""


AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


def add_verbosity_arguments(parser: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """`-v/--verbose` and `--debug`. On a subcommand's parser their default is left out of the namespace, so that
    `qformer -v X` is not undone by X's own parser (argparse copies every subparser default over the top level's)."""
    default = argparse.SUPPRESS if subcommand else False
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log at INFO level (train and eval always do) and show the traceback of an error",
    )
    parser.add_argument(
        "--debug", action="store_true", default=default, help="log at DEBUG level and show the traceback of an error"
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The help of every `qformer` parser: descriptions (the commands' docstrings) as written, and each option's
    default (or "required") after its help. An option whose default is None says in its help what happens without
    it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if default is None or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {'%(default)r' if isinstance(default, str) else '%(default)s'})"


def command_parser(name: str, add_arguments: AddArguments, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of `qformer NAME`, as `python -m tasks.X` uses it."""
    parser = argparse.ArgumentParser(prog=f"qformer {name}", description=description, formatter_class=HelpFormatter)
    add_arguments(parser)
    add_verbosity_arguments(parser)
    return parser


def one_line(error: BaseException) -> str:
    """The message of `error` on one line. An exception re-raised by a DataLoader from a worker process carries the
    worker's whole traceback as its message: its last line is the original error."""
    message = str(error)
    if "Original Traceback" in message:  # torch.utils.data's ExceptionWrapper.reraise
        last = [line for line in message.splitlines() if line.strip()][-1]
        prefix = f"{type(error).__name__}: "
        message = last.split(prefix, 1)[1] if prefix in last else last
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # A message that lists its problems one per line (a strict load's missing keys) keeps every one of them.
    last = len(lines) - 1
    return " ".join(line if i == last or line.endswith((":", ";")) else line + ";" for i, line in enumerate(lines))


def execute(name: str, run: Run, args: argparse.Namespace, level: int | None = None) -> int:
    """Set up logging (at `level`, else DEBUG with `--debug`, INFO with `-v`, else the command's `log_level`, else
    INFO) and run the command; bad input is one line on stderr and exit code 2 instead of a traceback (see the
    module docstring; the traceback too with `-v` or `--debug`)."""
    debug, verbose = getattr(args, "debug", False), getattr(args, "verbose", False)
    if level is None:
        level = logging.DEBUG if debug else logging.INFO if verbose else getattr(args, "log_level", logging.INFO)
    setup_logging(level)
    try:
        return run(args)
    except (*BAD_INPUT, RunFailed) as e:
        if debug or verbose:
            traceback.print_exc()
        print(f"qformer {name}: error: {one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, RunFailed) else 2


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
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every key: the preset's, the YAML's and the overrides) as YAML, and exit",
    )
    parser.set_defaults(log_level=logging.INFO)


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(config file or None, overrides): a first argument with `=` is an override, for config-less runs."""
    if "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)
