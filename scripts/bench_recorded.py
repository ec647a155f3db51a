#!/usr/bin/env python3
"""Is a profile made by ``ocixfs profile record`` as good as one recorded by a deployment?

Runs the benchmark's own contender sessions (scripts/bench/contenders.py: nginx, the
emulated link, a dropped page cache and a fresh cache per run) for ``ocixfs-profile``
(played with --prefetch FILE, recorded by a first --record-profile mount) and
``ocixfs-recorded`` (IMAGE.profile beside the manifest, made by ``ocixfs profile record
IMAGE -- WORKLOAD``, played by --prefetch auto), alternating, on an image built here
from the host's python3 and its standard library, with the python start-up workload of
the benchmark. It is a piece-by-piece check of the ``ocixfs-recorded`` contender; the
full table is scripts/bench/run's. Needs root.

  sudo venv/bin/python scripts/bench_recorded.py --runs 5 [--link 100mbit] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts" / "bench"))

from contenders import Ocixfs, RunResult, SessionContext  # noqa: E402
from images import PYTHON_START, ImageSpec  # noqa: E402
from relay import LINKS  # noqa: E402


def python_tree(root: Path) -> Path:
    """The host's python3, the shared libraries it loads, and its standard library."""
    python = Path("/usr/bin/python3").resolve()  # the system's (not a pyenv shim)
    targets = {python}
    ldd = subprocess.run(["ldd", str(python)], capture_output=True, text=True, check=True)
    targets |= {Path(word) for line in ldd.stdout.splitlines() for word in line.split()
                if word.startswith("/")}
    for path in targets:
        dest = root / str(path).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), dest)
    (root / "usr/bin/python3").symlink_to(python.name)
    stdlib = Path("/usr/lib") / python.name  # python3.11 -> /usr/lib/python3.11
    shutil.copytree(stdlib, root / str(stdlib).lstrip("/"), symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "dist-packages", "test"))
    for name in ("bin/sh", "bin/dash"):
        if (Path("/") / name).exists():
            dest = root / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path("/") / name, dest, follow_symlinks=True)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--link", choices=sorted(LINKS), default="100mbit")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temp one)")
    args = parser.parse_args()
    ocixfs = REPO / "venv" / "bin" / "ocixfs"
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        image = work / "image" / "python.ocix"
        if not image.exists():
            tree = python_tree(work / "rootfs")
            image.parent.mkdir(parents=True)
            subprocess.run([ocixfs, "build", f"dir:{tree}", "--store", image.parent / "store",
                            "-o", image], check=True, stdout=subprocess.DEVNULL)
        spec = ImageSpec(name="python", variant="host", include=(), workload=PYTHON_START)
        times: dict[str, list[float]] = {}
        sessions = {}
        for mode in ("profile", "recorded"):
            contender = Ocixfs(mode)
            scratch = work / contender.name
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            ctx = SessionContext(spec=spec, image_dir=image.parent, link=LINKS[args.link],
                                 scratch=scratch, log=scratch / "log", ocixfs=ocixfs,
                                 ocix_image=image, ocix_store=image.parent / "store")
            sessions[contender.name] = stack.enter_context(contender.session(ctx))
            times[contender.name] = []
        for _ in range(args.runs):
            for name, session in sessions.items():  # alternating: load drifts hit both
                result: RunResult = session.run_once()
                times[name].append(result.seconds)
                print(f"{name:16} {result.seconds:6.2f} s  {result.bytes_down / 1e6:6.1f} MB "
                      f"load {result.extra.get('loadavg_before')}", flush=True)
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            print(f"median {name:16} {value:.2f} s  ({', '.join(f'{t:.2f}' for t in times[name])})")
        ratio = medians["ocixfs-recorded"] / medians["ocixfs-profile"]
        print(f"ocixfs-recorded / ocixfs-profile = {ratio:.2f} (target: at most 1.1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
