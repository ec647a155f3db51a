"""How ocixfs talks HTTP: TLS trust, proxies, credentials, redirects, and small downloads.

Every HTTP request ocixfs makes (blobs, ``ocix-store.json``, a manifest or profile given
as a URL) goes through a client built here, so they all follow the same rules:

- **TLS** trusts the system's certificate store (``ssl.create_default_context()``, i.e.
  OpenSSL's default paths, which honour ``SSL_CERT_FILE``/``SSL_CERT_DIR``), never a
  bundled list such as certifi's, plus the PEM certificates of ``FetchConfig.ca_file``
  if given (a private CA, added to the system's).
- **Proxies**: an ordered group (``FetchConfig.proxies``: proxy URLs, ``DIRECT`` for
  none), else the environment's (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``,
  ``NO_PROXY``; httpx ``trust_env``), so site caches such as Squid can sit in front.
  ``ProxyGroup`` (one per process, ``PROXIES``) orders the routes of a request: a proxy
  whose connection or transfer failed goes after the others for ``proxy_down`` seconds,
  and ``stream`` (and the fetcher's ``HttpClients.stream``) tries the next route at once
  when one fails before the answer. ``NO_PROXY`` applies to the group too. A proxy never
  gets credentials of its own: ``Authorization`` is chosen by the target URL as ever.
- **Redirects**: at most ``FetchConfig.max_redirects``, to any host (CDNs and S3
  presigned URLs legitimately send clients elsewhere, and content is verified anyway), but
  never from https to plain http. Credentials are chosen again for every request of a
  redirect chain (``Credentials.rescope``, a request hook): a redirect to a URL outside a
  secret's scope, on the same origin or not, goes without it.
- **Credentials** (``Credentials``) are scoped by URL prefix and sent only to their own
  origin: lines of the ``FetchConfig.auth_file`` (``URL bearer TOKEN`` or
  ``URL basic USER:PASSWORD``), then netrc (``$NETRC`` or ``~/.netrc``, basic auth by host
  name). A ``user:password@`` in a URL is never used: the commands refuse such URLs
  (``refuse_credentials``), because a command line is visible to every user in ``ps``
  for as long as the mount daemon runs. Secrets never appear in labels, logs or
  messages: ``redact(url)`` drops the user-info part of a URL.
- ``download(url, ...)`` gets a small document whole, with a size cap, the fetcher's
  minimum-rate rule and an overall deadline (``FetchConfig.document_deadline``), so an
  endless or trickling body cannot hold a command for long.

Errors: bad settings (unreadable CA or credentials file) raise ``UsageError``;
``download`` raises ``FetchError``/``BlobNotFound`` or ``FormatError``. httpx exceptions
are translated here for ``download`` and in the fetcher for blobs.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import netrc
import os
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from ocixfs.config import DEFAULT_FETCH_CONFIG, FetchConfig
from ocixfs.errors import DocumentAbsent, FetchError, FormatError, UsageError

__all__ = [
    "DIRECT",
    "PROXIES",
    "ROUTE_FAILURES",
    "Credentials",
    "DownloadClock",
    "ProxyGroup",
    "Validators",
    "async_client",
    "credentials_of",
    "describe",
    "download",
    "download_if_changed",
    "load_credentials",
    "read_document",
    "redact",
    "refuse_credentials",
    "proxy_group",
    "ssl_context",
    "stream",
    "sync_client",
]

log = logging.getLogger(__name__)

_AUTH_FILE_MAX = 1 << 20
_SCHEMES = ("http", "https")


def redact(url: str) -> str:
    """``url`` without its ``user:password@`` part (safe to log or show)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def refuse_credentials(url: str, what: str) -> None:
    """Raise ``UsageError`` if ``url`` carries ``user[:password]@``: a command line shows
    it to every user (``ps``, ``/proc/PID/cmdline``) for as long as the daemon it started
    runs. ``what`` names the argument (``--store``, ``IMAGE``) in the message."""
    try:
        netloc = urllib.parse.urlsplit(url).netloc
    except ValueError:
        return  # not a URL: whoever parses it says so
    if "@" in netloc:
        raise UsageError(
            f"{what} {redact(url)}: credentials in a URL are visible to every user (ps); "
            "put them in a --store-auth file"
        )


def describe(exc: BaseException) -> str:
    """``Type: message`` of an httpx error, with the first non-empty message along its
    cause chain (httpx wraps a certificate failure in a ``ConnectError`` with no text)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or str(seen):
            break
        seen = seen.__cause__ or seen.__context__
    detail = str(seen) if seen is not None else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Certificate checks against the system's store, plus ``ca_file`` (PEM) if given.

    Made once per process and setting (loading the system store costs 20-50 ms) and shared
    by every client; a context is not modified after it is made. ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` choose the system store, so the files they resolve to are part of the
    key (a caller that names the default store's files shares the host service's context)."""
    paths = ssl.get_default_verify_paths()
    store = tuple(os.path.realpath(path) if path else None
                  for path in (paths.cafile, paths.capath))
    return _ssl_context(ca_file, (store[0], store[1]))


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_file: str | None, _env: tuple[str | None, str | None]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except FileNotFoundError:
            raise UsageError(f"{ca_file}: no such CA file") from None
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no PEM"
            raise UsageError(f"{ca_file}: not a readable PEM certificate file ({reason})") from None
    return context


# --- credentials -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Grant:
    """An ``Authorization`` value for every URL under ``scheme://host:port/path``."""

    scheme: str
    host: str
    port: int
    path: str
    header: str = field(repr=False)

    def covers(self, url: httpx.URL) -> bool:
        if (url.scheme, url.host, _port(url)) != (self.scheme, self.host, self.port):
            return False
        prefix = self.path.rstrip("/")
        return url.path == prefix or url.path.startswith(prefix + "/")


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


_CHOSEN_HERE = "ocixfs.credentials"  # request extension: our Authorization, ours to rescope


class Credentials(httpx.Auth):
    """Adds an ``Authorization`` header to requests for URLs it has a secret for.

    Lookup order: the longest matching prefix from the auth file, then netrc by host name.
    A request that already carries an ``Authorization`` header is left alone. Clients
    made here also call ``rescope`` on every request of a redirect chain. ``repr()``
    shows no secret."""

    def __init__(
        self,
        grants: Iterable[_Grant] = (),
        netrc_logins: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        self._grants = sorted(grants, key=lambda grant: len(grant.path), reverse=True)
        self._netrc = dict(netrc_logins or {})

    def __repr__(self) -> str:
        return f"<Credentials: {len(self._grants)} URL prefixes, {len(self._netrc)} netrc hosts>"

    def header_for(self, url: httpx.URL) -> str | None:
        for grant in self._grants:
            if grant.covers(url):
                return grant.header
        login = self._netrc.get(url.host)
        return _basic(*login) if login is not None else None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if "Authorization" not in request.headers:
            header = self.header_for(request.url)
            if header is not None:
                request.headers["Authorization"] = header
                request.extensions[_CHOSEN_HERE] = True
        yield request

    def rescope(self, request: httpx.Request) -> None:
        """Choose the ``Authorization`` of a redirected request again, for its own URL.
        httpx copies the header to a redirect on the same origin (and from http to https
        on the same host) whatever the path, so a token for ``/store/`` would otherwise
        reach ``/elsewhere`` on a redirect. Headers a caller set itself are left alone."""
        if not request.extensions.get(_CHOSEN_HERE):
            return
        header = self.header_for(request.url)
        if header is None:
            request.headers.pop("Authorization", None)
        else:
            request.headers["Authorization"] = header

    async def rescope_async(self, request: httpx.Request) -> None:
        """``rescope`` as an ``httpx.AsyncClient`` request hook."""
        self.rescope(request)


def load_credentials(auth_file: str | None = None, *, use_netrc: bool = True) -> Credentials:
    """Read the auth file (if any) and netrc (``$NETRC``, else ``~/.netrc`` if present).

    Auth file lines: ``URL bearer TOKEN`` or ``URL basic USER:PASSWORD``; blank lines and
    ``#`` comments are skipped. Raises ``UsageError`` naming the line, never its secret."""
    grants = _read_auth_file(auth_file) if auth_file is not None else []
    return Credentials(grants, _read_netrc() if use_netrc else None)


def credentials_of(config: FetchConfig) -> httpx.Auth:
    """The credentials ``config`` carries, or (when nobody read them yet) its files'."""
    if config.credentials is not None:
        return config.credentials
    return load_credentials(config.auth_file)


def _read_auth_file(auth_file: str) -> list[_Grant]:
    try:
        with open(auth_file, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            raw = file.read(_AUTH_FILE_MAX + 1)
    except OSError as exc:
        raise UsageError(f"{auth_file}: {exc.strerror or exc}") from None
    if len(raw) > _AUTH_FILE_MAX:
        raise UsageError(f"{auth_file}: larger than {_AUTH_FILE_MAX} bytes")
    if mode & 0o077:
        log.warning("%s: credentials file is readable by other users (chmod 600 it)", auth_file)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{auth_file}: not UTF-8 text") from None
    grants = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        grant = _parse_grant(words)
        if grant is None:
            raise UsageError(
                f"{auth_file}: line {number}: expected 'URL bearer TOKEN' or "
                "'URL basic USER:PASSWORD'"
            )
        grants.append(grant)
    return grants


def _parse_grant(words: list[str]) -> _Grant | None:
    if len(words) != 3:
        return None
    url_text, kind, secret = words[0], words[1].lower(), words[2]
    try:
        url = httpx.URL(url_text)
    except httpx.InvalidURL:
        return None
    if url.scheme not in _SCHEMES or not url.host or url.username or url.password:
        return None
    if kind == "bearer":
        header = f"Bearer {secret}"
    elif kind == "basic" and ":" in secret:
        header = _basic(*secret.split(":", 1))
    else:
        return None
    return _Grant(url.scheme, url.host, _port(url), url.path or "/", header)


def _read_netrc() -> dict[str, tuple[str, str]]:
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return {}
    try:
        parsed = netrc.netrc(path)
    except netrc.NetrcParseError as exc:  # its message may quote a secret: leave it out
        raise UsageError(f"{path}: not a valid netrc file (line {exc.lineno})") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    logins = {}
    for host, (login, _account, password) in parsed.hosts.items():
        if login or password:
            logins[host] = (login or "", password or "")
    return logins


# --- proxies -----------------------------------------------------------------------------

DIRECT = "DIRECT"
_ENVIRONMENT = ""  # the route of a client without a proxy group: the environment's proxy

# A route failing (the proxy, or the way through it, is gone). An answer, whatever its
# status, is not one: the proxy works and relays what the origin said (``ProxyError``, a
# CONNECT the proxy refused, is such an answer).
ROUTE_FAILURES: tuple[type[httpx.HTTPError], ...] = (
    httpx.NetworkError, httpx.TimeoutException, httpx.ProtocolError,
)


class ProxyGroup:
    """The health of the proxies of a process (``PROXIES``), shared by all its clients and
    threads. A route that failed is *down* for ``FetchConfig.proxy_down`` seconds: ``routes``
    puts it after the routes that are up, never leaves it out (when all are down, all are
    tried, in their order). A route that works is up again at once."""

    def __init__(self) -> None:
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def routes(self, config: FetchConfig, url: str) -> list[str]:
        """The routes to try for ``url``, best first: ``config.proxies`` with those that are
        down last; ``[DIRECT]`` when ``NO_PROXY`` names its host; the environment's proxy
        when ``config`` has no group."""
        if not config.proxies:
            return [_ENVIRONMENT]
        if _bypassed(url):
            return [DIRECT]
        now = time.monotonic()
        with self._lock:
            down = {route for route in config.proxies
                    if self._down_until.get(route, -float("inf")) > now}
        return ([route for route in config.proxies if route not in down]
                + [route for route in config.proxies if route in down])

    def failed(self, route: str, config: FetchConfig, why: BaseException) -> None:
        """``route`` failed: down for ``config.proxy_down`` seconds (logged when it was up).
        ``DIRECT`` is never put down: its failure is one origin's, which the fetcher's mirror
        failover handles, not a way out that every store shares."""
        if route in (_ENVIRONMENT, DIRECT):
            return
        now = time.monotonic()
        with self._lock:
            was_up = self._down_until.get(route, -float("inf")) <= now
            self._down_until[route] = now + config.proxy_down
        if was_up:
            log.warning("%s failed (%s); trying the next route first for %g s",
                        _route_name(route), describe(why), config.proxy_down)

    def worked(self, route: str) -> None:
        with self._lock:
            if self._down_until.pop(route, None) is not None:
                log.info("%s works again", _route_name(route))

    @contextlib.contextmanager
    def watching(self, route: str, config: FetchConfig) -> Iterator[None]:
        """Around the use of an answer that came by ``route``: a route failure (the proxy
        dies mid-body) marks it down, and is raised; otherwise the route is up."""
        try:
            yield
        except ROUTE_FAILURES as exc:
            self.failed(route, config, exc)
            raise
        self.worked(route)


PROXIES = ProxyGroup()


def _route_name(route: str) -> str:
    return "the direct connection" if route == DIRECT else f"proxy {redact(route)}"


def proxy_group(entries: Iterable[str]) -> tuple[str, ...]:
    """``--proxy`` values checked: ``http://HOST[:PORT]`` (or https) without credentials
    (proxy authentication is not supported), path or query, or ``DIRECT`` (any case); each
    at most once. Raises ``UsageError``."""
    group: list[str] = []
    for entry in entries:
        route = DIRECT if entry.strip().upper() == DIRECT else entry.strip().rstrip("/")
        if route != DIRECT:
            if "@" in route:
                raise UsageError(f"--proxy {redact(route)}: proxy credentials are not supported")
            try:
                parts = urllib.parse.urlsplit(route)
                parts.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                parts = urllib.parse.urlsplit("")
            if parts.scheme not in _SCHEMES or not parts.hostname or parts.path or parts.query:
                raise UsageError(f"--proxy {entry}: expected http://HOST:PORT or DIRECT")
        if route in group:
            raise UsageError(f"--proxy {entry}: given twice")
        group.append(route)
    return tuple(group)


def _bypassed(url: str) -> bool:
    """Whether ``NO_PROXY`` (or ``no_proxy``) names the host of ``url``: ``*``, the host
    name or address, a domain it is in (``example.org`` or ``.example.org``), each
    optionally with ``:PORT``."""
    rule = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    port = str(parts.port or (443 if parts.scheme == "https" else 80))
    for entry in filter(None, (word.strip().lower() for word in rule.split(","))):
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        name = name.strip("[]").lstrip(".")
        if entry_port and entry_port != port:
            continue
        if host == name or host.endswith("." + name):
            return True
    return False


def _first_route(config: FetchConfig) -> str:
    return config.proxies[0] if config.proxies else _ENVIRONMENT


# --- clients -----------------------------------------------------------------------------


def _downgrade_target(response: httpx.Response) -> str | None:
    """The scheme of a redirect from https to something else, if this is one."""
    if not response.has_redirect_location or response.request.url.scheme != "https":
        return None
    try:
        target = response.request.url.join(response.headers["Location"])
    except httpx.InvalidURL:
        return None  # httpx reports the bad Location itself
    return None if target.scheme == "https" else target.scheme


def _refuse_downgrade(response: httpx.Response) -> None:
    scheme = _downgrade_target(response)
    if scheme is not None:
        raise httpx.UnsupportedProtocol(
            f"refused redirect from https://{response.request.url.host} to {scheme}://"
        )


async def _refuse_downgrade_async(response: httpx.Response) -> None:
    _refuse_downgrade(response)


def _timeout(config: FetchConfig) -> httpx.Timeout:
    return httpx.Timeout(
        connect=config.connect_timeout,
        read=config.read_timeout,
        write=config.read_timeout,
        pool=config.deadline,
    )


def async_client(
    config: FetchConfig,
    *,
    limits: httpx.Limits,
    auth: httpx.Auth | None = None,
    route: str | None = None,
) -> httpx.AsyncClient:
    """The fetcher's client; ``auth`` defaults to ``credentials_of(config)``, ``route`` (a
    proxy URL or ``DIRECT``, from ``PROXIES.routes``) to the group's first.
    Raises ``UsageError`` for an unusable CA or credentials file."""
    auth = auth if auth is not None else credentials_of(config)
    rescope = [auth.rescope_async] if isinstance(auth, Credentials) else []
    return httpx.AsyncClient(
        **_client_settings(config, auth, _first_route(config) if route is None else route),
        limits=limits,
        event_hooks={"request": rescope, "response": [_refuse_downgrade_async]},
    )


def sync_client(
    config: FetchConfig = DEFAULT_FETCH_CONFIG,
    *,
    auth: httpx.Auth | None = None,
    route: str | None = None,
) -> httpx.Client:
    """A blocking client with the same rules (for commands, before any trio run);
    ``auth`` and ``route`` default as for ``async_client``."""
    auth = auth if auth is not None else credentials_of(config)
    rescope = [auth.rescope] if isinstance(auth, Credentials) else []
    return httpx.Client(
        **_client_settings(config, auth, _first_route(config) if route is None else route),
        event_hooks={"request": rescope, "response": [_refuse_downgrade]},
    )


def _client_settings(config: FetchConfig, auth: httpx.Auth, route: str) -> dict[str, Any]:
    """What every client shares: trust, credentials, timeouts, redirects; and its route:
    a proxy URL, ``DIRECT``, or (no group) the environment's proxies."""
    settings: dict[str, Any] = {
        "verify": ssl_context(config.ca_file),
        "auth": auth,
        "trust_env": route == _ENVIRONMENT,
        "timeout": _timeout(config),
        "follow_redirects": True,
        "max_redirects": config.max_redirects,
        "headers": {"User-Agent": "ocixfs"},
    }
    if route not in (_ENVIRONMENT, DIRECT):
        settings["proxy"] = route
    return settings


@contextlib.contextmanager
def stream(
    config: FetchConfig, url: str, *, headers: Mapping[str, str],
    group: ProxyGroup = PROXIES,
) -> Iterator[httpx.Response]:
    """A blocking ``GET url`` by the routes of ``group.routes(config, url)``: a route that
    fails before the answer is marked down and the next one tried at once; a failure while
    the body is read marks it down and is raised (the caller's retry takes the next).
    Raises what httpx raises for the last route. A look that must not judge the routes
    (a quick probe) passes a ``ProxyGroup()`` of its own."""
    routes = group.routes(config, url)
    for number, route in enumerate(routes, 1):
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(sync_client(config, route=route))
            try:
                response = stack.enter_context(client.stream("GET", url, headers=headers))
            except ROUTE_FAILURES as exc:
                group.failed(route, config, exc)
                if number == len(routes):
                    raise
                continue
            with group.watching(route, config):
                yield response
            return


def download(
    url: str,
    *,
    max_bytes: int,
    config: FetchConfig = DEFAULT_FETCH_CONFIG,
    deadline: float | None = None,
) -> bytes:
    """GET ``url`` whole (status 200 only). The body may be at most ``max_bytes`` long,
    before and after decoding, must arrive at ``config.min_rate`` or faster after
    ``config.rate_window`` seconds, and the whole download may take at most ``deadline``
    seconds (default ``config.document_deadline``), so a body trickled just above the
    minimum rate cannot hold a command for long either. A server may send it compressed
    (``Content-Encoding`` gzip or zstd: nginx ``gzip_static``, an S3 object uploaded with
    that header); it is decoded here, in bounded steps, so a compression bomb is just "too
    large".

    Raises ``BlobNotFound`` (404/410), ``FetchError`` (network, TLS, other status, too
    slow or past the deadline, a corrupt or unknown encoding) or ``FormatError`` (too
    large), each one line naming the redacted URL."""
    data, _ = download_if_changed(url, None, max_bytes=max_bytes, config=config,
                                  deadline=deadline)
    assert data is not None  # asked unconditionally
    return data


@dataclass(frozen=True, slots=True)
class Validators:
    """What a server said identifies the version of a document it sent (RFC 9110
    ``ETag`` and ``Last-Modified``; either may be empty), and for how many seconds from
    its answer that version stays current without asking again (``max_age``, RFC 9111:
    ``Cache-Control: max-age``, else ``Expires`` − ``Date``; 0 when it said nothing, or
    ``no-cache``/``no-store``: ask every time)."""

    etag: str = ""
    last_modified: str = ""
    max_age: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    @classmethod
    def of(cls, response: httpx.Response) -> Validators:
        return cls(response.headers.get("etag", "")[:1024],
                   response.headers.get("last-modified", "")[:1024],
                   freshness_lifetime(response.headers))

    def conditions(self) -> dict[str, str]:
        """The headers of a request that only wants the document if it changed."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


_MAX_FRESHNESS = 365 * 86400.0


def freshness_lifetime(headers: Mapping[str, str]) -> float:
    """Seconds a response stays fresh for a private cache (RFC 9111 §4.2.1): ``max-age``
    of ``Cache-Control``, else ``Expires`` minus ``Date``; 0 for ``no-store``,
    ``no-cache``, anything unparsable and a server that said nothing (no heuristic
    freshness: a manifest URL is a tag that may move), less the ``Age`` a shared cache on
    the way says the response already has."""
    age = headers.get("age", "").strip()
    return max(_lifetime(headers) - (float(age) if age.isdigit() else 0.0), 0.0)


def _lifetime(headers: Mapping[str, str]) -> float:
    directives: dict[str, str] = {}
    for item in headers.get("cache-control", "").lower().split(","):
        name, _, value = item.strip().partition("=")
        directives.setdefault(name.strip(), value.strip().strip('"'))
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    if "max-age" in directives:
        value = directives["max-age"]
        return min(float(value), _MAX_FRESHNESS) if value.isdigit() else 0.0
    expires, date = _http_date(headers.get("expires")), _http_date(headers.get("date"))
    if expires is None or date is None:
        return 0.0
    return min(max(expires - date, 0.0), _MAX_FRESHNESS)


def _http_date(value: str | None) -> float | None:
    """An HTTP date as a POSIX time, or None (absent or invalid)."""
    import email.utils

    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def download_if_changed(
    url: str,
    known: Validators | None,
    *,
    max_bytes: int,
    config: FetchConfig = DEFAULT_FETCH_CONFIG,
    deadline: float | None = None,
) -> tuple[bytes | None, Validators]:
    """``download``, asking the server for the document only if it changed since the
    version ``known`` identifies: ``(None, known)`` (with the freshness this answer gave)
    when it answers 304 Not Modified, else the body and what identifies its version.
    Raises as ``download`` does (a 404/410 as ``DocumentAbsent``, with its freshness)."""
    label = redact(url)
    clock = DownloadClock(config, config.document_deadline if deadline is None else deadline)
    headers = {"Accept-Encoding": _DOCUMENT_ENCODINGS, **(known.conditions() if known else {})}
    try:
        with stream(config, url, headers=headers) as response:
            status = response.status_code
            if status == 304 and known:
                return None, replace(known, max_age=freshness_lifetime(response.headers))
            if status in (404, 410):
                raise DocumentAbsent(f"{label}: HTTP {status}",
                                     freshness_lifetime(response.headers))
            if status != 200:
                raise FetchError(f"{label}: HTTP {status}")
            data = read_document(response, label, max_bytes=max_bytes, clock=clock)
            return data, Validators.of(response)
    except httpx.TimeoutException as exc:
        raise FetchError(f"{label}: timed out ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{label}: {describe(exc)}") from None


def read_document(
    response: httpx.Response, label: str, *, max_bytes: int, clock: DownloadClock
) -> bytes:
    """The body of a streamed response under ``download``'s rules (size cap before and
    after decoding, minimum rate, ``clock``'s deadline). Raises ``FetchError`` or
    ``FormatError`` naming ``label``."""
    raw = _read_body(response.iter_raw(), label, max_bytes, clock)
    encoding = response.headers.get("content-encoding", "").strip().lower()
    return _decode_body(raw, encoding, label, max_bytes)


@dataclass(slots=True)
class DownloadClock:
    """The time rules of one download: the minimum rate and the overall deadline, both
    counted from the request (so slow headers count too)."""

    config: FetchConfig
    deadline: float
    started: float = field(default_factory=time.monotonic)

    def check(self, received: int, label: str) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed > self.deadline:
            raise FetchError(f"{label}: not received within {self.deadline:g} s")
        if self.config.too_slow(received, elapsed):
            raise FetchError(f"{label}: {received / elapsed:.0f} B/s is below the minimum rate")


def _read_body(pieces: Iterator[bytes], label: str, max_bytes: int, clock: DownloadClock) -> bytes:
    parts: list[bytes] = []
    received = 0
    for piece in pieces:
        received += len(piece)
        if received > max_bytes:
            raise FormatError(f"{label}: larger than the limit of {max_bytes} bytes")
        parts.append(piece)
        clock.check(received, label)
    return b"".join(parts)


_DOCUMENT_ENCODINGS = "zstd, gzip"
_ZSTD_STEP = 1024


def _decode_body(raw: bytes, encoding: str, label: str, max_bytes: int) -> bytes:
    """``raw`` undone from its ``Content-Encoding``, never holding more than ``max_bytes``
    plus one step of output."""
    if encoding in ("", "identity"):
        return raw
    if encoding == "gzip":
        inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            decoded = inflate.decompress(raw, max_bytes + 1)
        except zlib.error:
            raise FetchError(f"{label}: corrupt gzip body") from None
        complete = inflate.eof
    elif encoding == "zstd":
        decoded, complete = _unzstd(raw, label, max_bytes)
    else:
        raise FetchError(f"{label}: unsupported Content-Encoding {encoding!r}")
    if len(decoded) > max_bytes:
        raise FormatError(f"{label}: larger than the limit of {max_bytes} bytes")
    if not complete:
        raise FetchError(f"{label}: truncated {encoding} body")
    return decoded


def _unzstd(raw: bytes, label: str, max_bytes: int) -> tuple[bytes, bool]:
    """Decoded bytes (stopping once over ``max_bytes``) and whether the frame ended. Input
    goes in ``_ZSTD_STEP``-byte slices: a zstd block decodes to at most 128 KiB from at
    least 4 bytes, so one slice yields at most 32 MiB, whatever the sender built."""
    import zstandard

    inflate = zstandard.ZstdDecompressor().decompressobj()
    parts: list[bytes] = []
    total = 0
    try:
        for start in range(0, len(raw), _ZSTD_STEP):
            piece = inflate.decompress(raw[start : start + _ZSTD_STEP])
            parts.append(piece)
            total += len(piece)
            if total > max_bytes or inflate.eof:
                break
    except zstandard.ZstdError:
        raise FetchError(f"{label}: corrupt zstd body") from None
    return b"".join(parts), inflate.eof
