"""``mount.fuse.ocixfs``: the helper mount(8) runs for ``-t fuse.ocixfs`` and fstab lines.

mount(8) calls ``/sbin/mount.fuse.ocixfs IMAGE MOUNTPOINT [-sfnv] [-o OPTIONS]``. The
helper maps that onto ``ocixfs mount IMAGE MOUNTPOINT -o OPTIONS``: ocixfs options
(``store=``, ``cache=``, ``digest=``, ``deadline=``, ``log=``) and the FUSE flags
``suid``/``dev``/``allow_other`` are honoured; ``rw`` is dropped (mount adds it by
default; the mount is read-only regardless); ``x-*``, ``_netdev``, ``noauto``, ``nofail``,
``defaults`` and other fstab-only words are ignored. Several ``store=`` options are mirrors,
in order. ``-n`` (no mtab), ``-s`` (sloppy) and ``-v`` are accepted; ``-f`` (fake) only
validates the image.

mount(8) never passes ``suid`` or ``dev`` on to a helper (they are its defaults, so it keeps
them as flags), which leaves a helper unable to tell them from "not asked for". Through
mount(8) and fstab, ``allow_suid`` and ``allow_dev`` opt in instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main", "translate"]

ALIASES = {"allow_suid": "suid", "allow_dev": "dev"}


def translate(argv: Sequence[str]) -> list[str]:
    """The ``ocixfs`` argument list for a ``mount.fuse.ocixfs`` argument list."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-o" and args:
            options.extend(_options(args.pop(0)))
        elif arg.startswith("-o") and len(arg) > 2:
            options.extend(_options(arg[2:]))
        elif arg == "-t" and args:
            args.pop(0)
        elif arg.startswith("-") and len(arg) > 1:
            fake = fake or "f" in arg[1:]
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.fuse.ocixfs IMAGE MOUNTPOINT [-o OPTIONS]")
    command = ["inspect", "--summary", positional[0]] if fake else ["mount", *positional]
    if options and not fake:
        command += ["-o", ",".join(options)]
    return command


def _options(text: str) -> list[str]:
    return [ALIASES.get(o, o) for o in text.split(",") if o and o != "rw"]


def main(argv: Sequence[str] | None = None) -> int:
    from ocixfs.cli import main as ocixfs_main

    return ocixfs_main(translate(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
