"""Shared fixtures. Test tiers by how much of the stack they need:

- format, tree, profile, build: pure functions and files, no FUSE, no network;
- cache, fetcher, reader: trio + real HTTP servers from ``tests/faultserver.py``;
- fs_ops: the pyfuse3 Operations called directly (no kernel);
- mount (``@pytest.mark.mount``): the ``ocixfs`` console script mounting real FUSE
  filesystems, served by nginx or the fault server; teardown always unmounts.

Fixtures here (a module's own fixture of the same name wins):

- ``mounts``: a ``tests.mounting.Mounts`` whose leftover mounts are lazy-unmounted at teardown;
- ``serve``: ``serve(root, **options)`` starts a ``FaultServer``, stopped at teardown;
- ``store``: a ``tests.servers.Store`` of the module's ``blob_contents`` fixture (which the
  module defines) under ``tmp_path / "store"``; ``server`` serves it, and so do ``mirrors``
  (two servers).
- ``no_proxy_env``: the proxy variables (``HTTP_PROXY``…, either case) removed for the
  test; set them through the returned ``MonkeyPatch``.
"""

from __future__ import annotations

import faulthandler
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultserver import FaultServer
from tests.incushost import incus_pool  # noqa: F401 -- a fixture
from tests.mounting import Mounts
from tests.servers import FaultServers, Mirrors, Store, blob_store

faulthandler.enable()

# Root's mounts go through the host service by default; the tests mount in-process (a
# service shared by every test would outlive the session), and tests/test_service.py
# exercises the service with its own directory.
os.environ["OCIXFS_NO_SERVICE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _no_host_service_left() -> Iterator[None]:
    """Tests that run ocixfs through mount(8) or LXC hooks (which give it a clean
    environment) go through the host's real service, started on demand: stop it at the
    end if this session's ocixfs started it."""
    started = time.time()
    yield
    if os.geteuid() != 0:
        return
    from ocixfs.errors import OcixError
    from ocixfs.mount.runtime import runtime_dir_name
    from ocixfs.mount.serviceclient import (
        ServicePaths,
        ask_service,
        connect,
        identity,
        stop_service,
    )

    paths = ServicePaths(runtime_dir_name())
    try:
        conn = connect(paths, start=False)
        if conn is None:
            return
        with conn:
            status = ask_service(conn, "status")
        if status.get("identity") == identity() and status.get("started", 0) >= started:
            stop_service(paths)
    except (OcixError, OSError, ValueError):
        pass


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    made = Mounts()
    yield made
    made.close()


@pytest.fixture
def serve() -> Iterator[FaultServers]:
    servers = FaultServers()
    yield servers
    servers.close()


@pytest.fixture
def store(tmp_path: Path, blob_contents: list[bytes]) -> Store:
    return blob_store(tmp_path / "store", blob_contents)


@pytest.fixture
def server(store: Store, serve: FaultServers) -> FaultServer:
    return serve(store.root)


@pytest.fixture
def mirrors(store: Store, serve: FaultServers) -> Mirrors:
    return serve(store.root), serve(store.root)


PROXY_VARIABLES = ["http_proxy", "https_proxy", "all_proxy", "no_proxy"]


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch
