"""A tiny forwarding HTTP proxy for tests: plain-http ``GET``/``HEAD`` with an absolute
URL, forwarded to the origin, answers relayed with their length. It records each URL it
was asked for, so a test can tell that a client really went through it.

    with ForwardProxy() as proxy:
        os.environ["HTTP_PROXY"] = proxy.url
        ... proxy.requests ...
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import threading
import urllib.parse
from types import TracebackType

__all__ = ["ForwardProxy"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade"}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        target = urllib.parse.urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            self.send_error(400, "absolute http:// URL expected")
            return
        with self.server.owner._lock:
            self.server.owner.requests.append(self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Via"] = "1.1 ocixfs-test-proxy"
        upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=30)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            upstream.request(self.command, path or "/", headers=headers)
            response = upstream.getresponse()
            body = response.read()
        except OSError:
            self.send_error(502, "origin unreachable")
            return
        finally:
            upstream.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: ForwardProxy

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class ForwardProxy:
    """Listens on 127.0.0.1 (a free port) from a background thread."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        with contextlib.suppress(OSError):
            self._server.server_close()
        self._thread.join()
