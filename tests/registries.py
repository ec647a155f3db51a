"""Real ``docker-registry`` (distribution 2.8) instances on loopback ports for tests, and a
small token service for the registry token flow.

``Registry(work)`` serves its own storage under ``work/data`` over plain http on
127.0.0.1 (``host`` is ``127.0.0.1:PORT``); ``TokenService(work)`` issues RS256 JWTs
(signed by ``openssl``, the certificate in the header's ``x5c`` and in the registry's
``rootcertbundle``) to clients that present ``USER:PASSWORD`` as Basic credentials, and
counts the tokens it issued. Both stop on exit, always.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.nginx import wait_for_port

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
needs_registry = pytest.mark.skipif(
    not os.path.exists(REGISTRY), reason="needs docker-registry (scripts/install installs it)")

_CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{auth}"""

_TOKEN_AUTH = """\
auth:
  token:
    realm: {realm}
    service: test-registry
    issuer: test-issuer
    rootcertbundle: {cert}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """``with Registry(work) as registry: registry.ref("repo:tag")``."""

    def __init__(self, work: Path, *, token: TokenService | None = None) -> None:
        self.work = work
        self.root = work / "data"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self._auth = "" if token is None else _TOKEN_AUTH.format(
            realm=token.realm, cert=token.cert)
        self.process: subprocess.Popen[bytes] | None = None

    def ref(self, name: str) -> str:
        return f"docker://{self.host}/{name}"

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps the bytes of ``sha256:HEX`` on disk."""
        hex_ = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def __enter__(self) -> Registry:
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "config.yml"
        config.write_text(_CONFIG.format(root=self.root, port=self.port, auth=self._auth))
        self.process = subprocess.Popen([REGISTRY, "serve", os.fspath(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, "docker-registry", timeout=15)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """A registry token service (``realm``) that trusts one ``login`` (user, password)."""

    def __init__(self, work: Path, login: tuple[str, str]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = work / "token.key", work / "token.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", self.key, "-out", self.cert, "-days", "2",
                        "-subj", "/CN=test-token-issuer"], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", self.cert, "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        self._expected = "Basic " + base64.b64encode(":".join(login).encode()).decode()
        self.issued = 0
        self.refused = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def token(self, scope: str) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        now = int(time.time())
        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access = [{"type": kind, "name": name, "actions": actions.split(",")}]
        claims = {"iss": "test-issuer", "sub": "alice", "aud": "test-registry",
                  "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": hashlib.sha256(os.urandom(16)).hexdigest(), "access": access}
        signing_input = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key],
                                   input=signing_input.encode(), check=True,
                                   capture_output=True).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 -- the http.server protocol
                if self.headers.get("Authorization") != service._expected:
                    service.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                scope = parse_qs(urlsplit(self.path).query).get("scope", [""])[0]
                body = json.dumps({"token": service.token(scope), "expires_in": 300}).encode()
                service.issued += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> TokenService:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
