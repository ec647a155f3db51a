"""Who we are to a registry: logins from the files skopeo, podman and docker read, and the
registry token flow as an ``httpx.Auth``.

Logins (``find_login``) come from, in this order, the first file that has one for the
registry: ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/…``), and docker's
``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``). Each is
``{"auths": {"HOST[:PORT][/NAMESPACE]": {"auth": base64("user:password")}}}`` (or
``username``/``password`` fields); the longest key that covers the repository wins.
Credential helpers (``credHelpers``, ``credsStore``) and identity tokens are not run or
used: such entries count as no login.

``RegistryAuth`` answers a registry's challenge: ``401`` with ``WWW-Authenticate: Bearer
realm=…,service=…,scope=…`` → a GET of the realm (with the login as Basic credentials,
if any, and only over https or to a loopback host) → a token, cached per scope until
shortly before it expires → the request again with ``Bearer TOKEN``; ``Basic`` challenges
get the login directly (and later requests to the registry get it up front). Requests
name their scope in the ``SCOPE`` extension (``repository:REPO:pull``). A token service
that refuses is a ``RegistryError``; secrets appear in no message and no ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from collections.abc import AsyncGenerator, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx

from ocixfs.errors import FetchError, UsageError
from ocixfs.store.spec import RegistryStore

__all__ = ["SCOPE", "RegistryAuth", "RegistryError", "auth_files", "find_login", "with_login"]

SCOPE = "ocixfs.registry_scope"  # request extension: the token scope the request needs
_TOKEN = "ocixfs.registry_token"  # request extension: this is a request to a token realm
_AUTH_FILE_MAX = 1 << 20
_TOKEN_MAX = 64 * 1024
_TOKEN_MARGIN = 10.0  # seconds: a token is renewed this long before it expires
_DEFAULT_TOKEN_LIFE = 60.0  # what the token specification assumes without expires_in
_PARAM = re.compile(r'([A-Za-z_]+)="([^"]*)"')


class RegistryError(FetchError):
    """A registry (or its token service) refused or answered something unusable.
    ``not_found``: it said the thing asked for does not exist."""

    def __init__(self, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


def auth_files() -> list[Path]:
    """Where logins are looked for, in order (files that do not exist are skipped)."""
    env = os.environ
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers/auth.json")
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    files.append(Path(config_home) / "containers/auth.json")
    docker = env.get("DOCKER_CONFIG") or os.path.join(Path.home(), ".docker")
    files.append(Path(docker) / "config.json")
    return files


def find_login(store: RegistryStore) -> tuple[str, str] | None:
    """The user and password for ``store`` from the first auth file that has one; None
    for anonymous access. Raises ``UsageError`` for an unreadable or malformed file
    (naming the file, never its content)."""
    for path in auth_files():
        auths = _read_auths(path)
        if auths is None:
            continue
        login = _best_login(auths, store, path)
        if login is not None:
            return login
    return None


def with_login(store: RegistryStore, *, tls_verify: bool = True) -> RegistryStore:
    """``store`` with its login read now (once, by the command) and ``tls_verify`` set."""
    return RegistryStore(store.host, store.repository, store.reference,
                         tls_verify=tls_verify, login=find_login(store))


def _read_auths(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as file:
            raw = file.read(_AUTH_FILE_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > _AUTH_FILE_MAX:
        raise UsageError(f"{path}: larger than {_AUTH_FILE_MAX} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise UsageError(f"{path}: not a valid auth file (JSON)") from None
    auths = document.get("auths", {}) if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise UsageError(f"{path}: not a valid auth file ('auths' is not an object)")
    return auths


def _normalized_key(key: str) -> str:
    """An ``auths`` key as ``HOST[:PORT][/PATH]`` (docker writes URLs for Docker Hub)."""
    key = key.removeprefix("https://").removeprefix("http://").rstrip("/")
    if key in ("index.docker.io/v1", "index.docker.io", "registry-1.docker.io"):
        return "docker.io"
    return key


def _best_login(
    auths: dict[str, Any], store: RegistryStore, path: Path
) -> tuple[str, str] | None:
    target = f"{store.host}/{store.repository}"
    best: tuple[int, Any] | None = None
    for key, entry in auths.items():
        name = _normalized_key(key)
        if (name == store.host or target == name or target.startswith(name + "/")) and (
            best is None or len(name) > best[0]
        ):
            best = (len(name), entry)
    return None if best is None else _login_of(best[1], path)


def _login_of(entry: Any, path: Path) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: not a valid auth file (an entry is not an object)")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, colon, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, colon, password = "", "", ""
        if not colon:
            raise UsageError(f"{path}: an 'auth' value is not base64 of USER:PASSWORD")
        return user, password
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return entry["username"], entry["password"]
    return None


def _basic(login: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode("ascii")


def _challenge(header: str) -> tuple[str, dict[str, str]] | None:
    """``(scheme, params)`` of a ``WWW-Authenticate`` header, scheme lower-cased."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    return scheme.lower(), dict(_PARAM.findall(rest))


class RegistryAuth(httpx.Auth):
    """The challenge-response of one registry (see the module). Thread-safe; one instance
    is shared by the command's blocking client and the daemon's async one."""

    def __init__(self, store: RegistryStore) -> None:
        self._login = store.login
        self._label = store.host
        self._tokens: dict[str, tuple[str, float]] = {}
        self._basic_up_front = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RegistryAuth {self._label}: {'a login' if self._login else 'anonymous'}>"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response,
                                                                  None]:
        flow = self._flow(request)
        outgoing: httpx.Request | None = next(flow)
        while outgoing is not None:
            response = yield outgoing
            body = b""
            if _TOKEN in outgoing.extensions:
                body = _keep(response, _read_token_body(response.iter_bytes()))
            outgoing = _advance(flow, response, body)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request,
                                                                               httpx.Response]:
        flow = self._flow(request)
        outgoing: httpx.Request | None = next(flow)
        while outgoing is not None:
            response = yield outgoing
            body = b""
            if _TOKEN in outgoing.extensions:
                pieces = [piece async for piece in _limited(response.aiter_bytes())]
                body = _keep(response, _read_token_body(iter(pieces)))
            outgoing = _advance(flow, response, body)

    def _flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, tuple[httpx.Response, bytes], None]:
        scope = str(request.extensions.get(SCOPE, ""))
        header = self._known_header(scope)
        if header is not None:
            request.headers["Authorization"] = header
        response, _ = yield request
        if response.status_code != 401:
            return
        challenge = _challenge(response.headers.get("www-authenticate", ""))
        if challenge is None:
            return
        kind, params = challenge
        if kind == "basic" and self._login is not None:
            self._basic_up_front = True
            request.headers["Authorization"] = _basic(self._login)
            yield request
        elif kind == "bearer" and "realm" in params:
            token_response, body = yield self._token_request(params, scope)
            token, life = self._parse_token(token_response, body)
            with self._lock:
                self._tokens[scope] = (token, time.monotonic() + max(0.0, life - _TOKEN_MARGIN))
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    def _known_header(self, scope: str) -> str | None:
        with self._lock:
            token, until = self._tokens.get(scope, ("", 0.0))
        if token and time.monotonic() < until:
            return f"Bearer {token}"
        if self._basic_up_front and self._login is not None:
            return _basic(self._login)
        return None

    def _token_request(self, params: dict[str, str], scope: str) -> httpx.Request:
        try:
            realm = httpx.URL(params["realm"])
        except httpx.InvalidURL:
            raise RegistryError(f"{self._label}: the token realm is not a URL") from None
        if realm.scheme not in ("http", "https"):
            raise RegistryError(f"{self._label}: the token realm is not an http(s) URL")
        query = {"service": params["service"]} if "service" in params else {}
        wanted = params.get("scope") or scope
        request = httpx.Request("GET", realm.copy_merge_params(
            {**query, **({"scope": wanted} if wanted else {})}), extensions={_TOKEN: True})
        if self._login is not None and (realm.scheme == "https" or _loopback(realm.host)):
            request.headers["Authorization"] = _basic(self._login)
        return request

    def _parse_token(self, response: httpx.Response, body: bytes) -> tuple[str, float]:
        if response.status_code != 200:
            why = "refused the login" if self._login else "requires a login (none found)"
            raise RegistryError(
                f"{self._label}: the token service {why} (HTTP {response.status_code})")
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
            life = float(document.get("expires_in") or _DEFAULT_TOKEN_LIFE)
        except (ValueError, AttributeError, TypeError):
            token, life = None, 0.0
        if not isinstance(token, str) or not token or not token.isprintable():
            raise RegistryError(f"{self._label}: the token service sent no usable token")
        return token, life


def _loopback(host: str) -> bool:
    return RegistryStore(host, "", "").loopback


def _advance(
    flow: Generator[httpx.Request, tuple[httpx.Response, bytes], None],
    response: httpx.Response, body: bytes,
) -> httpx.Request | None:
    """The flow's next request after ``response`` (and its token ``body``), or None."""
    try:
        return flow.send((response, body))
    except StopIteration:
        return None


def _keep(response: httpx.Response, body: bytes) -> bytes:
    """Give ``response`` the body read here in bounded steps: httpx reads every response of
    an auth flow again (``read()``), which would fail on a consumed stream (and, without
    this, read an endless one whole)."""
    response._content = body  # noqa: SLF001 -- httpx has no public setter
    return body


def _read_token_body(pieces: Iterator[bytes]) -> bytes:
    body = bytearray()
    for piece in pieces:
        body += piece
        if len(body) > _TOKEN_MAX:
            raise RegistryError(f"token response larger than {_TOKEN_MAX} bytes")
    return bytes(body)


async def _limited(pieces: Any) -> AsyncGenerator[bytes, None]:
    received = 0
    async for piece in pieces:
        received += len(piece)
        if received > _TOKEN_MAX:
            raise RegistryError(f"token response larger than {_TOKEN_MAX} bytes")
        yield piece
