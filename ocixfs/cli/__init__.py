"""The ``ocixfs`` command: a thin dispatcher over ``ocixfs.cli.*``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Command modules import their heavy dependencies inside ``run`` so
that ``ocixfs --help`` and the mount daemon start quickly. An ``OcixError`` (or an
``OSError`` about a user-named file) becomes one line on stderr and exit status 1 or 2.
A reader that closes the output early (``ocixfs diff A B | head``) ends any command
quietly, with the status 141 a shell gives a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["main"]

COMMANDS = (
    "build",
    "inspect",
    "mount",
    "push",
    "umount",
    "stats",
    "profile",
    "cache",
    "extract",
    "diff",
    "dedup",
    "compose",
    "lxc_config",
    "incus",
    "service",
    "metrics",
)


def _load_commands(names: Sequence[str] = COMMANDS) -> list[ModuleType]:
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(f"ocixfs.cli.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"ocixfs.cli.{name}":
                raise
    return modules


def _requested_command(argv: Sequence[str]) -> tuple[str, ...]:
    """Import only the module of the command being run (start-up time matters for
    ``mount``); ``--help`` and unknown words load them all."""
    rest = list(argv)
    while rest and rest[0] == "--debug":
        rest.pop(0)
    module = rest[0].replace("-", "_") if rest else ""
    return (module,) if module in COMMANDS else COMMANDS


_PARSERS: dict[tuple[str, ...], argparse.ArgumentParser] = {}


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser ``main`` uses for ``argv``, built once per process and command (the host
    service builds ``mount``'s before it forks its workers)."""
    commands = _requested_command(argv)
    if commands not in _PARSERS:
        _PARSERS[commands] = build_parser(commands)
    return _PARSERS[commands]


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ocixfs",
        description=(
            "Mount OCIX container images read-only, fetching each file's verified "
            "content over HTTP on first use."
        ),
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _load_commands(commands):
        cmd = sub.add_parser(
            module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from ocixfs import __version__

    return __version__


BROKEN_PIPE_STATUS = 128 + 13  # what a shell reports for a process killed by SIGPIPE


def _stop_writing_stdout() -> None:
    """After the reader of stdout went away: send what is still buffered nowhere, so
    Python's flush at exit cannot fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    from ocixfs.errors import OcixError, UsageError
    from ocixfs.log import setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser_for(argv).parse_args(argv)
    args.command_line = argv  # what ``mount`` hands to the host service
    setup_logging(debug=args.debug)
    try:
        status: int = args._run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _stop_writing_stdout()
        return BROKEN_PIPE_STATUS
    except UsageError as exc:
        print(f"ocixfs: {exc}", file=sys.stderr)
        return 2
    except OcixError as exc:
        print(f"ocixfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ocixfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
