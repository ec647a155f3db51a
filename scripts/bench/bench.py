"""Container start-up over an emulated link: ocixfs side by side with what users run today.

usage: scripts/bench/run [--quick] [--images minbase,python,large] [--links 100mbit,20mbit]
                         [--contenders skopeo-umoci,casync,ocixfs,ocixfs-profile,ocixfs-recorded,
                                       ocixfs-borrowed,ocixfs-next-ondemand,ocixfs-predict,
                                       ocixfs-warm,ocixfs-warm-fresh]
                         [--runs N] [--work-dir DIR] [--json FILE] [--compress zstd|none]
                         [--manifest local|link] [--slow-run-seconds S] [--rebuild-images]
                         [--no-verify-link]
       scripts/bench/run --render RESULTS.json...

Run as root (chroot, mounts, drop_caches). ``--quick`` = python image, 100 Mbit/s link, 3
runs (about 4 minutes; everything: about an hour). Images are built once with mmdebstrap
(apt's configured sources) and cached in the work directory (default /var/tmp/ocixfs-bench,
or $OCIXFS_BENCH_DIR).

For every image x link x contender: a session starts the servers (docker-registry or nginx,
loopback only) behind a link-emulating relay (relay.py), then each run starts from a cold
cache (fresh directories, page cache dropped), starts the clock, pulls or mounts, runs the
image's workload in a chroot and stops the clock when the workload exits. Reported per row:
median / min / max seconds, MB that crossed the link (both directions, until teardown),
requests the server logged, speed-up against skopeo+umoci, and time over the lower bound
(bytes of the files the workload opens, from strace, divided by the link rate).

The table goes to stdout, progress to stderr, everything (every run) to the JSON file
(default WORK/results/bench-<time>.json). See scripts/bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import images
import servers
from contenders import CONTENDERS, RunResult, SessionContext
from relay import LINKS, LinkProfile, Relay

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORK = Path(os.environ.get("OCIXFS_BENCH_DIR", "/var/tmp/ocixfs-bench"))
SCRATCH_GB = 24
PROBE_BYTES = 20 * 10**6
CURL_TIMEOUT = 120.0
OCIX_BUILD_TIMEOUT = 3600.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def csv_of(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench/run",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="python image, 100mbit link, 3 runs (other selections still apply)",
    )
    parser.add_argument(
        "--images",
        type=csv_of(list(images.IMAGES)),
        default=list(images.IMAGES),
        help="comma list (default: all)",
    )
    parser.add_argument(
        "--links", type=csv_of(list(LINKS)), default=list(LINKS), help="comma list (default: all)"
    )
    parser.add_argument(
        "--contenders",
        type=csv_of(list(CONTENDERS)),
        default=list(CONTENDERS),
        help="comma list (default: all)",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per row (default 3)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--json", type=Path, help="results file (default WORK/results/...)")
    parser.add_argument("--ocixfs", type=Path, default=REPO / "venv" / "bin" / "ocixfs")
    parser.add_argument(
        "--compress",
        choices=["zstd", "none"],
        default="zstd",
        help="ocixfs build --compress (default zstd)",
    )
    parser.add_argument(
        "--manifest",
        choices=["link", "local"],
        default="link",
        help="ocixfs reads the manifest over the link (default) or locally",
    )
    parser.add_argument(
        "--slow-run-seconds",
        type=float,
        default=240.0,
        help="a row stops after a run slower than this (default 240; casync on the large "
        "image over 20 Mbit/s takes 7 minutes a run)",
    )
    parser.add_argument("--rebuild-images", action="store_true")
    parser.add_argument("--no-verify-link", dest="verify_link", action="store_false")
    parser.add_argument(
        "--render",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: print the table of earlier results files (rows in the given order)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        if not any(a.startswith("--images") for a in given):
            args.images = ["python"]
        if not any(a.startswith("--links") for a in given):
            args.links = ["100mbit"]
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    log(f"got {signal.Signals(signum).name} at {datetime.datetime.now():%H:%M:%S}; tearing down")
    raise KeyboardInterrupt(signal.Signals(signum).name)


# -- link verification -----------------------------------------------------------------------


def _curl(urls: Sequence[str]) -> list[dict[str, float]]:
    fields = ["time_connect", "time_starttransfer", "time_total", "size_download"]
    fmt = " ".join("%{" + f + "}" for f in fields) + "\\n"
    argv = ["curl", "-sS", "--fail"]
    for url in urls:
        argv += ["-o", "/dev/null", "-w", fmt, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=CURL_TIMEOUT, check=True)
    return [
        dict(zip(fields, map(float, line.split()), strict=True)) for line in out.stdout.splitlines()
    ]


def verify_link(link: LinkProfile, work: Path, scratch: Path) -> dict[str, float]:
    """Download a file of known size and a tiny one through the relay, as curl sees it."""
    probe = work / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    big = probe / "probe-20M"
    if not big.is_file() or big.stat().st_size != PROBE_BYTES:
        big.write_bytes(os.urandom(PROBE_BYTES))
    (probe / "tiny").write_bytes(b"x")
    with (
        servers.nginx(probe, scratch / f"verify-{link.label}") as server,
        Relay(target=("127.0.0.1", server.port), link=link) as relay,
    ):
        base = f"http://127.0.0.1:{relay.port}"
        tiny_first, tiny_again = _curl([f"{base}/tiny", f"{base}/tiny"])
        (download,) = _curl([f"{base}/probe-20M"])
        counted = relay.counters()
    seconds = download["time_total"] - download["time_starttransfer"]
    rate = download["size_download"] * 8 / seconds
    return {
        "download_bytes": download["size_download"],
        "download_seconds": round(download["time_total"], 3),
        "goodput_bps": round(rate),
        "goodput_vs_target": round(rate / link.rate_bps, 3),
        "first_request_ttfb_s": round(tiny_first["time_starttransfer"], 4),
        "first_request_expected_s": 2 * link.rtt,
        "reused_connection_ttfb_s": round(tiny_again["time_starttransfer"], 4),
        "reused_connection_expected_s": link.rtt,
        "relay_bytes_down": counted.bytes_down,
    }


# -- artefacts -------------------------------------------------------------------------------


def prepare_image(
    name: str, args: argparse.Namespace, scratch: Path, wanted: set[str]
) -> dict[str, object]:
    spec = images.IMAGES[name]
    image_dir = args.work_dir / "images" / name
    t0 = time.monotonic()
    log(f"[{name}] OCI layout (mmdebstrap + umoci; cached)...")
    info: dict[str, object] = dict(
        images.build_oci(spec, image_dir, scratch, rebuild=args.rebuild_images)
    )
    info.pop("key", None)
    info["workload"] = spec.workload.describe()
    if "casync" in wanted:
        log(f"[{name}] casync store (cached)...")
        images.build_casync(spec, image_dir)
    bound = images.measure_lower_bound(spec, image_dir)
    info["lower_bound"] = {"files": bound.files, "bytes": bound.bytes}
    if any(CONTENDERS[c].needs_ocixfs for c in wanted):
        log(f"[{name}] ocixfs build (cached per ocixfs source version)...")
        t1 = time.monotonic()
        try:
            image, store = images.build_ocix(
                spec,
                image_dir,
                args.ocixfs,
                REPO,
                compress=None if args.compress == "none" else args.compress,
            )
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            info["ocix_error"] = str(exc)
            log(f"[{name}] ocixfs build failed: {exc}")
        else:
            info["ocix"] = {
                "image": str(image),
                "store": str(store),
                "manifest_bytes": image.stat().st_size,
                "store_bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
                "build_or_check_seconds": round(time.monotonic() - t1, 1),
            }
    next_version = {"ocixfs-borrowed", "ocixfs-next-ondemand"} & wanted
    if next_version and name in images.NEXT_VERSIONS and "ocix" in info:
        info["ocix_next"] = prepare_next_version(name, args, scratch)
    log(
        f"[{name}] ready in {time.monotonic() - t0:.0f} s: "
        f"{int(str(info['unpacked_bytes'])) / 1e6:.0f} MB unpacked, "
        f"lower bound {bound.files} files {bound.bytes / 1e6:.1f} MB"
    )
    return info


def prepare_next_version(name: str, args: argparse.Namespace, scratch: Path) -> dict[str, str]:
    """Version N+1 of image ``name`` (``images.NEXT_VERSIONS``): OCI layout and OCIX
    image, cached like the others."""
    spec = images.NEXT_VERSIONS[name]
    image_dir = args.work_dir / "images" / spec.name
    log(f"[{name}] version N+1 ({spec.name}: + {spec.include[-1]}; cached)...")
    images.build_oci(spec, image_dir, scratch, rebuild=args.rebuild_images)
    image, store = images.build_ocix(
        spec, image_dir, args.ocixfs, REPO,
        compress=None if args.compress == "none" else args.compress,
    )
    return {"image": str(image), "store": str(store)}


# -- the runs --------------------------------------------------------------------------------


def run_row(
    args: argparse.Namespace,
    name: str,
    link: LinkProfile,
    contender_name: str,
    info: dict[str, object],
    scratch: Path,
    rows: list[dict[str, object]],
) -> None:
    """Measure one row and append it to rows, even when interrupted half way."""
    contender = CONTENDERS[contender_name]
    row: dict[str, object] = {
        "image": name,
        "link": link.label,
        "contender": contender_name,
        "description": contender.description,
        "runs": [],
    }
    rows.append(row)
    if contender.needs_ocixfs and "ocix" not in info:
        row["error"] = f"no OCIX image: {info.get('ocix_error', 'not built')}"
        return
    ocix = info.get("ocix")
    session_dir = servers_fresh(scratch / f"{name}-{link.label}-{contender_name}")
    ctx = SessionContext(
        spec=images.IMAGES[name],
        image_dir=args.work_dir / "images" / name,
        link=link,
        scratch=session_dir,
        log=args.work_dir / "logs" / f"{name}-{link.label}-{contender_name}.log",
        ocixfs=args.ocixfs,
        ocix_image=Path(str(ocix["image"])) if isinstance(ocix, dict) else None,
        ocix_store=Path(str(ocix["store"])) if isinstance(ocix, dict) else None,
        manifest_over_link=args.manifest == "link",
        next_version=_next_version(info),
    )
    ctx.log.parent.mkdir(parents=True, exist_ok=True)
    runs: list[RunResult] = []
    try:
        with contender.session(ctx) as session:
            for i in range(args.runs):
                result = session.run_once()
                runs.append(result)
                log(
                    f"  {name} {link.label} {contender_name} run {i + 1}/{args.runs}: "
                    f"{result.seconds:.2f} s, {result.bytes_total / 1e6:.1f} MB, "
                    f"{result.requests} requests"
                )
                if result.seconds > args.slow_run_seconds and i + 1 < args.runs:
                    row["cut_short"] = f"a run took over {args.slow_run_seconds:g} s"
                    log(f"  {name} {link.label} {contender_name}: {row['cut_short']}; next row")
                    break
    except (RuntimeError, OSError, subprocess.TimeoutExpired, AssertionError) as exc:
        row["error"] = str(exc)
        log(f"  {name} {link.label} {contender_name}: FAILED: {exc} (log: {ctx.log})")
    except KeyboardInterrupt:
        row["error"] = "interrupted"
        raise
    finally:
        shutil.rmtree(session_dir, ignore_errors=True)
        summarize(row, runs)


def _next_version(info: dict[str, object]) -> tuple[Path, Path] | None:
    """(image, store) of the image's version N+1, when one was prepared."""
    found = info.get("ocix_next")
    if not isinstance(found, dict):
        return None
    return Path(str(found["image"])), Path(str(found["store"]))


def summarize(row: dict[str, object], runs: list[RunResult]) -> None:
    row["runs"] = [
        {
            "seconds": round(r.seconds, 4),
            "bytes_down": r.bytes_down,
            "bytes_up": r.bytes_up,
            "bytes_down_total": r.bytes_down_total,
            "bytes_up_total": r.bytes_up_total,
            "connections": r.connections,
            "requests": r.requests,
            **r.extra,
        }
        for r in runs
    ]
    if runs:
        seconds = [r.seconds for r in runs]
        row.update(
            median_s=round(statistics.median(seconds), 4),
            min_s=round(min(seconds), 4),
            max_s=round(max(seconds), 4),
            link_bytes=int(statistics.median(r.bytes_total for r in runs)),
            requests=int(statistics.median(r.requests for r in runs)),
        )
        mounts = [_mount_seconds(r) for r in runs]
        if all(m is not None for m in mounts):
            row["median_mount_s"] = round(statistics.median(m for m in mounts if m is not None), 4)


def _mount_seconds(run: RunResult) -> float | None:
    """How long an ocixfs run's mount command took (``steps_s``), None for other tools."""
    steps = run.extra.get("steps_s")
    if isinstance(steps, dict) and isinstance(steps.get("mount"), int | float):
        return float(steps["mount"])
    return None


def servers_fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def add_ratios(
    rows: list[dict[str, object]],
    infos: dict[str, dict[str, object]],
    links: dict[str, LinkProfile],
) -> None:
    for row in rows:
        if "median_s" not in row:
            continue
        median = float(str(row["median_s"]))
        base = next(
            (
                r
                for r in rows
                if r["image"] == row["image"]
                and r["link"] == row["link"]
                and r["contender"] == "skopeo-umoci"
                and "median_s" in r
            ),
            None,
        )
        if base is not None:
            row["speedup_vs_skopeo_umoci"] = round(float(str(base["median_s"])) / median, 2)
        bound = infos[str(row["image"])]["lower_bound"]
        assert isinstance(bound, dict)
        bound_s = bound["bytes"] / links[str(row["link"])].rate_bytes
        row["lower_bound_s"] = round(bound_s, 3)
        row["x_lower_bound"] = round(median / bound_s, 2)


# -- the table -------------------------------------------------------------------------------


def table(
    rows: list[dict[str, object]],
    infos: dict[str, dict[str, object]],
    links: dict[str, LinkProfile],
    runs: int,
) -> str:
    head = [
        "image",
        "link",
        "contender",
        "median s",
        "min-max s",
        "mount s",
        "MB link",
        "requests",
        "x faster than skopeo",
        "x lower bound",
    ]
    lines: list[list[str]] = []
    seen: set[tuple[str, str]] = set()
    for row in rows:
        key = (str(row["image"]), str(row["link"]))
        if key not in seen:
            seen.add(key)
            bound = infos[key[0]]["lower_bound"]
            assert isinstance(bound, dict)
            seconds = bound["bytes"] / links[key[1]].rate_bytes
            lines.append(
                [
                    key[0],
                    key[1],
                    f"lower bound ({bound['files']} files)",
                    f"{seconds:.2f}",
                    "",
                    "",
                    f"{bound['bytes'] / 1e6:.1f}",
                    "",
                    "",
                    "1.00",
                ]
            )
        if "median_s" not in row:
            lines.append(
                [
                    key[0],
                    key[1],
                    str(row["contender"]),
                    "FAILED: " + str(row.get("error", ""))[:80],
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                ]
            )
            continue
        speedup = row.get("speedup_vs_skopeo_umoci")
        lines.append(
            [
                key[0],
                key[1],
                str(row["contender"]),
                f"{row['median_s']:.2f}",
                f"{row['min_s']:.2f}-{row['max_s']:.2f}" + _short(row, runs),
                f"{row['median_mount_s']:.3f}" if "median_mount_s" in row else "",
                f"{int(str(row['link_bytes'])) / 1e6:.1f}",
                str(row["requests"]),
                f"{speedup:.1f}" if isinstance(speedup, float) else "",
                f"{row['x_lower_bound']:.2f}",
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    numeric = {3, 4, 5, 6, 7, 8, 9}

    def fmt(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join("-" * (w + 1) + (":" if i in numeric else "-") for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([fmt(head), rule, *(fmt(line) for line in lines)])


def _short(row: dict[str, object], runs: int) -> str:
    done = row["runs"]
    assert isinstance(done, list)
    return f" (n={len(done)})" if len(done) < runs else ""


def versions(ocixfs: Path) -> dict[str, str]:
    commands = {
        "skopeo": ["skopeo", "--version"],
        "umoci": ["umoci", "--version"],
        "casync": ["casync", "--version"],
        "nginx": ["nginx", "-v"],
        "docker-registry": ["docker-registry", "--version"],
        "mmdebstrap": ["mmdebstrap", "--version"],
        "ocixfs-git": ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
    }
    found: dict[str, str] = {}
    for name, argv in commands.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            found[name] = (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            found[name] = "unavailable"
    return found


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP unwind, saying which (unless ignored, as under nohup)."""
    wanted = [
        s
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(s) != signal.SIG_IGN
    ]
    previous = {s: signal.signal(s, _raise_interrupt) for s in wanted}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def render(files: Sequence[Path]) -> str:
    """The table of one or more results files, as one."""
    rows: list[dict[str, object]] = []
    infos: dict[str, dict[str, object]] = {}
    links: dict[str, LinkProfile] = {}
    runs = 0
    for path in files:
        data = json.loads(path.read_text())
        rows += data["rows"]
        infos.update(data["images"])
        for label, link in data["links"].items():
            links[label] = LinkProfile(name=label, rate_bps=link["rate_bps"], rtt=link["rtt_s"])
        runs = max(runs, int(data["options"]["runs"]))
    return table(rows, infos, links, runs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(render(args.render))
        return 0
    if os.geteuid() != 0:
        log("scripts/bench/run: must run as root (chroot, mounts, drop_caches)")
        return 2
    args.work_dir = args.work_dir.resolve()
    args.ocixfs = args.ocixfs.absolute()
    started = datetime.datetime.now(datetime.UTC)
    json_path = args.json or (args.work_dir / "results" / f"bench-{started:%Y%m%d-%H%M%S}.json")
    links = {LINKS[name].label: LINKS[name] for name in args.links}
    wanted = set(args.contenders)
    results: dict[str, object] = {
        "started": started.isoformat(timespec="seconds"),
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": versions(args.ocixfs),
        "options": {
            "images": args.images,
            "links": args.links,
            "contenders": args.contenders,
            "runs": args.runs,
            "compress": args.compress,
            "manifest": args.manifest,
            "slow_run_seconds": args.slow_run_seconds,
        },
    }
    link_info: dict[str, dict[str, object]] = {
        k: {"rate_bps": v.rate_bps, "rtt_s": v.rtt} for k, v in links.items()
    }
    results["links"] = link_info
    rows: list[dict[str, object]] = []
    infos: dict[str, dict[str, object]] = {}
    t0 = time.monotonic()
    try:
        with work_dir_lock(args.work_dir):
            measure_all(args, links, link_info, wanted, infos, rows)
    except WorkDirBusy as exc:
        log(f"scripts/bench/run: {exc}")
        return 2
    except KeyboardInterrupt:
        results["interrupted"] = True
        log("interrupted: everything is torn down; writing the rows that finished")
    add_ratios(rows, infos, links)
    results.update(
        images=infos,
        rows=rows,
        finished=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        wall_seconds=round(time.monotonic() - t0, 1),
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(rows, infos, links, args.runs))
    log(f"results: {json_path} (took {time.monotonic() - t0:.0f} s)")
    if results.get("interrupted"):
        return 130
    return 1 if any("error" in r for r in rows) else 0


class WorkDirBusy(Exception):
    pass


@contextlib.contextmanager
def work_dir_lock(work: Path) -> Iterator[None]:
    """One benchmark per work directory: a second run would re-make the scratch file system
    under the first one's feet."""
    work.mkdir(parents=True, exist_ok=True)
    with (work / "lock").open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            raise WorkDirBusy(
                f"another benchmark (pid {owner}) is using {work}; wait, or pass --work-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def measure_all(
    args: argparse.Namespace,
    links: dict[str, LinkProfile],
    link_info: dict[str, dict[str, object]],
    wanted: set[str],
    infos: dict[str, dict[str, object]],
    rows: list[dict[str, object]],
) -> None:
    with (
        signals_as_interrupts(),
        servers.scratch_fs(
            args.work_dir / "scratch.img",
            args.work_dir / "scratch",
            SCRATCH_GB,
            args.work_dir / "logs" / "scratch.log",
        ) as scratch,
    ):
        if args.verify_link:
            for label, link in links.items():
                check = verify_link(link, args.work_dir, scratch)
                link_info[label]["verify"] = check
                log(
                    f"[link {label}] 20 MB: {check['goodput_bps'] / 1e6:.1f} Mbit/s "
                    f"({check['goodput_vs_target']:.0%} of target); first-byte "
                    f"{check['first_request_ttfb_s'] * 1000:.0f} ms on a new connection "
                    f"(2 RTT = {2 * link.rtt * 1000:.0f}), "
                    f"{check['reused_connection_ttfb_s'] * 1000:.0f} ms on a reused one"
                )
        for name in args.images:
            try:
                infos[name] = prepare_image(name, args, scratch, wanted)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                log(f"[{name}] image preparation failed: {exc}")
                infos[name] = {"error": str(exc)}
                continue
            for link in links.values():
                for contender in args.contenders:
                    run_row(args, name, link, contender, infos[name], scratch, rows)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
