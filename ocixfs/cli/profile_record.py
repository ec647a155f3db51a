"""``ocixfs profile record``: the profile of a command run inside an image, without a
deployment (and ``ocixfs build --profile-cmd``, which records right after a build).

The machinery is ``ocixfs.tools.record``; this module parses the options, checks every
input before anything is mounted, and writes the result atomically (beside the manifest
as ``IMAGE.profile`` by default, the name ``--prefetch auto`` looks for)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ocixfs.errors import OcixError, UsageError
from ocixfs.tools.record import DEFAULT_TIMEOUT, RUN_ENVIRONMENT, Recording, RecordPlan

if TYPE_CHECKING:
    from ocixfs.mount.profile import Profile

__all__ = ["add_record_parser", "record_after_build", "run_record"]

RECORD_DESCRIPTION = f"""\
Run commands inside IMAGE and write the files they opened, in first-access order, as a
profile (by default IMAGE.profile beside the manifest, which 'ocixfs mount --prefetch auto'
plays; an http(s) IMAGE needs -o). Nothing needs to be deployed: each run mounts IMAGE in a
private mount namespace (invisible to the rest of the host, gone when the run ends), puts
a writable tmpfs overlay on top, and runs the command chrooted there as root, with /proc,
a minimal /dev (null, zero, full, random, urandom, tty, shm), the host's network, '/' as
its working directory and a clean environment ({' '.join(f'{k}={v}' for k, v in
RUN_ENVIRONMENT.items())}, and TERM).

Commands: '-- CMD [ARG ...]' runs CMD directly; '--command LINE' (repeatable) runs LINE
with the image's /bin/sh -c. Both can be given: the --command lines run first. Every
command runs --repeat times, each run on a fresh mount; the profile is the union of
every run's files, each at the earliest time any run first opened it (milliseconds after
its own mount), in that order.

The commands' stdin, stdout and stderr are yours. A command still running at --timeout
is killed with everything it started (SIGKILL to its PID namespace); its profile so far
counts. A command that fails still yields a profile unless --strict. Ctrl-C stops the
run, unmounts, and writes nothing.

examples:
  ocixfs profile record python.ocix -- python3 -c 'import json, sqlite3'
  ocixfs profile record app.ocix --repeat 3 --command '/app/start --selftest' \\
      --command 'python3 -m app.healthcheck'
  ocixfs profile record https://cdn/app.ocix --store https://cdn/store/ -o app.ocix.profile \\
      -- /app/start --dry-run
"""


class _CommandAfterDashes(argparse.ArgumentParser):
    """A parser whose words after the first ``--`` are a command (``argv``), wherever the
    options stand: argparse alone would hand them to no positional once IMAGE was taken."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        command: list[str] = []
        if "--" in words:
            at = words.index("--")
            words, command = words[:at], words[at + 1:]
        parsed, extras = super().parse_known_args(words, namespace)
        parsed.argv = command
        return parsed, extras


def add_record_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``record`` action of ``ocixfs profile``."""
    default_class = sub._parser_class
    sub._parser_class = _CommandAfterDashes
    try:
        record = sub.add_parser(
            "record", help="run commands in an image privately and record their profile",
            usage="%(prog)s IMAGE [options] [--command LINE ...] [-- CMD [ARG ...]]",
            description=RECORD_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter)
    finally:
        sub._parser_class = default_class
    record.add_argument("image", metavar="IMAGE", help="manifest file or http(s) URL")
    record.add_argument("--command", action="append", default=[], metavar="LINE",
                        help="a shell command line, run with the image's /bin/sh -c "
                        "(repeatable; these run before '-- CMD')")
    record.add_argument("-o", "--output", type=Path, metavar="PROFILE",
                        help="where to write the profile (default: IMAGE.profile beside a "
                        "local manifest; required for a URL)")
    record.add_argument("--store", action="append", default=[], metavar="URL",
                        help="blob store (http(s)://, file://, or a directory); repeat for "
                        "mirrors (default: the manifest's directory)")
    record.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="the local cache (default: the one mounts use)")
    record.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="kill a command still running after SECONDS, with everything "
                        "it started (default %(default)g); what it opened until then counts")
    record.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run every command N times, each on a fresh mount (default 1)")
    record.add_argument("--strict", action="store_true",
                        help="a command that fails or times out: exit 1, write no profile")
    record.add_argument("--json", action="store_true",
                        help="print a JSON summary (profile, files, runs) on stdout; the "
                        "commands' stdout then goes to stderr")


def run_record(args: argparse.Namespace) -> int:
    commands = [("/bin/sh", "-c", line) for line in args.command]
    if args.argv:
        commands.append(tuple(args.argv))
    if not commands:
        raise UsageError("profile record: no command (give '-- CMD [ARG ...]' or --command LINE)")
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    destination, recording = record_command(
        args.image, stores=args.store, cache_dir=args.cache_dir, output=args.output,
        commands=commands, repeat=args.repeat, timeout=args.timeout, strict=args.strict,
        output_to_stderr=args.json)
    if args.json:
        print(json.dumps(_summary(destination, recording), indent=1))
    else:
        print(f"{destination}: {len(recording.profile.entries)} files from "
              f"{len(recording.runs)} runs")
    return 0


def record_after_build(image: Path, store: Path, lines: Sequence[str], timeout: float, *,
                       output_to_stderr: bool) -> dict[str, object]:
    """``build --profile-cmd``: record ``lines`` (shell command lines) on the image just
    written, from its fresh store, into ``IMAGE.profile``; strict, since a build that
    publishes a broken start-up should fail. Then the profile's pack (``ocixfs profile
    pack``) goes into the store, so mounts that play the profile fetch its files with one
    request. Returns the JSON summary."""
    from ocixfs.image.loading import load_image
    from ocixfs.image.tree import Tree
    from ocixfs.tools.packs import make_packs

    destination, recording = record_command(
        os.fspath(image), stores=[os.fspath(store)], cache_dir=None, output=None,
        commands=[("/bin/sh", "-c", line) for line in lines], repeat=1, timeout=timeout,
        strict=True, output_to_stderr=output_to_stderr)
    summary = _summary(destination, recording)
    if recording.profile.entries:
        tree = Tree.from_manifest(load_image(os.fspath(image)).manifest)
        packed = make_packs(tree, recording.profile, store)
        _write_profile(destination, packed.named_by(recording.profile))
        summary["packs"] = packed.as_dict()
    return summary


def record_command(image: str, *, stores: Sequence[str], cache_dir: Path | None,
                   output: Path | None, commands: Sequence[tuple[str, ...]], repeat: int,
                   timeout: float, strict: bool,
                   output_to_stderr: bool) -> tuple[Path, Recording]:
    """Check the inputs, record, and write the profile (unless ``strict`` and a run
    failed: then an ``OcixError`` and nothing written). Returns where it went and what
    was recorded."""
    from ocixfs.config import default_cache_dir
    from ocixfs.image.loading import is_url, load_image
    from ocixfs.image.tree import Tree
    from ocixfs.store.spec import stores_or_default
    from ocixfs.tools.record import record

    if os.geteuid() != 0:
        raise UsageError("profile record needs root (it mounts in a private namespace)")
    destination = _output_path(image, output)
    source = image if is_url(image) else os.path.abspath(image)
    plan = RecordPlan(
        image=source,
        stores=tuple(stores_or_default(list(stores), image)),
        cache_dir=Path(os.path.abspath(cache_dir or default_cache_dir())),
        commands=tuple(commands), repeat=repeat, timeout=timeout,
        output_to_stderr=output_to_stderr)
    loaded = load_image(source)
    _check_writable(destination)
    recording = record(plan, Tree.from_manifest(loaded.manifest), loaded.digest,
                       announce=lambda line: print(f"ocixfs: {line}", file=sys.stderr,
                                                   flush=True))
    failed = [run for run in recording.runs if not run.succeeded]
    _report_runs(recording)
    if strict and failed:
        raise OcixError(f"{len(failed)} of {len(recording.runs)} runs failed (--strict): "
                        "no profile written")
    _write_profile(destination, recording.profile)
    return destination, recording


def _output_path(image: str, output: Path | None) -> Path:
    from ocixfs.image.loading import is_url

    if output is not None:
        return Path(os.path.abspath(output))
    if is_url(image):
        raise UsageError(f"{image}: a URL; name the profile to write with -o PROFILE")
    return Path(os.path.abspath(image + ".profile"))


def _check_writable(path: Path) -> None:
    """Refuse, before anything runs, an output whose directory cannot take a new file
    (missing, not a directory, read-only, not ours): the same test the final write makes."""
    import secrets

    probe = path.parent / f".{path.name}.{secrets.token_hex(8)}.probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write there: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def _report_runs(recording: Recording) -> None:
    """One line on stderr for each run that did not exit 0."""
    for run in recording.runs:
        if run.status is None:
            print(f"ocixfs: {shlex.join(run.command)}: killed at the timeout "
                  f"({run.files} files recorded)", file=sys.stderr)
        elif run.status != 0:
            print(f"ocixfs: {shlex.join(run.command)}: exit status {run.status} "
                  f"({run.files} files recorded)", file=sys.stderr)


def _write_profile(path: Path, profile: Profile) -> None:
    """Atomically (``safefs.write_atomically``): the profile is whole or not there."""
    from ocixfs.mount.profile import encode_profile
    from ocixfs.safefs import write_atomically

    try:
        write_atomically(path, encode_profile(profile))
    except OSError as exc:
        raise OcixError(f"{path}: cannot write the profile: {exc.strerror}") from None


def _summary(path: Path, recording: Recording) -> dict[str, object]:
    return {
        "profile": os.fspath(path),
        "files": len(recording.profile.entries),
        "runs": [{"command": list(run.command), "status": run.status,
                  "timed_out": run.status is None, "files": run.files}
                 for run in recording.runs],
    }
