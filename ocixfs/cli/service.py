"""``ocixfs service``: the resident host service that makes root's mounts fast."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from typing import Any

from ocixfs.cli.mount import DAEMON_MODULES

NAME = "service"
HELP = "run, start, stop or show the resident host service (mounts of root go through it)"
DESCRIPTION = """\
The ocixfs service is one process per host that has imported everything a mount needs.
'ocixfs mount' run by root hands its work to it (starting it first if it is not running)
and returns as soon as the mount serves: the mount costs a fork instead of a Python
start-up. Mounts are separate processes: stopping or killing the service leaves them
serving. It listens on /run/ocixfs/service.sock (root only; $OCIXFS_SERVICE_DIR names
another directory) and answers 'GET /metrics' there (Prometheus text).

  run      serve in the foreground (systemd: systemd/ocixfs.service, Type=notify)
  start    start it in the background unless it runs
  stop     stop it (mounts keep serving)
  status   show its pid and start time (exit 3 if it does not run)
"""

# What a mount imports, loaded once by the service so that its workers need not.
PRELOAD = (  # what a mount imports (cli.mount.DAEMON_MODULES and before), imported once
    "ocixfs.cli.mount", *DAEMON_MODULES, "ocixfs.cli.stats", "ocixfs.mount.daemon",
    "ocixfs.mount.profile", "ocixfs.mount.fromregistry", "ocixfs.mount.metrics",
    "ocixfs.cache.index", "ocixfs.cache.manifests", "ocixfs.mount.startup",
    "httpcore._backends.trio", "httpcore._backends.sync", "h11", "ctypes",
    "ocixfs.image.loading", "ocixfs.store.remote", "ocixfs.store.spec", "ocixfs.http",
    "concurrent.futures", "httpx", "trio", "pyfuse3",
)
NOT_RUNNING_STATUS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("run", "start", "stop", "status"))
    parser.add_argument("--metrics-listen", metavar="[HOST]:PORT",
                        help="with run: also answer GET /metrics on this TCP address "
                        "(default host 127.0.0.1)")
    parser.add_argument("--json", action="store_true", help="with status: one JSON document")
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from ocixfs.errors import UsageError

    if os.geteuid() != 0:
        raise UsageError(f"the ocixfs service serves root only (you are uid {os.geteuid()}); "
                         "your mounts run in their own process")
    if args.action == "run":
        return _serve(args)
    if args.action == "start":
        return _show(_request("status", start=True), args.json)
    if args.action == "stop":
        return _stop()
    answer = _request("status", start=False)
    if answer is None:
        print("ocixfs: the service is not running")
        return NOT_RUNNING_STATUS
    return _show(answer, args.json)


def _stop() -> int:
    from ocixfs.mount.serviceclient import service_paths, stop_service

    pid = stop_service(service_paths())
    print("ocixfs: the service is not running" if pid is None
          else f"stopped the ocixfs service (pid {pid}); mounts keep serving")
    return 0


def _request(op: str, *, start: bool) -> dict[str, Any] | None:
    from ocixfs.mount.serviceclient import ask_service, connect, service_paths

    conn = connect(service_paths(create=start), start=start)
    if conn is None:
        return None
    with conn:
        return ask_service(conn, op)


def _show(answer: dict[str, Any] | None, as_json: bool) -> int:
    from ocixfs.errors import OcixError
    from ocixfs.mount.serviceclient import service_paths

    if answer is None:
        raise OcixError(f"the ocixfs service did not start (see {service_paths().log})")
    if as_json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(answer["started"]))
        print(f"ocixfs service pid {answer['pid']}, since {started}, "
              f"{answer['workers']} requests in progress, socket {service_paths().socket}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ocixfs.log import timestamp_lines
    from ocixfs.mount.daemon import sd_notify
    from ocixfs.mount.metrics import host_metrics
    from ocixfs.mount.service import parse_listen, run_service

    listen = parse_listen(args.metrics_listen) if args.metrics_listen else None
    for name in PRELOAD:
        importlib.import_module(name)
    _warm_up()
    if args.listen_fd is not None:
        timestamp_lines()  # started by a mount: stderr is service.log
    return run_service(_run_in_worker, host_metrics, listen_fd=args.listen_fd,
                       metrics_listen=listen, ready=lambda: sd_notify(b"READY=1"))


def _warm_up() -> None:
    """Do once what every mount would do again and what its process inherits as is."""
    import pyfuse3

    from ocixfs.cli import parser_for
    from ocixfs.http import ssl_context
    from ocixfs.mount import kernelcache

    parser_for(["mount"])
    ssl_context(None)  # keyed on SSL_CERT_FILE/DIR: a caller with others makes its own
    kernelcache.enable(pyfuse3.__file__)  # patches this process's pyfuse3 (idempotent)
    _import_transports()


def _import_transports() -> None:
    """httpx imports its transports (httpcore, h11, anyio, certifi, idna) on first use: a
    client of each kind, made and closed here, has every mount inherit them imported
    instead of reading dozens of modules from disk (cold after boot) while it starts."""
    import httpx

    httpx.Client().close()
    client = httpx.AsyncClient()
    del client  # (closing needs an event loop; it never connected)
    "ocixfs".encode("idna")


def _run_in_worker(argv: list[str]) -> int:
    from ocixfs.cli import main

    return main(argv)


