#!/usr/bin/env python3
"""Does HTTP/2 multiplexing fetch a container start-up's blobs faster than HTTP/1.1?

    sudo venv/bin/python scripts/bench_http2.py [--reps 7] [--link 100mbit] [--json FILE]

Needs root (the nginx template runs as ``user root``) and the ``h2`` package in the venv
(``venv/bin/pip install h2``; ocixfs itself does not depend on it).

The blobs are those of the python image's start-up profile (the ``paths`` of
``lower-bound.json``: every blob of every file, first occurrence only, in profile order),
fetched as ``<store>/blobs/blake3/<hex>.zst`` exactly as the fetcher names them (the plain
name when a blob has no ``.zst``, so no request 404s). Bodies are counted, not
decompressed or hashed: that work does not depend on the protocol. Every body must be
exactly as long as its store file.

Two nginx servers (one process each, ``worker_processes 1``) serve the store: the bench's
own HTTP/1.1 configuration (``servers.nginx``) and the same template with ``listen … http2``
(cleartext HTTP/2 with prior knowledge, h2c) and, unless ``--h2-sendfile``, ``sendfile
off``: with sendfile, nginx 1.22's HTTP/2 sends a small response's HEADERS and DATA frames
as two writes and the DATA waits ~40 ms for the delayed ACK of the first (Nagle), which
doubles the sequential time; HTTP/1.1 shows no such stall with either setting.
Each sits behind its own ``relay.Relay``
(default 100 Mbit/s, 20 ms RTT), run in a child process so that ``time.process_time`` of
this process is the HTTP client's CPU alone.

Modes (each run builds a fresh ``httpx.AsyncClient`` under trio, so fresh connections; the
same timeouts and pool limits as ocixfs's ``make_http_client``; requests start in profile
order, at most N in flight):

  h1-16   HTTP/1.1, 16 in flight: what ocixfs does today (on-demand slots)
  h2-16   HTTP/2 prior knowledge (http1=False, http2=True), 16 streams on one connection
  h2-all  HTTP/2, every blob requested at once
  h1-seq  HTTP/1.1, one request after another (the on-demand pattern without a profile)
  h2-seq  HTTP/2, one request after another

A round runs every mode once; rounds rotate the order of the modes so no mode always runs
first. Untimed warm-up rounds first (page cache, nginx open files). The clock runs from the
client's first request to the end of ``aclose()``; client construction (identical for all
modes) is not timed.

Columns: median wall seconds (and min–max), median client CPU seconds and CPU/wall,
median CPU seconds of the nginx worker and of the relay process (from /proc, in 10 ms
ticks; the relay is Python too: if it saturated a core, the relay and not the protocol
would be the limit), payload MB through the relay (both directions), connections the relay
accepted. Every run also checks the protocol the responses reported. Not modelled by the
relay: TCP slow start, loss, header overhead — slow start would favour the 16 connections
of HTTP/1.1 (they ramp up in parallel).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import servers  # noqa: E402
from relay import LINKS, Counters, Relay  # noqa: E402

from ocixfs.config import DEFAULT_FETCH_CONFIG  # noqa: E402
from ocixfs.image.format import Chunk, decode  # noqa: E402
from ocixfs.image.tree import Tree  # noqa: E402

BENCH = Path(os.environ.get("OCIXFS_BENCH_DIR", "/var/tmp/ocixfs-bench"))
DEFAULT_IMAGE_DIR = BENCH / "images/python/ocix/68f12728ba580a97-zstd"
DEFAULT_PROFILE = BENCH / "images/python/lower-bound.json"
RELAY_TIMEOUT = 10.0
HEADERS = {"Accept-Encoding": "identity"}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    http2: bool
    in_flight: int | None  # None: every blob at once
    about: str


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("h1-16", False, 16, "HTTP/1.1, 16 in flight (ocixfs today)"),
        Mode("h2-16", True, 16, "HTTP/2 h2c, 1 connection, 16 streams"),
        Mode("h2-all", True, None, "HTTP/2 h2c, 1 connection, all at once"),
        Mode("h1-seq", False, 1, "HTTP/1.1, sequential"),
        Mode("h2-seq", True, 1, "HTTP/2 h2c, sequential"),
    )
}


@dataclasses.dataclass(frozen=True)
class Blob:
    name: str  # file name under blobs/blake3/
    size: int  # bytes on the server (compressed when .zst)


@dataclasses.dataclass(frozen=True)
class Run:
    mode: str
    round: int
    wall: float
    cpu: float
    server_cpu: float
    relay_cpu: float
    body_bytes: int
    link_down: int
    link_up: int
    connections: int
    requests: int
    protocols: list[str]


# -- the blobs -------------------------------------------------------------------------------


def profile_blobs(image_dir: Path, profile: Path) -> list[Blob]:
    """The distinct blobs of the profile's files, in profile order, as the store names them."""
    manifests = sorted(image_dir.glob("*.ocix"))
    if len(manifests) != 1:
        raise SystemExit(f"expected one .ocix manifest in {image_dir}, found {len(manifests)}")
    tree = Tree.from_manifest(decode(manifests[0].read_bytes(), source=str(manifests[0])))
    paths: list[str] = json.loads(profile.read_text())["paths"]
    blobs_dir = image_dir / "store" / "blobs" / "blake3"
    seen: set[bytes] = set()
    blobs: list[Blob] = []
    for path in paths:
        node = tree.node_by_path(path)
        if node is None:
            raise SystemExit(f"{path}: not in {manifests[0]}")
        chunks: tuple[Chunk, ...] = node.blobs
        for chunk in chunks:
            if chunk.digest in seen:
                continue
            seen.add(chunk.digest)
            zst = blobs_dir / f"{chunk.hex}.zst"
            name = zst.name if zst.exists() else chunk.hex
            blobs.append(Blob(name, (blobs_dir / name).stat().st_size))
    return blobs


# -- servers and the relay -------------------------------------------------------------------


def _ticks_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nginx_workers(run_dir: Path) -> list[int]:
    master = int((run_dir / "nginx.pid").read_text())
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


@dataclasses.dataclass(frozen=True)
class Server:
    port: int
    workers: list[int]

    def cpu(self) -> float:
        return sum(_ticks_cpu(pid) for pid in self.workers)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((servers.LOOPBACK, port)) == 0


def _workers_up(run_dir: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return bool(_nginx_workers(run_dir))
    return False


@contextlib.contextmanager
def nginx_h1(root: Path, run_dir: Path) -> Iterator[Server]:
    with servers.nginx(root, run_dir) as server:
        servers.wait_until(lambda: _workers_up(run_dir), servers.START_DEADLINE, "nginx workers")
        yield Server(server.port, _nginx_workers(run_dir))


def _edit(template: str, old: str, new: str) -> str:
    if old not in template:
        raise RuntimeError(f"servers.NGINX_CONF has no {old!r} to turn into {new!r}")
    return template.replace(old, new)


@contextlib.contextmanager
def nginx_h2(root: Path, run_dir: Path, *, sendfile: bool) -> Iterator[Server]:
    """servers.nginx's configuration with ``http2`` on the listen line (h2c, prior knowledge)
    and, unless ``sendfile``, ``sendfile off``."""
    template = _edit(servers.NGINX_CONF, "listen {host}:{port};", "listen {host}:{port} http2;")
    if not sendfile:
        template = _edit(template, "sendfile on;", "sendfile off;")
    run_dir.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    conf = run_dir / "nginx.conf"
    conf.write_text(template.format(run=run_dir, host=servers.LOOPBACK, port=port, root=root,
                                    locations=servers.PLAIN))
    argv: list[str | Path] = ["nginx", "-c", conf, "-p", run_dir, "-e", run_dir / "error.log"]
    with servers.started(argv, run_dir / "nginx.out", stop_signal=signal.SIGQUIT) as proc:
        servers.wait_until(
            lambda: _accepts(port) and _workers_up(run_dir),
            servers.START_DEADLINE,
            "nginx (http2)",
            alive=lambda: proc.poll() is None,
        )
        yield Server(port, _nginx_workers(run_dir))


def _serve_relay(
    target: tuple[str, int], link: str, conn: multiprocessing.connection.Connection
) -> None:
    """Child process: run a Relay and answer 'reset' / 'counters' until 'stop' or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        relay = Relay(target=target, link=LINKS[link]).start()
    except Exception as exc:  # reported to the parent, which raises
        conn.send(("error", str(exc)))
        return
    try:
        conn.send(("port", relay.port))
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command == "reset":
                relay.reset_counters()
                conn.send(None)
            elif command == "counters":
                conn.send(dataclasses.asdict(relay.counters()))
            else:
                return
    finally:
        relay.close()


class RelayProcess:
    """A relay.Relay in a child process, so its CPU does not count as the client's."""

    def __init__(self, target: tuple[str, int], link: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(
            target=_serve_relay, args=(target, link, child), name="relay", daemon=True
        )
        self._proc.start()
        child.close()
        kind, value = self._receive()
        if kind != "port":
            self.close()
            raise RuntimeError(f"relay: {value}")
        self.port: int = value

    def _receive(self) -> Any:
        if not self._conn.poll(RELAY_TIMEOUT):
            raise RuntimeError("relay process does not answer")
        return self._conn.recv()

    def _ask(self, command: str) -> Any:
        self._conn.send(command)
        return self._receive()

    def reset(self) -> None:
        self._ask("reset")

    def counters(self) -> Counters:
        return Counters(**self._ask("counters"))

    def cpu(self) -> float:
        assert self._proc.pid is not None
        return _ticks_cpu(self._proc.pid)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send("stop")
        self._proc.join(RELAY_TIMEOUT)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(RELAY_TIMEOUT)
        self._conn.close()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- one measurement -------------------------------------------------------------------------


def make_client(http2: bool) -> httpx.AsyncClient:
    """ocixfs's pool limits and timeouts (fetcher.make_http_client, transport._timeout);
    only the protocol differs. No proxies from the environment: the relay is on loopback."""
    config = DEFAULT_FETCH_CONFIG
    slots = config.on_demand_slots + config.background_slots
    return httpx.AsyncClient(
        http1=not http2,
        http2=http2,
        limits=httpx.Limits(max_connections=slots + 2, max_keepalive_connections=slots),
        timeout=httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.read_timeout,
            pool=config.deadline,
        ),
        trust_env=False,
        headers={"User-Agent": "ocixfs"},
    )


@dataclasses.dataclass
class _Tally:
    wall: float = 0.0
    cpu: float = 0.0
    body_bytes: int = 0
    protocols: set[str] = dataclasses.field(default_factory=set)


async def fetch_all(base: str, blobs: Sequence[Blob], mode: Mode) -> _Tally:
    """Fetch every blob with a fresh client; raise if any body has the wrong length."""
    tally = _Tally()
    in_flight = trio.Semaphore(mode.in_flight or len(blobs))
    client = make_client(mode.http2)

    async def fetch(blob: Blob) -> None:
        try:
            received = 0
            url = f"{base}/blobs/blake3/{blob.name}"
            async with client.stream("GET", url, headers=HEADERS) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{blob.name}: HTTP {r.status_code}")
                tally.protocols.add(r.http_version)
                async for piece in r.aiter_raw():
                    received += len(piece)
            if received != blob.size:
                raise RuntimeError(f"{blob.name}: {received} bytes, the store has {blob.size}")
            tally.body_bytes += received
        finally:
            in_flight.release()

    wall, cpu = time.perf_counter(), time.process_time()
    async with client, trio.open_nursery() as nursery:
        for blob in blobs:  # start in profile order
            await in_flight.acquire()
            nursery.start_soon(fetch, blob)
    tally.wall = time.perf_counter() - wall
    tally.cpu = time.process_time() - cpu
    return tally


def measure(
    mode: Mode, round_: int, blobs: Sequence[Blob], server: Server, relay: RelayProcess
) -> Run:
    relay.reset()
    gc.collect()
    server_cpu, relay_cpu = server.cpu(), relay.cpu()
    tally = trio.run(fetch_all, f"http://{servers.LOOPBACK}:{relay.port}", blobs, mode)
    server_cpu, relay_cpu = server.cpu() - server_cpu, relay.cpu() - relay_cpu
    counters = relay.counters()
    expected = "HTTP/2" if mode.http2 else "HTTP/1.1"
    if tally.protocols != {expected}:
        raise RuntimeError(f"{mode.name}: responses came as {sorted(tally.protocols)}")
    return Run(
        mode=mode.name,
        round=round_,
        wall=tally.wall,
        cpu=tally.cpu,
        server_cpu=server_cpu,
        relay_cpu=relay_cpu,
        body_bytes=tally.body_bytes,
        link_down=counters.bytes_down,
        link_up=counters.bytes_up,
        connections=counters.connections,
        requests=len(blobs),
        protocols=sorted(tally.protocols),
    )


# -- report ----------------------------------------------------------------------------------


def summarise(runs: Sequence[Run], modes: Sequence[Mode]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mode in modes:
        mine = [r for r in runs if r.mode == mode.name]
        walls = [r.wall for r in mine]
        rows.append(
            {
                "mode": mode.name,
                "about": mode.about,
                "runs": len(mine),
                "wall_s": statistics.median(walls),
                "wall_min_s": min(walls),
                "wall_max_s": max(walls),
                "cpu_s": statistics.median(r.cpu for r in mine),
                "cpu_per_wall": statistics.median(r.cpu / r.wall for r in mine),
                "server_cpu_s": statistics.median(r.server_cpu for r in mine),
                "relay_cpu_s": statistics.median(r.relay_cpu for r in mine),
                "body_bytes": statistics.median(r.body_bytes for r in mine),
                "link_bytes": statistics.median(r.link_down + r.link_up for r in mine),
                "connections": statistics.median(r.connections for r in mine),
                "requests": mine[0].requests,
                "protocol": ",".join(mine[0].protocols),
            }
        )
    return rows


def render(rows: Sequence[dict[str, Any]], header: Sequence[str]) -> str:
    base = {row["mode"]: row["wall_s"] for row in rows}.get("h1-16")
    lines = [*header, ""]
    lines.append(
        "| mode   | what                                  | wall s (min–max)    | vs h1-16 "
        "| client CPU s | CPU/wall | nginx CPU s | relay CPU s | link MB | conns |"
    )
    lines.append(
        "|--------|---------------------------------------|---------------------|---------:"
        "|-------------:|---------:|------------:|------------:|--------:|------:|"
    )
    for row in rows:
        ratio = f"{row['wall_s'] / base:.2f}×" if base else "–"
        wall = f"{row['wall_s']:.3f} ({row['wall_min_s']:.3f}–{row['wall_max_s']:.3f})"
        lines.append(
            f"| {row['mode']:<6} | {row['about']:<37} | {wall:<19} | {ratio:>8} "
            f"| {row['cpu_s']:>12.3f} | {row['cpu_per_wall']:>7.0%} "
            f"| {row['server_cpu_s']:>11.3f} | {row['relay_cpu_s']:>11.3f} "
            f"| {row['link_bytes'] / 1e6:>7.2f} | {row['connections']:>5g} |"
        )
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def _nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    return out.stderr.strip().removeprefix("nginx version: ")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--image-dir", type=Path, default=DEFAULT_IMAGE_DIR, help="holds *.ocix and store/"
    )
    parser.add_argument(
        "--profile", type=Path, default=DEFAULT_PROFILE, help="JSON with the start-up 'paths'"
    )
    parser.add_argument("--link", choices=sorted(LINKS), default="100mbit", help="emulated link")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (≥ 5; default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset (default: all)"
    )
    parser.add_argument(
        "--h2-sendfile",
        action="store_true",
        help="keep `sendfile on` for the HTTP/2 server (stalls small responses ~40 ms)",
    )
    parser.add_argument("--json", type=Path, help="also write every run and the medians here")
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be at least 5")
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root (the nginx configuration says `user root`)")
    if _version("h2") == "missing":
        raise SystemExit("HTTP/2 needs the h2 package: venv/bin/pip install h2")
    modes = [MODES[name] for name in args.modes.split(",")]
    blobs = profile_blobs(args.image_dir, args.profile)
    store = args.image_dir / "store"
    link = LINKS[args.link]
    total = sum(b.size for b in blobs)
    header = [
        f"{len(blobs)} blobs, {total / 1e6:.2f} MB on the wire (bodies), from {args.profile}",
        f"link {link.label}: {link.rate_bps / 1e6:g} Mbit/s, {link.rtt * 1000:g} ms RTT; "
        f"bodies alone take {total / link.rate_bytes:.3f} s at the link rate",
        f"medians of {args.reps} rounds (modes rotated each round, {args.warmup} warm-up); "
        f"nginx {_nginx_version()}, httpx {_version('httpx')}, httpcore {_version('httpcore')}, "
        f"h2 {_version('h2')}; load average {os.getloadavg()[0]:.2f}",
        f"nginx sendfile: on for HTTP/1.1, {'on' if args.h2_sendfile else 'off'} for HTTP/2",
    ]

    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-http2-")))
        h1 = stack.enter_context(nginx_h1(store, tmp / "nginx-h1"))
        h2 = stack.enter_context(nginx_h2(store, tmp / "nginx-h2", sendfile=args.h2_sendfile))
        relays = {
            False: stack.enter_context(RelayProcess((servers.LOOPBACK, h1.port), args.link)),
            True: stack.enter_context(RelayProcess((servers.LOOPBACK, h2.port), args.link)),
        }
        backends = {False: h1, True: h2}
        for round_ in range(-args.warmup, args.reps):
            shift = round_ % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                run = measure(mode, round_, blobs, backends[mode.http2], relays[mode.http2])
                label = "warm-up" if round_ < 0 else f"round {round_ + 1}/{args.reps}"
                print(
                    f"{label:>11} {mode.name:<6} {run.wall:6.3f} s wall, {run.cpu:6.3f} s CPU, "
                    f"{run.connections} conns",
                    file=sys.stderr,
                )
                if round_ >= 0:
                    runs.append(run)

    rows = summarise(runs, modes)
    print(render(rows, header))
    if args.json:
        report = {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "link": dataclasses.asdict(link),
            "blobs": len(blobs),
            "body_bytes": total,
            "reps": args.reps,
            "h2_sendfile": args.h2_sendfile,
            "header": header,
            "summary": rows,
            "runs": [dataclasses.asdict(r) for r in runs],
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
