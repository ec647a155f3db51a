"""Run ``ocixfs inspect`` and ``ocixfs mount`` on many manifests, cheaply and in isolation.

``python -m tests.hostile.driver MOUNTPOINT STORE FILE...`` imports ocixfs once, then for
each file and each command forks a child that runs the real command line
(``ocixfs.cli.main``) under ``RLIMIT_AS`` (address space) and ``RLIMIT_CPU`` limits, with
its stderr captured. An exception escaping ``main`` is printed as Python would print it
(a traceback) and exits 1, so the caller sees exactly what a user would. One JSON line per
run on stdout: file, command, exit status, stderr, seconds, peak RSS (KiB).

Forking saves the ~1 s of imports each ``python -m ocixfs`` pays on a loaded machine.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import ocixfs.cache.blobs
import ocixfs.cli
import ocixfs.cli.inspect
import ocixfs.cli.mount
import ocixfs.http
import ocixfs.image.format
import ocixfs.image.loading
import ocixfs.image.tree
import ocixfs.mount.daemon
import ocixfs.mount.prefetch
import ocixfs.store.spec

ADDRESS_SPACE = 1 << 30
CPU_SECONDS = 60
WALL_SECONDS = 120.0


def _child(argv: list[str], stderr_fd: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(stderr_fd, 2)
    status = 1
    try:
        status = ocixfs.cli.main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        sys.stderr.flush()
        os._exit(status)


def run(argv: list[str]) -> dict[str, object]:
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(argv, err.fileno())
        deadline = started + WALL_SECONDS
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        seconds = time.monotonic() - started
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    return {"status": code, "stderr": stderr, "seconds": seconds, "maxrss_kb": usage.ru_maxrss}


def main() -> None:
    mountpoint, store, *files = sys.argv[1:]
    ocixfs.cli.build_parser()  # import every command module before forking
    baseline = (Path(__file__).parent / "baseline.ocix").read_bytes()
    ocixfs.image.format.decode(baseline)  # warm tables
    for path in files:
        for command in (["inspect", path], ["mount", path, mountpoint, "--store", store]):
            result = run(command)
            print(json.dumps({"file": os.path.basename(path), "command": command[0], **result}),
                  flush=True)


if __name__ == "__main__":
    main()
