#!/usr/bin/env python3
"""Coverage-guided fuzzing of the OCIX decoder with atheris (libFuzzer for Python).

    pip install atheris                     # not a dependency of ocixfs; CPython <= 3.11
    scripts/fuzz_format.py -max_total_time=300 -jobs=2 [CORPUS_DIR ...]

The hostile corpus (tests/hostile/*.ocix, including a valid baseline) and the format test
vectors seed the run unless other corpus directories are given. The property: ``decode``
either returns a ``Manifest`` that re-encodes and decodes to itself, or raises
``FormatError`` with a one-line message; anything else (another exception, a hang, a
crash) is a bug, and libFuzzer saves the input that caused it. Extra arguments go to
libFuzzer (``-runs=N``, ``-max_len=N``, ``-artifact_prefix=DIR/`` ...).

Exit status: 0 when the run ends without finding anything, 2 when atheris is missing.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEEDS = [REPO / "tests" / "hostile", REPO / "tests" / "vectors"]

sys.path.insert(0, str(REPO))


def check(data: bytes) -> None:
    from ocixfs.errors import FormatError
    from ocixfs.image.format import decode, encode

    try:
        manifest = decode(data)
    except FormatError as exc:
        if "\n" in str(exc):
            raise AssertionError(f"multi-line message: {exc!r}") from None
        return
    again = decode(encode(manifest))
    if again != manifest:
        raise AssertionError("decode(encode(decode(data))) differs from decode(data)")


def seed_directory() -> str:
    """A temporary directory holding every seed (libFuzzer adds its finds there): the
    corpus files as they are, the ``.hex`` vectors as bytes (``#`` starts a comment)."""
    directory = Path(tempfile.mkdtemp(prefix="ocixfs-fuzz-"))
    for seeds in SEEDS:
        for path in sorted(seeds.glob("*.ocix")):
            shutil.copy(path, directory / f"{seeds.name}-{path.name}")
        for path in sorted(seeds.glob("*.hex")):
            lines = (re.sub(r"#.*", "", line) for line in path.read_text().splitlines())
            (directory / f"{seeds.name}-{path.stem}.ocix").write_bytes(
                bytes.fromhex("".join(lines))
            )
    return str(directory)


def main() -> int:
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        print("fuzz_format: atheris is not installed (pip install atheris; it needs "
              "CPython <= 3.11 on x86-64 Linux or a clang toolchain)", file=sys.stderr)
        return 2
    with atheris.instrument_imports():
        import ocixfs.image.format  # noqa: F401 -- instrumented for coverage feedback
    arguments = sys.argv[:]
    if not any(not arg.startswith("-") for arg in arguments[1:]):
        arguments.append(seed_directory())
    atheris.Setup(arguments, check)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
