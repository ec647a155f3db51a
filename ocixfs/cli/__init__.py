"""The ``ocixfs`` command: a thin dispatcher over ``ocixfs.cli.*``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Command modules import their heavy dependencies inside ``run`` so
that ``ocixfs --help`` and the mount daemon start quickly. An ``OcixError`` (or an
``OSError`` about a user-named file) becomes one line on stderr and exit status 1 or 2.
A reader that closes the output early (``ocixfs diff A B | head``) ends any command
quietly, with the status 141 a shell gives a process killed by SIGPIPE.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # (not typing's: a root ``mount`` hands itself over before importing it)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
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
    import importlib

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
    import argparse

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


# Options that keep a mount in this process (argparse also takes unambiguous prefixes).
_IN_PROCESS = ("--foreground", "--no-service", "--help")


def _mount_through_service(argv: Sequence[str]) -> int | None:
    """``ocixfs mount …`` by root, in the background: handed to the host service before
    anything else is imported or parsed (its worker parses the command line and says
    what is wrong with it); the exit status, or None to run the command here."""
    if not argv or argv[0] != "mount" or os.geteuid() != 0:
        return None
    for arg in argv[1:]:
        name = arg.partition("=")[0]
        if arg == "--":
            break
        if (arg.startswith("-") and not arg.startswith("--") and "f" in arg[1:].split("o")[0]
                or len(name) > 2 and any(full.startswith(name) for full in _IN_PROCESS)
                or arg == "-h"):
            return None
    from ocixfs.mount.serviceclient import mount_through_service

    return _reporting_errors(lambda: mount_through_service(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    through_service = _mount_through_service(argv)
    if through_service is not None:
        return through_service
    from ocixfs.log import setup_logging

    args = parser_for(argv).parse_args(argv)
    args.command_line = argv  # what ``mount`` hands to the host service
    args.service_asked = argv[:1] == ["mount"]  # (and it declined)
    setup_logging(debug=args.debug)
    status = _reporting_errors(lambda: int(args._run(args)))
    assert status is not None
    return status


def _reporting_errors(command: Callable[[], int | None]) -> int | None:
    """``command()``'s status; an error the user made or met is one line on stderr and
    the status 2 (usage), 1 (anything else), 130 (Ctrl-C) or 141 (closed pipe)."""
    from ocixfs.errors import OcixError, UsageError

    try:
        status = command()
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
