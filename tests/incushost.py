"""A real Incus host for the tests that need one (``incus_pool``, a session fixture in
``tests/conftest.py``): Incus is installed if missing (``incus-base``; on Debian 12 from
bookworm-backports), the daemon is started if none answers (its proxy pointed at a closed
loopback port, so nothing leaves this host) and stopped again at the end, and a ``dir``
pool is made if there is none. Tests skip, saying why, only when Incus cannot be installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["incus_pool", "install_incus"]

BACKPORTS = Path("/etc/apt/sources.list.d/ocixfs-test-bookworm-backports.sources")
NO_PROXY_ENV = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}


def _run(*command: str, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def install_incus() -> str | None:
    """None once ``incus`` and ``incusd`` are installed, else why they cannot be."""
    if shutil.which("incus") and Path("/usr/libexec/incus/incusd").exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "incus is not installed and this is not root on a Debian-like host"
    release = Path("/etc/os-release").read_text()
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "incus-base"]
    if "VERSION_CODENAME=bookworm" in release:
        # Debian 12 has Incus in backports only; same mirror and keyring as the main archive.
        BACKPORTS.write_text(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n"
            "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        install[2:2] = ["-t", "bookworm-backports"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "update", "-q"], install)
    for step in steps:
        result = _run(*step, timeout=600, env=env)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return f"cannot install incus ({' '.join(step[:2])}): {lines[-1] if lines else '?'}"
    return None


@pytest.fixture(scope="session")
def incus_pool() -> Iterator[str]:
    """A running Incus daemon (started here if none answers) and the name of a dir pool."""
    if os.geteuid() != 0:
        pytest.skip("needs root (Incus, FUSE)")
    reason = install_incus()
    if reason is not None:
        pytest.skip(reason)
    daemon: subprocess.Popen[bytes] | None = None
    if _run("incus", "info", timeout=30).returncode != 0:
        log = Path("/var/log/incus")
        log.mkdir(parents=True, exist_ok=True)
        daemon = subprocess.Popen(
            ["/usr/libexec/incus/incusd", "--group", "incus-admin",
             "--logfile", os.fspath(log / "incus.log")],
            env={**os.environ, **NO_PROXY_ENV}, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = _run("incus", "admin", "waitready", "--timeout", "60", timeout=90)
        assert ready.returncode == 0, f"incusd did not start: {ready.stderr}"
    pools = json.loads(_run("incus", "storage", "list", "--format", "json").stdout)
    pool = next((p["name"] for p in pools if p["driver"] == "dir"), None)
    if pool is None:
        pool = "ocixfs-test"
        made = _run("incus", "storage", "create", pool, "dir")
        assert made.returncode == 0, made.stderr
    try:
        yield pool
    finally:
        if daemon is not None:
            _run("incus", "admin", "shutdown", timeout=120)
            with contextlib.suppress(ProcessLookupError):
                daemon.wait(timeout=30)
