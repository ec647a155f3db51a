#!/usr/bin/env python3
"""What the host service buys: `ocixfs mount` of an image seen before, with a warm cache,
through a running service against in-process (OCIXFS_NO_SERVICE=1), and the same mount
plus a small workload (read 50 files).

    sudo venv/bin/python scripts/bench_service.py [--runs 20] [--json FILE]
    sudo venv/bin/python scripts/bench_service.py --entries 100000 [--runs 5]

With --entries N the image is a generated N-entry manifest (``scripts/bench_format.py``,
no file is read, an empty store) and each mode is first timed once on a fresh cache (the
manifest decoded, no image index yet) before the runs (the index in the cache).

A third row times the request alone: `ocixfs.mount.serviceclient.mount_through_service` called in
this process (no interpreter start, no imports), i.e. the service's side plus the
client's protocol.

The image is a copy of this host's Python standard library in a local store; before the
runs it is mounted once with --prefetch all (cache and image index warm). The two modes
alternate run by run; each run mounts at a fresh mountpoint and unmounts afterwards (not
timed). The service runs in a private directory (OCIXFS_SERVICE_DIR) and is stopped at the
end. Medians of --runs runs, wall time seen by the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

OCIXFS = [sys.executable, "-m", "ocixfs"]
WORKLOAD_FILES = 50


def ocixfs(*args: str, env: dict[str, str]) -> None:
    subprocess.run([*OCIXFS, *args], check=True, env=env, stdout=subprocess.DEVNULL)


def make_image(work: Path, env: dict[str, str]) -> tuple[Path, Path, list[str]]:
    tree = work / "tree"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(stdlib, tree / "lib", ignore=shutil.ignore_patterns(
        "__pycache__", "site-packages", "test", "tests", "idlelib", "tkinter"), symlinks=True)
    files = sorted(str(p.relative_to(tree)) for p in (tree / "lib").glob("*.py"))
    ocixfs("build", f"dir:{tree}", "--store", os.fspath(work / "store"), "--output",
           os.fspath(work / "image.ocix"), "--no-progress", env=env)
    return work / "image.ocix", work / "store", files[:WORKLOAD_FILES]


def generated_image(work: Path, entries: int) -> tuple[Path, Path, list[str]]:
    """An ``entries``-entry manifest and an empty store: a mount reads metadata only."""
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))
    from ocixfs.image.format import encode
    from scripts.bench_format import generate

    (work / "store" / "blobs").mkdir(parents=True)
    (work / "image.ocix").write_bytes(encode(generate(entries)))
    return work / "image.ocix", work / "store", []


def one_run(image: Path, args: list[str], mountpoint: Path, files: list[str],
            env: dict[str, str]) -> tuple[float, float]:
    """Seconds until `ocixfs mount` returned, and until the workload had read its files."""
    mountpoint.mkdir()
    start = time.perf_counter()
    ocixfs("mount", os.fspath(image), os.fspath(mountpoint), *args, env=env)
    mounted = time.perf_counter()
    for name in files:
        (mountpoint / name).read_bytes()
    done = time.perf_counter()
    ocixfs("umount", os.fspath(mountpoint), env=env)
    return mounted - start, done - start


def request_only(image: Path, args: list[str], mountpoint: Path, env: dict[str, str]) -> float:
    """Seconds for the service to take one mount request to its exit status."""
    from ocixfs.mount.serviceclient import mount_through_service

    mountpoint.mkdir()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        start = time.perf_counter()
        status = mount_through_service(["mount", os.fspath(image), os.fspath(mountpoint), *args])
        took = time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if status != 0:
        raise SystemExit(f"the service answered {status}")
    ocixfs("umount", os.fspath(mountpoint), env=env)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--entries", type=int, help="a generated manifest of N entries")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ocixfs-bench-service-"))
    base = {k: v for k, v in os.environ.items() if k != "OCIXFS_NO_SERVICE"}
    modes = {"service": {**base, "OCIXFS_SERVICE_DIR": os.fspath(work / "service")},
             "in-process": {**base, "OCIXFS_NO_SERVICE": "1"}}
    try:
        ocixfs("service", "start", env=modes["service"])
        first: dict[str, float] = {}
        if options.entries:
            image, store, files = generated_image(work, options.entries)
            for mode, env in modes.items():  # a fresh cache each: the manifest is decoded
                first[mode] = one_run(image, ["--store", os.fspath(store), "--cache-dir",
                                              os.fspath(work / f"cache-{mode}"), "--prefetch",
                                              "none"], work / f"m-first-{mode}", [], env)[0]
        else:
            image, store, files = make_image(work, modes["in-process"])
        args = ["--store", os.fspath(store), "--cache-dir", os.fspath(work / "cache")]
        warm = work / "warm"  # the image index, and the files' blobs unless generated
        warm.mkdir()
        ocixfs("mount", os.fspath(image), os.fspath(warm), *args, "--prefetch",
               "none" if options.entries else "all", env=modes["in-process"])
        try:
            if not options.entries:
                ocixfs("stats", "--wait", os.fspath(warm), env=modes["in-process"])
        finally:
            ocixfs("umount", os.fspath(warm), env=modes["in-process"])
        times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
        requests: list[float] = []
        for run in range(options.runs):
            for mode, env in modes.items():
                mountpoint = work / f"m-{mode}-{run}"
                times[mode].append(one_run(image, [*args, "--prefetch", "none"], mountpoint,
                                           files, env))
            requests.append(request_only(image, [*args, "--prefetch", "none"],
                                         work / f"m-request-{run}", modes["service"]))
    finally:
        subprocess.run([*OCIXFS, "service", "stop"], env=modes["service"],
                       stdout=subprocess.DEVNULL, check=False)
    results = {mode: {"mount_s": statistics.median(t[0] for t in runs),
                      "mount_and_workload_s": statistics.median(t[1] for t in runs)}
               for mode, runs in times.items()}
    for mode, seconds in first.items():
        print(f"first mount of the {options.entries}-entry image, {mode}: {seconds:.3f} s")
    print(f"medians of {options.runs} runs; workload: read {len(files)} files")
    print(f"{'':12} {'mount':>8} {'mount + workload':>18}")
    for mode, row in results.items():
        print(f"{mode:12} {row['mount_s']:8.3f} {row['mount_and_workload_s']:18.3f}")
    request = statistics.median(requests)
    print(f"{'request only':12} {request:8.3f}")
    ratio = results["in-process"]["mount_s"] / results["service"]["mount_s"]
    print(f"in-process / service, mount: {ratio:.1f}x")
    if options.json:
        options.json.write_text(json.dumps({"runs": options.runs, "entries": options.entries,
                                            "first_mount_s": first, "results": results,
                                            "request_only_s": request}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
