"""Real site caches for tests and ``scripts/bench_fleet.py``: Squid (a forward proxy,
``--proxy``) and nginx ``proxy_cache`` (a mirror, ``--store``), in front of an nginx origin
that sends the headers the README recommends and logs what it sent.

    with Origin(store_root, work) as origin, Squid() as squid:
        ... mount with --proxy squid.url --proxy DIRECT ...
        origin.sent("/blobs/")  # (requests, body bytes) the origin answered

The cache directives here are the ones the README's "Serving many hosts" documents (the
rest is test plumbing: ports, paths, logs). Both skip the test when their server is not
installed (scripts/install installs nginx-light and squid).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import pytest

from tests.nginx import PREAMBLE, TEMP_PATHS, Nginx, _free_port, wait_for_port

__all__ = ["NginxCache", "Origin", "Squid"]

SQUID = shutil.which("squid") or "/usr/sbin/squid"

# The origin: immutable, year-long blobs and packs (their names are their content);
# everything else (manifests, profiles, ocix-store.json) fresh for a minute.
ORIGIN_CONFIG = PREAMBLE + """\
master_process off;
http {{
    log_format counted '$request_uri $status $body_bytes_sent "$http_via"';
    access_log {work}/access.log counted;
""" + TEMP_PATHS + """\
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        limit_rate {rate};
        location ~ /(blobs/blake3|packs)/[0-9a-f]+[^/]*$ {{
            add_header Cache-Control "public, max-age=31536000, immutable";
        }}
        location / {{
            add_header Cache-Control "public, max-age=60" always;
        }}
    }}
}}
"""

# nginx as a site mirror: a caching reverse proxy of the origin; one request per blob
# reaches the origin (proxy_cache_lock), later ones are hits.
NGINX_CACHE_CONFIG = PREAMBLE + """\
master_process off;
http {{
    access_log {work}/access.log;
""" + TEMP_PATHS + """\
    proxy_cache_path {work}/cache levels=1:2 keys_zone=ocixfs:10m max_size=10g
                     inactive=30d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {origin};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache ocixfs;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 5s;
            proxy_cache_lock_age 5s;
            proxy_cache_valid 200 10m;
            proxy_cache_use_stale error timeout updating;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"""

SQUID_CONFIG = r"""\
http_port 127.0.0.1:{port}
cache_dir ufs {work}/cache 1024 16 256
cache_mem 64 MB
maximum_object_size 4 GB
maximum_object_size_in_memory 8 MB
collapsed_forwarding on
refresh_pattern /blobs/blake3/[0-9a-f]+(\.zst)?$ 525600 100% 525600 override-expire override-lastmod
refresh_pattern /packs/[0-9a-f]+\.[0-9]+\.pack$ 525600 100% 525600 override-expire override-lastmod
refresh_pattern . 0 20% 4320
http_access allow localhost
http_access deny all
pid_filename {work}/squid.pid
access_log stdio:{work}/access.log
cache_log {work}/cache.log
cache_store_log none
coredump_dir {work}
pinger_enable off
visible_hostname ocixfs-site-cache
shutdown_lifetime 0 seconds
"""


class Origin(Nginx):
    """The origin: nginx serving ``root`` with the recommended headers, each response at
    most ``rate`` (nginx ``limit_rate``: ``0`` is unlimited) per connection."""

    def __init__(self, root: Path, work: Path, *, rate: str = "0") -> None:
        super().__init__(root, work, config=ORIGIN_CONFIG, rate=rate)

    def sent(self, under: str = "/", *, via: bool | None = None) -> tuple[int, int]:
        """``(requests, body bytes)`` answered so far for paths containing ``under``;
        ``via``: only those that came through a proxy (True) or not (False)."""
        log = self.work / "access.log"
        requests = sent = 0
        for line in log.read_text().splitlines() if log.exists() else []:
            path, _status, size, proxy = line.split(" ", 3)
            if under not in path or (via is not None and via != (proxy != '"-"')):
                continue
            requests += 1
            sent += int(size)
        return requests, sent


class NginxCache(Nginx):
    """nginx ``proxy_cache`` in front of ``origin`` (a URL), used as a mirror store."""

    def __init__(self, origin: str, work: Path) -> None:
        super().__init__(work, work, config=NGINX_CACHE_CONFIG, origin=origin.rstrip("/"))


class Squid:
    """``squid -N`` with ``SQUID_CONFIG`` on a free loopback port, in a private temporary
    directory owned by the user Squid runs as; ``kill()`` is a crash, exit stops it and
    removes the directory."""

    def __init__(self) -> None:
        if not os.path.exists(SQUID):
            pytest.skip("squid is not installed (scripts/install installs it)")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = Path(tempfile.mkdtemp(prefix="ocixfs-squid-"))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Squid:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        config = self.work / "squid.conf"
        config.write_text(SQUID_CONFIG.format(work=self.work, port=self.port))
        user = pwd.getpwnam("proxy")  # Debian's squid runs as "proxy" when started by root
        os.chown(self.work, user.pw_uid, user.pw_gid)
        self.work.chmod(0o755)
        subprocess.run([SQUID, "-N", "-z", "-f", os.fspath(config)], check=True,
                       capture_output=True, timeout=60)
        self.process = subprocess.Popen([SQUID, "-N", "-f", os.fspath(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, "squid", self.work / "cache.log")

    def results(self) -> list[str]:
        """Squid's result code of each request so far (``TCP_MISS/200``, ``TCP_HIT/200``…)."""
        log = self.work / "access.log"
        return [line.split()[3] for line in log.read_text().splitlines()] if log.exists() else []

    def kill(self) -> None:
        """SIGKILL, as a crashed cache host."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
