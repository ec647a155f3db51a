"""A throw-away certificate authority for TLS tests, made with the ``openssl`` command.

``make_ca(directory)`` writes ``ca.pem`` (a self-signed CA) and ``server.pem`` /
``server.key`` (signed by it, valid for 127.0.0.1, 127.0.0.2 and localhost) and returns
their paths; ``server_context(certs)`` is an ``ssl.SSLContext`` for a test server.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Certs", "make_ca", "needs_openssl", "server_context"]

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

_SERVER_EXTENSIONS = """\
subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_ca(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ocixfs test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *_EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "server.ext").write_text(_SERVER_EXTENSIONS)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    os.unlink(directory / "ca.key")  # nothing else gets signed by it
    return Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def server_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    return context
