"""A throw-away nginx serving a directory on a loopback port, with an access log to count
requests. Skips the test when nginx is not installed (scripts/install installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# What every test nginx shares (templates: ``{work}`` is its directory).
PREAMBLE = """\
daemon off;
user root root;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
"""
TEMP_PATHS = """\
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp;
    fastcgi_temp_path {work}/tmp;
    uwsgi_temp_path {work}/tmp;
    scgi_temp_path {work}/tmp;
"""

CONFIG = PREAMBLE + """\
worker_processes 1;
http {{
    access_log {work}/access.log;
""" + TEMP_PATHS + """\
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        gzip_static on;  # a manifest with NAME.gz beside it goes out compressed
        location / {{ }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str,
                  log: Path | None = None, *, timeout: float = 10) -> None:
    """Until ``port`` on 127.0.0.1 accepts connections; raises (with the end of ``log``)
    if ``process`` died or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log is not None and log.exists() else ""
                raise AssertionError(f"{what} did not start: {text[-2000:]}") from None
            time.sleep(0.02)


class Nginx:
    """``with Nginx(root, work) as server: server.url`` — stopped on exit, always.
    ``config`` is a template with ``{work}``, ``{port}``, ``{root}`` and the ``fields``."""

    def __init__(self, root: Path, work: Path, *, config: str = CONFIG,
                 **fields: object) -> None:
        if not os.path.exists(NGINX):
            pytest.skip("nginx is not installed (scripts/install installs nginx-light)")
        self.root = root
        self.work = work
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen[bytes] | None = None
        self.template = config
        self.fields = fields

    def __enter__(self) -> Nginx:
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.work / "nginx.conf"
        config.write_text(self.template.format(work=self.work, port=self.port, root=self.root,
                                               **self.fields))
        self.process = subprocess.Popen(
            [NGINX, "-c", os.fspath(config), "-e", os.fspath(self.work / "error.log")]
        )
        wait_for_port(self.port, self.process, "nginx", self.work / "error.log")
        return self

    def requests(self) -> list[str]:
        """The request paths logged so far."""
        log = self.work / "access.log"
        if not log.exists():
            return []
        return [
            line.split('"')[1].split()[1] for line in log.read_text().splitlines() if '"' in line
        ]

    def stop(self) -> None:
        """Stop serving (a test's "the server is gone"); stopping again is harmless."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: the server dies as a crashed host would (with ``master_process off``,
        nothing is left serving)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
