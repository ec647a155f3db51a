#!/usr/bin/env python3
"""A fleet starting the same image at the same moment, direct or through a site cache.

    sudo venv/bin/python scripts/bench_fleet.py [--hosts 8] [--runs 3] [--link 100mbit]
                                                [--modes direct,squid,nginx] [--json FILE]

The image is the benchmark's python image (``scripts/bench/images.py``, built as in
``scripts/bench_packs.py``; kept under ``--work``). The origin is nginx serving the manifest
and a zstd store with the README's headers (``tests/sitecaches.Origin``), behind
``relay.Relay`` (the WAN: ``--link``, rate and delay, no netem in this kernel). The site
caches are the tested configurations of ``tests/sitecaches.py``, started fresh (cold) for
every run, on loopback (the site's LAN is not emulated).

A "host" is one ``ocixfs mount`` of the manifest URL with its own cache directory, then the
workload (``python3 -c "import json, email, http.client"`` in a chroot over the mount); all
hosts are released at the same moment (a barrier) and each one's start is timed from its
``ocixfs mount`` to the workload's exit. Hosts are processes of this machine, not network
namespaces: they share its loopback and CPU (2 cores), so the start times include the
contention of N mounts on one machine, which a real fleet does not have.

Modes:
  one      a single host, direct: the reference for bytes and requests
  direct   N hosts, each straight to the origin
  squid    N hosts, --proxy SQUID --proxy DIRECT (manifest and blobs through Squid)
  nginx    N hosts, --store NGINX-CACHE --store ORIGIN (nginx proxy_cache as a mirror)

Reported per mode (medians over --runs): requests and body bytes the origin sent, and their
ratio to one host's; the median and the slowest host's start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from bench_packs import OCIXFS, SPEC, ensure_image, fresh, run, workload  # noqa: E402
from relay import LINKS, Relay  # noqa: E402
from servers import is_mounted, unmount  # noqa: E402

from tests.sitecaches import NginxCache, Origin, Squid  # noqa: E402

MODES = ("one", "direct", "squid", "nginx")


def host(work: Path, number: int, image_url: str, args: list[str],
         barrier: threading.Barrier, results: dict[int, Any]) -> None:
    """One host: mount with its own cache, run the workload, unmount; its start time."""
    mnt, cache = fresh(work / f"mnt{number}"), fresh(work / f"cache{number}")
    barrier.wait()
    start = time.perf_counter()
    try:
        run([OCIXFS, "mount", image_url, mnt, "--cache-dir", cache, "--prefetch", "none",
             "--log-file", work / f"daemon{number}.log", *args])
        try:
            workload(mnt)
            results[number] = time.perf_counter() - start
        finally:
            run([OCIXFS, "umount", mnt])
    except Exception as exc:  # noqa: BLE001 - reported in the table's row
        results[number] = repr(exc)
    finally:
        if is_mounted(mnt):
            unmount(mnt, work / "umount.log")


@contextlib.contextmanager
def site_cache(mode: str, work: Path, origin_url: str) -> Iterator[tuple[str, list[str]]]:
    """The manifest URL and mount options of ``mode``, with its cache running (fresh)
    meanwhile. The nginx mirror serves the manifest too (a site's hosts would name it)."""
    image, store = f"{origin_url}python.ocix", f"{origin_url}store/"
    if mode == "squid":
        with Squid() as squid:
            yield image, ["--proxy", squid.url, "--proxy", "DIRECT", "--store", store]
    elif mode == "nginx":
        with NginxCache(origin_url, fresh(work / "nginx-cache")) as cache:
            yield f"{cache.url}python.ocix", ["--store", f"{cache.url}store/", "--store", store]
    else:
        yield image, ["--store", store]


def one_run(mode: str, hosts: int, work: Path, origin: Origin, relay: Relay) -> dict[str, Any]:
    count = 1 if mode == "one" else hosts
    origin_url = f"http://127.0.0.1:{relay.port}/"
    before = origin.sent()
    relay.reset_counters()
    results: dict[int, Any] = {}
    with site_cache(mode, work, origin_url) as (image_url, args):
        barrier = threading.Barrier(count)
        threads = [threading.Thread(target=host, args=(work, n, image_url, args, barrier,
                                                       results))
                   for n in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    after = origin.sent()
    failures = [value for value in results.values() if not isinstance(value, float)]
    if failures:
        raise RuntimeError(f"{mode}: {len(failures)} hosts failed: {failures[0]}")
    times = sorted(results.values())
    return {"mode": mode, "hosts": count, "requests": after[0] - before[0],
            "bytes": after[1] - before[1], "link_bytes": relay.counters().bytes_down,
            "start_median_s": statistics.median(times), "start_max_s": times[-1]}


def summarise(runs: list[dict[str, Any]], modes: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        rows.append({key: statistics.median(r[key] for r in mine) if key != "mode" else mode
                     for key in mine[0]})
    one = next((row for row in rows if row["mode"] == "one"), None)
    for row in rows:
        row["bytes_vs_one"] = row["bytes"] / one["bytes"] if one else None
        row["requests_vs_one"] = row["requests"] / one["requests"] if one else None
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | hosts | origin requests | × one host | origin MB | × one host "
             "| start, median | start, slowest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['hosts']:.0f} | {row['requests']:.0f} "
            f"| {_ratio(row['requests_vs_one'])} | {row['bytes'] / 1e6:.1f} "
            f"| {_ratio(row['bytes_vs_one'])} | {row['start_median_s']:.2f} s "
            f"| {row['start_max_s']:.2f} s |")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    """A ratio to the one-host mode, or a dash when that mode did not run."""
    return "–" if value is None else f"{value:.2f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ocixfs-fleet"),
                        help="where the image, its store and the runs live")
    parser.add_argument("--hosts", type=int, default=8, help="hosts starting at once (N)")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode")
    parser.add_argument("--link", default="100mbit", choices=sorted(LINKS),
                        help="the emulated WAN between the site and the origin")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    parser.add_argument("--json", type=Path, help="also write every run and the medians here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.hosts < 1:
        parser.error("--runs and --hosts must be positive")
    if set(args.modes.split(",")) - set(MODES):
        parser.error(f"--modes: of {', '.join(MODES)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts, chroot, nginx and squid as root)")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        os.environ.pop(name, None)
        os.environ.pop(name.lower(), None)
    modes = args.modes.split(",")
    ocix, store = ensure_image(args.work)
    site = fresh(args.work / "origin-root")
    (site / "python.ocix").symlink_to(ocix)
    (site / "store").symlink_to(store)
    runs: list[dict[str, Any]] = []
    hosts_dir = args.work / "hosts"
    with Origin(site, fresh(args.work / "origin")) as origin, \
            Relay(target=("127.0.0.1", origin.port), link=LINKS[args.link]) as relay:
        for round_ in range(args.runs):
            shift = round_ % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                result = one_run(mode, args.hosts, fresh(hosts_dir), origin, relay)
                runs.append({**result, "round": round_})
                print(f"{mode:<7} round {round_ + 1}: {result['requests']} requests, "
                      f"{result['bytes'] / 1e6:.1f} MB from the origin, start median "
                      f"{result['start_median_s']:.2f} s, slowest {result['start_max_s']:.2f} s",
                      file=sys.stderr)
    shutil.rmtree(hosts_dir, ignore_errors=True)
    rows = summarise(runs, modes)
    header = (f"{SPEC.name} image, workload `{SPEC.workload.describe()}`, {args.hosts} hosts, "
              f"link {args.link}, medians of {args.runs} runs; load average "
              f"{os.getloadavg()[0]:.2f} at the end")
    if args.json:  # first: the runs are kept whatever happens to the table
        args.json.write_text(json.dumps({"header": header, "summary": rows, "runs": runs},
                                        indent=1) + "\n")
    print(header)
    print(render(rows))


if __name__ == "__main__":
    main()
