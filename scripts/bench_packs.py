#!/usr/bin/env python3
"""Profile packs against single-blob prefetch: a profiled container start, timed.

    sudo venv/bin/python scripts/bench_packs.py [--runs 5] [--links 100mbit,20mbit]
                                                 [--modes singles,packs1,packs3] [--json FILE]

The image is the benchmark's python image (``scripts/bench/images.py``: a Debian minbase
root filesystem with python3, made by mmdebstrap from this host's apt sources, as an OCI
layout), built with this checkout's ``ocixfs build`` into a zstd store; everything is kept
under ``--work`` (default /var/tmp/ocixfs-packs) and reused. The profile is recorded once
by a real run of the workload (``python3 -c "import json, email, http.client"`` in a chroot
over a mount of the local store, ``--record-profile``).

The store is served by nginx on loopback behind ``relay.Relay`` (the link emulator of
``scripts/bench/run``: rate and delay, no slow start or loss). A run: fresh cache
directory, the packs of the mode made (``ocixfs profile pack --parts N``, off the clock),
then the clock runs from ``ocixfs mount --prefetch PROFILE`` until the workload in a chroot
over the mount exits ("start"); the prefetch's own duration (from ``ocixfs stats``) and the
requests (nginx's access log) and bytes (the relay) of the whole run are recorded too.

Modes:
  singles   --no-packs: the profile's blobs fetched one GET each, 16 at a time (today)
  packs1    one pack of the whole working set
  packsN    the working set dealt into N packs, fetched in parallel

Runs rotate the modes so that none always goes first; medians of ``--runs`` per link and
mode. The page cache is not dropped (other people's work runs on this machine): local
disk reads are the same for every mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from images import IMAGES, OCI_TAG, build_oci, chroot_env  # noqa: E402
from relay import LINKS, Relay  # noqa: E402
from servers import is_mounted, nginx, unmount, wait_until  # noqa: E402

OCIXFS = ROOT / "venv" / "bin" / "ocixfs"
SPEC = IMAGES["python"]
TIMEOUT = 300.0


@dataclass(frozen=True)
class Run:
    link: str
    mode: str
    round: int
    start_s: float
    mount_s: float
    prefetch_s: float
    requests: int
    bytes_down: int
    connections: int
    pack_blobs: int
    single_blobs: int


def run(argv: Sequence[str | os.PathLike[str]], **options: Any) -> subprocess.CompletedProcess[str]:
    """Run a step; its output goes to files, not pipes (a daemon keeps the ones it
    inherited until it is ready, which would hold up a pipe reader)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run([os.fspath(a) for a in argv], text=True, stdout=out, stderr=err,
                              timeout=TIMEOUT, check=False, **options)
        out.seek(0)
        err.seek(0)
        done.stdout, done.stderr = out.read(), err.read()
    if done.returncode:
        raise RuntimeError(f"{os.fspath(argv[0])} {os.fspath(argv[1])} exited "
                           f"{done.returncode}: {done.stderr.strip()[-500:]}")
    return done


# -- the image and its profile -----------------------------------------------------------------


def ensure_image(work: Path) -> tuple[Path, Path]:
    """The OCIX manifest and its zstd store, built from the bench's python image."""
    image_dir = work / "images" / SPEC.name
    build_oci(SPEC, image_dir, work / "scratch")
    out = work / SPEC.name
    ocix, store = out / f"{SPEC.name}.ocix", out / "store"
    if not ocix.is_file():
        out.mkdir(parents=True, exist_ok=True)
        run([OCIXFS, "build", f"oci:{image_dir / 'oci'}:{OCI_TAG}", "--store", store,
             "--output", out / "partial.ocix", "--no-progress"])
        (out / "partial.ocix").rename(ocix)
    return ocix, store


def ensure_profile(work: Path, ocix: Path, store: Path) -> Path:
    """The workload's profile, recorded once over a mount of the local store."""
    profile = work / SPEC.name / f"{SPEC.name}.profile"
    if profile.is_file():
        return profile
    mnt = fresh(work / "mnt")
    cache = fresh(work / "record-cache")
    run([OCIXFS, "mount", ocix, mnt, "--store", store, "--cache-dir", cache, "--prefetch",
         "none", "--record-profile", profile])
    try:
        workload(mnt)
    finally:
        run([OCIXFS, "umount", mnt])
    return profile


def workload(mnt: Path) -> None:
    run(["chroot", mnt, *SPEC.workload.argv], env=chroot_env(), stdin=subprocess.DEVNULL)


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# -- one timed start ---------------------------------------------------------------------------


def parts_of(mode: str) -> int:
    return 0 if mode == "singles" else int(mode.removeprefix("packs"))


def make_packs(profile: Path, ocix: Path, store: Path, parts: int) -> dict[str, Any]:
    shutil.rmtree(store / "packs", ignore_errors=True)
    if not parts:
        return {}
    done = run([OCIXFS, "profile", "pack", profile, "--image", ocix, "--store", store,
                "--parts", str(parts), "--json"])
    made: dict[str, Any] = json.loads(done.stdout)
    return made


def requests_logged(run_dir: Path) -> int:
    with contextlib.suppress(FileNotFoundError), (run_dir / "access.log").open("rb") as log:
        return sum(1 for _ in log)
    return 0


def timed_start(work: Path, ocix: Path, profile: Path, relay: Relay, nginx_dir: Path,
                mode: str) -> dict[str, Any]:
    mnt, cache = fresh(work / "mnt"), fresh(work / "cache")
    argv: list[str | os.PathLike[str]] = [
        OCIXFS, "mount", ocix, mnt, "--store", f"http://127.0.0.1:{relay.port}/",
        "--cache-dir", cache, "--prefetch", profile, "--log-file", work / "daemon.log"]
    if mode == "singles":
        argv.append("--no-packs")
    relay.reset_counters()
    before = requests_logged(nginx_dir)
    start = time.perf_counter()
    run(argv)
    mounted = time.perf_counter()
    try:
        workload(mnt)
        started = time.perf_counter()
        prefetch = wait_for_prefetch(mnt)
    finally:
        run([OCIXFS, "umount", mnt])
        if is_mounted(mnt):
            unmount(mnt, work / "umount.log")
    counters = relay.counters()
    packs = prefetch.get("packs") or {}
    return {
        "start_s": started - start,
        "mount_s": mounted - start,
        "prefetch_s": prefetch["seconds"],
        "requests": requests_logged(nginx_dir) - before,
        "bytes_down": counters.bytes_down,
        "connections": counters.connections,
        "pack_blobs": packs.get("blobs_delivered", 0),
        "single_blobs": prefetch["planned_blobs"] - packs.get("blobs_delivered", 0),
    }


def wait_for_prefetch(mnt: Path) -> dict[str, Any]:
    """The prefetch statistics once it finished (off the clock: the start is done)."""
    found: dict[str, Any] = {}

    def finished() -> bool:
        stats = json.loads(run([OCIXFS, "stats", mnt, "--json"]).stdout)
        found.update(stats["prefetch"] or {})
        return found.get("finished") is True

    wait_until(finished, TIMEOUT, "the prefetch to finish")
    return found


# -- report ------------------------------------------------------------------------------------


def summarise(runs: Sequence[Run], links: Sequence[str],
              modes: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for link in links:
        base = None
        for mode in modes:
            mine = [r for r in runs if r.link == link and r.mode == mode]
            starts = [r.start_s for r in mine]
            row = {
                "link": link, "mode": mode, "runs": len(mine),
                "start_s": statistics.median(starts), "start_min_s": min(starts),
                "start_max_s": max(starts),
                "prefetch_s": statistics.median(r.prefetch_s for r in mine),
                "requests": statistics.median(r.requests for r in mine),
                "mb_down": statistics.median(r.bytes_down for r in mine) / 1e6,
                "connections": statistics.median(r.connections for r in mine),
                "pack_blobs": statistics.median(r.pack_blobs for r in mine),
                "single_blobs": statistics.median(r.single_blobs for r in mine),
            }
            base = base or row["start_s"]
            row["vs_singles"] = row["start_s"] / base
            rows.append(row)
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| link | mode | start s, median (min–max) | vs singles | prefetch s | requests "
             "| MB down | connections | blobs by pack / single |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['link']} | {r['mode']} | {r['start_s']:.3f} ({r['start_min_s']:.3f}–"
            f"{r['start_max_s']:.3f}) | {r['vs_singles']:.2f}× | {r['prefetch_s']:.3f} "
            f"| {r['requests']:g} | {r['mb_down']:.2f} | {r['connections']:g} "
            f"| {r['pack_blobs']:g} / {r['single_blobs']:g} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ocixfs-packs"),
                        help="where the image, its store and the runs live")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per link and mode")
    parser.add_argument("--links", default="100mbit,20mbit", help=f"of {', '.join(LINKS)}")
    parser.add_argument("--modes", default="singles,packs1,packs3",
                        help="singles, packs1, packsN (N parts)")
    parser.add_argument("--json", type=Path, help="also write every run and the medians here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be positive")
    for mode in args.modes.split(","):
        if mode != "singles" and not mode.removeprefix("packs").isdigit():
            parser.error(f"unknown mode {mode}")
    return args


@contextlib.contextmanager
def served(store: Path, work: Path, link: str) -> Iterator[tuple[Relay, Path]]:
    run_dir = work / f"nginx-{link}"
    with nginx(store, run_dir) as server, \
            Relay(target=("127.0.0.1", server.port), link=LINKS[link]) as relay:
        yield relay, run_dir


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts, chroot, nginx as root)")
    links, modes = args.links.split(","), args.modes.split(",")
    ocix, store = ensure_image(args.work)
    profile = ensure_profile(args.work, ocix, store)
    runs: list[Run] = []
    packs_made: dict[str, Any] = {}
    for link in links:
        with served(store, args.work, link) as (relay, run_dir):
            for round_ in range(args.runs):
                shift = round_ % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    packs_made[mode] = make_packs(profile, ocix, store, parts_of(mode))
                    result = timed_start(args.work, ocix, profile, relay, run_dir, mode)
                    runs.append(Run(link=link, mode=mode, round=round_, **result))
                    print(f"{link} {mode:<8} round {round_ + 1}: start {result['start_s']:.3f} s, "
                          f"prefetch {result['prefetch_s']:.3f} s, {result['requests']} requests",
                          file=sys.stderr)
    rows = summarise(runs, links, modes)
    header = (f"{SPEC.name} image, workload `{SPEC.workload.describe()}`; load average "
              f"{os.getloadavg()[0]:.2f} at the end")
    print(header)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "packs": packs_made,
                                         "summary": rows, "runs": [asdict(r) for r in runs]},
                                        indent=1) + "\n")
    make_packs(profile, ocix, store, 0)


if __name__ == "__main__":
    main()
