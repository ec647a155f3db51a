"""A static HTTP/1.1 server for tests that misbehaves on request, plus a blob-store maker.

``FaultServer(root)`` serves the files under ``root`` from a background thread on
127.0.0.1 (port 0 picks a free port, kept across ``stop()``/``start()``). It honours
single ``Range: bytes=a-b`` requests with 206 (416 when unsatisfiable), counts requests
per path (thread-safe) and records request headers. Faults are set per name (a request
matches when its path equals the name or its last component does; ``"*"`` matches all)::

    with FaultServer(store) as server:
        server.fault(chunk.hex, Fault(status=500))          # every GET of that blob → 500
        server.fault(chunk.hex, Fault(tamper=True), times=1) # only the first one
        server.fault("*", Fault(stall=5.0))                  # headers come after 5 s
        ... server.count(chunk.hex) ...

``FaultServer(root, tls=context)`` serves https (the handshake runs in the handler
thread); ``server.auth = "Bearer x"`` answers 401 to requests without that
``Authorization`` header.

``stop()`` closes the listening socket and every open connection and releases stalled
handlers at once, so a stopped server looks like a dead host (connection refused).

``make_store(root, contents, zstd=...)`` writes ``blobs/blake3/<hex>`` files (and
``.zst`` siblings plus ``ocix-store.json``) and returns the ``Chunk`` of each content.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import blake3
import zstandard

from ocixfs.image.format import Chunk

__all__ = ["Fault", "FaultServer", "blob_path", "make_store"]


@dataclass(frozen=True, kw_only=True)
class Fault:
    """How to misbehave for one matching request (combine freely).

    - ``status``: answer with this HTTP status and a short body instead of the file.
    - ``stall``: seconds to wait before sending anything.
    - ``stall_body``: seconds to wait after the headers and ``stall_after`` body bytes.
    - ``truncate``: send only this many body bytes (Content-Length stays the full size),
      then close the connection.
    - ``reset``: after this many body bytes, reset the connection (TCP RST).
    - ``tamper``: flip one byte in the middle of the body (same length).
    - ``extra``: bytes appended to the body (Content-Length counts them).
    - ``rate``: send the body at about this many bytes per second.
    - ``redirect``: answer 302 to ``redirect`` + the request path (another server's URL,
      or this one's for a loop).
    - ``body``: send these bytes with 200 instead of the file (an HTML error page...).
    - ``endless``: send the body without a length and never stop (until the client leaves).
    - ``header_bytes``: add response headers of about this many bytes in total.
    - ``retry_after``: send this ``Retry-After`` header (with ``status``: 503, 429).
    - ``content_encoding``: send this ``Content-Encoding`` header with the body (which
      ``body`` then gives already encoded).
    """

    status: int | None = None
    stall: float = 0.0
    stall_body: float = 0.0
    stall_after: int = 0
    truncate: int | None = None
    reset: int | None = None
    tamper: bool = False
    extra: bytes = b""
    rate: float | None = None
    redirect: str | None = None
    body: bytes | None = None
    endless: bool = False
    header_bytes: int = 0
    retry_after: str | None = None
    content_encoding: str | None = None


NO_FAULT = Fault()


def blob_path(root: Path, hexdigest: str) -> Path:
    return root / "blobs" / "blake3" / hexdigest


def make_store(root: Path, contents: Iterable[bytes], *, zstd: bool = False) -> list[Chunk]:
    """Write each content as a blob of the store at ``root``; return their chunks in order."""
    directory = root / "blobs" / "blake3"
    directory.mkdir(parents=True, exist_ok=True)
    chunks = []
    compressor = zstandard.ZstdCompressor(level=3)
    for content in contents:
        chunk = Chunk(len(content), blake3.blake3(content).digest())
        blob_path(root, chunk.hex).write_bytes(content)
        if zstd:
            blob_path(root, chunk.hex + ".zst").write_bytes(compressor.compress(content))
        chunks.append(chunk)
    if zstd:
        (root / "ocix-store.json").write_text('{"compression": ["zstd"]}')
    return chunks


class _Reset(Exception):
    """The handler reset its connection on purpose."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def handle(self) -> None:
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except (ssl.SSLError, OSError):
                return  # the client refused our certificate, or left
        super().handle()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.owner._track(self.connection, add=False)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, *, send_body: bool) -> None:
        owner = self.server.owner
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        fault = owner._begin(path, dict(self.headers.items()))
        if fault.stall and owner._sleep(fault.stall):
            self.close_connection = True
            return
        if owner.auth is not None and self.headers.get("Authorization") != owner.auth:
            self._reply(401, b"unauthorized\n", send_body=send_body)
            return
        if fault.status is not None:
            headers = {} if fault.retry_after is None else {"Retry-After": fault.retry_after}
            self._reply(fault.status, b"fault\n", send_body=send_body, headers=headers)
            return
        if fault.redirect is not None:
            self.send_response(302)
            self.send_header("Location", fault.redirect.rstrip("/") + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault.endless:
            self._send_endless(fault)
            return
        target = owner.root.joinpath(path.lstrip("/")).resolve()
        if not target.is_relative_to(owner.root) or not target.is_file():
            self._reply(404, b"not found\n", send_body=send_body)
            return
        data = target.read_bytes() if fault.body is None else fault.body
        status, data, extra_headers = _apply_range(self.headers.get("Range"), data)
        if fault.tamper and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        data += fault.extra
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra_headers.items():
            self.send_header(name, value)
        if fault.content_encoding is not None:
            self.send_header("Content-Encoding", fault.content_encoding)
        for number in range(fault.header_bytes // 1000):
            self.send_header(f"X-Padding-{number}", "p" * 980)
        self.end_headers()
        if send_body and status < 300:
            try:
                self._send_body(data, fault)
            except _Reset:
                self.close_connection = True
        elif send_body:
            self.wfile.write(data)

    def _send_endless(self, fault: Fault) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        piece = b"\0" * (max(1, int(fault.rate / 50)) if fault.rate else 1 << 16)
        with contextlib.suppress(OSError):
            while not self.server.owner._stopping.is_set():
                self.wfile.write(piece)
                if fault.rate and self.server.owner._sleep(len(piece) / fault.rate):
                    return

    def _reply(
        self, status: int, body: bytes, *, send_body: bool, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _send_body(self, data: bytes, fault: Fault) -> None:
        owner = self.server.owner
        limit = len(data) if fault.truncate is None else min(fault.truncate, len(data))
        if fault.reset is not None:
            limit = min(limit, fault.reset)
        step = max(1, int(fault.rate / 50)) if fault.rate else 1 << 16
        pause_at = fault.stall_after if fault.stall_body else None
        sent = 0
        while sent < limit or pause_at is not None:
            if pause_at is not None and sent >= min(pause_at, limit):
                pause_at = None
                self.wfile.flush()
                if owner._sleep(fault.stall_body):
                    raise _Reset
                continue
            end = min(limit, sent + step)
            if pause_at is not None:
                end = min(end, pause_at)
            self.wfile.write(data[sent:end])
            sent = end
            if fault.rate and owner._sleep(step / fault.rate):
                raise _Reset
        if fault.reset is not None:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            raise _Reset
        if limit < len(data):
            self.wfile.flush()
            raise _Reset


def _apply_range(header: str | None, data: bytes) -> tuple[int, bytes, dict[str, str]]:
    if not header or not header.startswith("bytes=") or "," in header:
        return 200, data, {}
    first, _, last = header[len("bytes=") :].partition("-")
    try:
        if first:
            start = int(first)
            stop = min(int(last), len(data) - 1) if last else len(data) - 1
        else:
            start, stop = max(0, len(data) - int(last)), len(data) - 1
    except ValueError:
        return 200, data, {}
    if start > stop or start >= len(data):
        return 416, b"", {"Content-Range": f"bytes */{len(data)}"}
    return 206, data[start : stop + 1], {"Content-Range": f"bytes {start}-{stop}/{len(data)}"}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: FaultServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets and client hang-ups are the point of this server


class FaultServer:
    """See the module docstring. Thread-safe; use from the test's thread."""

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.port = port
        self.tls = tls
        self.auth: str | None = None
        self._lock = threading.Lock()
        self._faults: dict[str, tuple[Fault, int | None]] = {}
        self._counts: Counter[str] = Counter()
        self._headers: list[tuple[str, dict[str, str]]] = []
        self._connections: set[socket.socket] = set()
        self._accepted = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start (keep-alive reuse keeps this low)."""
        with self._lock:
            return self._accepted

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def __enter__(self) -> FaultServer:
        self.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._server is not None:
            return
        self._stopping.clear()
        server = _Server((self.host, self.port), _Handler)
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        server.owner = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    # --- switches ---

    def fault(self, name: str, fault: Fault, *, times: int | None = None) -> None:
        """Misbehave for requests matching ``name`` (all of them, or the next ``times``)."""
        with self._lock:
            self._faults[name] = (fault, times)

    def clear(self, name: str | None = None) -> None:
        """Remove one fault, or all of them."""
        with self._lock:
            if name is None:
                self._faults.clear()
            else:
                self._faults.pop(name, None)

    # --- observations ---

    def count(self, name: str = "*") -> int:
        """Requests so far whose path matches ``name``."""
        with self._lock:
            return sum(n for path, n in self._counts.items() if _matches(name, path))

    def headers(self, name: str = "*") -> list[dict[str, str]]:
        """Request headers (in arrival order) of requests matching ``name``."""
        with self._lock:
            return [headers for path, headers in self._headers if _matches(name, path)]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._headers.clear()

    # --- used by the handler threads ---

    def _begin(self, path: str, headers: dict[str, str]) -> Fault:
        with self._lock:
            self._counts[path] += 1
            self._headers.append((path, headers))
            for name in (path, path.rsplit("/", 1)[-1], "*"):
                if name in self._faults:
                    fault, times = self._faults[name]
                    if times is not None:
                        if times <= 1:
                            del self._faults[name]
                        else:
                            self._faults[name] = (fault, times - 1)
                    return fault
        return NO_FAULT

    def _sleep(self, seconds: float) -> bool:
        """Sleep; True if the server is stopping (the handler should give up)."""
        return self._stopping.wait(seconds)

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
                self._accepted += 1
            else:
                self._connections.discard(connection)


def _matches(name: str, path: str) -> bool:
    return name in ("*", path, path.rsplit("/", 1)[-1])
