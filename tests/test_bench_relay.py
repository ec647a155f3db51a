"""The benchmark's link emulator (scripts/bench/relay.py) adds its delay and rate limit.

Bounds are one-sided where the design guarantees them (a relay can never beat its own rate or
delay) and generous on the other side, so a busy CI machine cannot make these fail.
"""

from __future__ import annotations

import importlib.util
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

RELAY_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "relay.py"
RATE_BPS = 16e6  # 2 MB/s
PAYLOAD = 1_000_000
TIMEOUT = 20.0


def _load_relay() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_relay", RELAY_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


relay = _load_relay()


class _Handler(socketserver.StreamRequestHandler):
    """'SEND n' → n bytes then close; 'ECHO' → echo lines; 'WAITEOF' → b'bye' after EOF."""

    def handle(self) -> None:
        command = self.rfile.readline().split()
        if not command:
            return
        if command[0] == b"SEND":
            remaining = int(command[1])
            block = b"x" * 65536
            while remaining > 0:
                self.wfile.write(block[: min(remaining, len(block))])
                remaining -= min(remaining, len(block))
        elif command[0] == b"ECHO":
            for line in self.rfile:
                self.wfile.write(line)
                self.wfile.flush()
        elif command[0] == b"WAITEOF":
            received = len(self.rfile.read())
            self.wfile.write(b"bye %d" % received)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    with _Server(("127.0.0.1", 0), _Handler) as srv:
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            yield srv.server_address[0], srv.server_address[1]
        finally:
            srv.shutdown()
            thread.join(TIMEOUT)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return sock


def _download(port: int, size: int) -> int:
    with _connect(port) as sock:
        sock.sendall(b"SEND %d\n" % size)
        received = 0
        while chunk := sock.recv(65536):
            received += len(chunk)
        return received


def test_rate_limits_a_download_and_counts_its_bytes(server: tuple[str, int]) -> None:
    link = relay.LinkProfile(rate_bps=RATE_BPS, rtt=0.0)
    with relay.Relay(target=server, link=link) as r:
        start = time.monotonic()
        assert _download(r.port, PAYLOAD) == PAYLOAD
        elapsed = time.monotonic() - start
        counters = r.counters()
    ideal = PAYLOAD / link.rate_bytes  # 0.5 s
    assert elapsed >= 0.9 * ideal
    assert elapsed < 5 * ideal + 2
    assert counters.bytes_down == PAYLOAD
    assert counters.bytes_up == len(b"SEND %d\n" % PAYLOAD)
    assert counters.connections == 1


def test_connections_share_one_link(server: tuple[str, int]) -> None:
    link = relay.LinkProfile(rate_bps=RATE_BPS, rtt=0.0)
    sizes: list[int] = []
    with relay.Relay(target=server, link=link) as r:
        start = time.monotonic()
        threads = [
            threading.Thread(target=lambda: sizes.append(_download(r.port, PAYLOAD // 2)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        elapsed = time.monotonic() - start
        counters = r.counters()
    assert sizes == [PAYLOAD // 2] * 2
    assert elapsed >= 0.9 * PAYLOAD / link.rate_bytes  # together, not each, at the link rate
    assert counters.bytes_down == PAYLOAD
    assert counters.connections == 2


def test_adds_round_trip_delay_and_a_handshake(server: tuple[str, int]) -> None:
    rtt = 0.2
    link = relay.LinkProfile(rate_bps=1e9, rtt=rtt)
    with relay.Relay(target=server, link=link) as r, _connect(r.port) as sock:
        start = time.monotonic()
        sock.sendall(b"ECHO\nping\n")
        reader = sock.makefile("rb")
        assert reader.readline() == b"ping\n"
        first = time.monotonic() - start
        start = time.monotonic()
        sock.sendall(b"again\n")
        assert reader.readline() == b"again\n"
        again = time.monotonic() - start
        reader.close()
    # Handshake, then request and reply. The handshake's RTT starts at connect(), a moment
    # before ``start``: allow that moment (0.39993 s was seen for 2 * 0.2).
    assert first >= 2 * rtt - 0.02
    assert again >= rtt - 0.02
    assert first < 2 * rtt + 2 and again < rtt + 2


def test_half_close_reaches_the_server(server: tuple[str, int]) -> None:
    link = relay.LinkProfile(rate_bps=RATE_BPS, rtt=0.01)
    with relay.Relay(target=server, link=link) as r, _connect(r.port) as sock:
        sock.sendall(b"WAITEOF\n" + b"z" * 1000)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
    assert reply == b"bye 1000"


def test_reset_counters(server: tuple[str, int]) -> None:
    link = relay.LinkProfile(rate_bps=RATE_BPS, rtt=0.0)
    with relay.Relay(target=server, link=link) as r:
        _download(r.port, 1000)
        assert r.counters().bytes_down == 1000
        r.reset_counters()
        assert r.counters() == relay.Counters()


def test_parse_rate() -> None:
    assert relay.parse_rate("100M") == 100e6
    assert relay.parse_rate("20Mbit") == 20e6
    assert relay.parse_rate("1.5G") == 1.5e9
    assert relay.parse_rate("800k") == 800e3
