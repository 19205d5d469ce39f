"""HTTP(S) downloads with hard limits: a total deadline per attempt, a cap on body size, http and https
only (checked again after every redirect, with a bounded number of hops), and X-Robots-Tag opt-outs.

Built on http.client rather than requests: a per-thread keep-alive connection cache costs much less per
request, and owning the socket lets a watchdog enforce the deadline even against a server that drips
its status line and headers one byte at a time (a per-socket timeout alone never fires on those).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from email.message import Message
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from .settings import FetchSettings

log = logging.getLogger(__name__)

# img2dataset's User-Agent, so that sites treat both tools alike.
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Printable ASCII except space stays as is (existing %XX escapes included); the rest is percent-encoded.
_SAFE_URL_CHARS = "!#$%&'()*+,-./:;=?@[]^_`{|}~"
_MAX_DRAIN = 64 * 1024


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The body of a successful download, or the error message recorded for the sample."""

    data: bytes | None
    error: str | None


class FetchError(Exception):
    """One failed attempt. ``transient`` failures (timeouts, resets, 5xx, 429) are worth a retry."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def is_disallowed(headers: Message, user_agent_token: str | None, directives: frozenset[str]) -> bool:
    """True if an X-Robots-Tag header opts this image out, for every robot or for our token.

    Same rule as img2dataset: ``X-Robots-Tag: noai`` applies to all robots, ``X-Robots-Tag: bot: noai``
    only to a user agent token ``bot``.
    """
    for value in headers.get_all("X-Robots-Tag") or []:
        robot, colon, names = value.partition(":")
        if not colon:
            robot, names = "", value
        if robot.strip().lower() in ("", user_agent_token) and directives.intersection(
            n.strip().lower() for n in names.split(",")
        ):
            return True
    return False


class _Guard:
    __slots__ = ("conn", "deadline", "fired")

    def __init__(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.fired = False


class _Watchdog:
    """Shuts down the socket of any request still running past its deadline.

    ``shutdown()`` from another thread wakes a ``recv`` blocked in that socket at once; the request
    then fails with a short read, which ``Fetcher`` reports as a timeout because the guard fired.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._active: set[_Guard] = set()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, conn: http.client.HTTPConnection, deadline: float) -> Iterator[_Guard]:
        g = _Guard(conn, deadline)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="img2ds-fetch-watchdog", daemon=True)
                self._thread.start()
            self._active.add(g)
        try:
            yield g
        finally:
            with self._lock:
                self._active.discard(g)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                for g in self._active:
                    # Repeated every tick after the deadline: the socket may only appear once a slow
                    # connect or TLS handshake returns.
                    if now >= g.deadline:
                        g.fired = True
                        sock = g.conn.sock
                        if sock is not None:
                            with contextlib.suppress(OSError):
                                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stopped.set()


class _Resolver:
    """getaddrinfo with a timeout (it has none of its own) and a small cache."""

    def __init__(self, ttl: float = 300.0, max_entries: int = 65536) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._cache: dict[tuple[str, int], tuple[float, int, tuple[str, int]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="img2ds-dns")

    def resolve(self, host: str, port: int, timeout: float) -> tuple[int, tuple[str, int]]:
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host)
            return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)
        now = time.monotonic()
        hit = self._cache.get((host, port))
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        future = self._pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=timeout)
        except FutureTimeout:
            raise FetchError("timed out resolving host name", transient=True) from None
        family, _, _, _, sockaddr = infos[0]
        address = (str(sockaddr[0]), int(sockaddr[1]))
        if len(self._cache) >= self._max_entries:
            self._cache.clear()
        self._cache[(host, port)] = (now + self._ttl, int(family), address)
        return int(family), address

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, resolver: _Resolver) -> None:
        super().__init__(host, port)
        self._resolver = resolver

    def connect(self) -> None:
        timeout = self.timeout if isinstance(self.timeout, float | int) else None
        family, addr = self._resolver.resolve(self.host, self.port, timeout or 10.0)
        sock = socket.socket(family, socket.SOCK_STREAM)
        # Published before connecting, so the watchdog can abort a slow connect or handshake too.
        self.sock = sock
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._wrap(sock)

    def _wrap(self, sock: socket.socket) -> socket.socket:
        return sock


class _HTTPSConnection(_HTTPConnection):
    default_port = 443

    def __init__(self, host: str, port: int, resolver: _Resolver, context: ssl.SSLContext) -> None:
        super().__init__(host, port, resolver)
        self._context = context

    def _wrap(self, sock: socket.socket) -> socket.socket:
        return self._context.wrap_socket(sock, server_hostname=self.host)


_PoolKey = tuple[str, str, int]


class Fetcher:
    """Downloads URLs; safe to share between threads (each thread keeps its own idle connections)."""

    def __init__(self, settings: FetchSettings, max_idle_per_thread: int = 2) -> None:
        self.settings = settings
        token = settings.user_agent_token
        self._token = token.strip().lower() if token else None
        self._directives = frozenset(d.strip().lower() for d in settings.disallowed_header_directives)
        user_agent = USER_AGENT
        if token:
            user_agent += f" (compatible; {token}; +https://github.com/rom1504/img2dataset)"
        self._headers = {"User-Agent": user_agent, "Accept": "*/*"}
        self._max_idle = max_idle_per_thread
        self._local = threading.local()
        self._watchdog = _Watchdog()
        self._resolver = _Resolver()
        self._tls = ssl.create_default_context()
        if settings.ignore_ssl_certificate:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE
        self._all_pools: list[OrderedDict[_PoolKey, _HTTPConnection]] = []
        self._pools_lock = threading.Lock()

    def fetch(self, url: str) -> FetchResult:
        """Download ``url``, retrying transient failures ``retries`` times."""
        error: FetchError | None = None
        for _ in range(self.settings.retries + 1):
            try:
                return FetchResult(self._attempt(url), None)
            except FetchError as err:
                error = err
                if not err.transient:
                    break
        assert error is not None
        return FetchResult(None, str(error))

    def close(self) -> None:
        self._watchdog.stop()
        self._resolver.close()
        with self._pools_lock:
            for pool in self._all_pools:
                for conn in pool.values():
                    conn.close()
                pool.clear()

    # -- one attempt ---------------------------------------------------------------------------

    def _attempt(self, url: str) -> bytes:
        deadline = time.monotonic() + self.settings.timeout
        for _hop in range(self.settings.max_redirects + 1):
            parts = _checked(url)
            status, location, data = self._get(parts, deadline)
            if status not in REDIRECT_STATUSES:
                return data
            if not location:
                raise FetchError(f"HTTP Error {status}: redirect without a Location header")
            url = urljoin(url, location)
            scheme = urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchError(f"redirect to a {scheme or 'relative'} URL refused: only http and https")
        raise FetchError(f"too many redirects (more than {self.settings.max_redirects})")

    def _get(self, parts: SplitResult, deadline: float) -> tuple[int, str | None, bytes]:
        """One request; returns (status, Location, body). Raises FetchError for anything unusable."""
        key, target = _pool_key(parts), _target(parts)
        conn = self._take(key)
        reused = conn is not None
        for _try in range(2):
            if conn is None:
                conn = self._connect(key)
            keep = False
            try:
                with self._watchdog.guard(conn, deadline) as guard:
                    try:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise FetchError("timed out", transient=True)
                        conn.timeout = remaining
                        if conn.sock is None:
                            conn.connect()
                        else:
                            conn.sock.settimeout(remaining)
                        conn.request("GET", target, headers=self._headers)
                        response = conn.getresponse()
                        status, location, body = self._read(response, deadline)
                        keep = not response.will_close
                    except (OSError, http.client.HTTPException) as err:
                        if guard.fired:
                            raise FetchError("timed out", transient=True) from None
                        if reused and _is_stale_connection(err):
                            # The server closed an idle keep-alive connection: not the URL's fault.
                            conn.close()
                            conn, reused = None, False
                            continue
                        raise _as_fetch_error(err) from None
                    if guard.fired:
                        raise FetchError("timed out", transient=True)
                return status, location, body
            finally:
                if conn is not None:
                    if keep:
                        self._give(key, conn)
                    else:
                        conn.close()
        raise FetchError("connection closed by the server", transient=True)

    def _read(self, response: http.client.HTTPResponse, deadline: float) -> tuple[int, str | None, bytes]:
        status = response.status
        cap = self.settings.max_download_bytes
        if status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if response.length is not None and response.length <= _MAX_DRAIN:
                response.read()  # drain so the connection can be reused
            else:
                response.will_close = True
            return status, location, b""
        if not 200 <= status < 300:
            response.will_close = True
            raise FetchError(
                f"HTTP Error {status}: {response.reason}", transient=status in TRANSIENT_STATUSES
            )
        if self._directives and is_disallowed(response.headers, self._token, self._directives):
            response.will_close = True
            raise FetchError("Use of image disallowed by X-Robots-Tag directive")
        if response.length is not None:
            if response.length > cap:
                response.will_close = True
                raise FetchError(f"body of {response.length} bytes is over the {cap}-byte limit")
            data = response.read()
            if len(data) < response.length:  # pragma: no cover - http.client raises IncompleteRead first
                raise FetchError("connection closed before the whole body arrived", transient=True)
            return status, None, data
        # Chunked or close-delimited: count as we go.
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > cap:
                response.will_close = True
                raise FetchError(f"body is over the {cap}-byte limit")
            chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise FetchError("timed out", transient=True)
        return status, None, b"".join(chunks)

    # -- per-thread connection cache ------------------------------------------------------------

    def _pool(self) -> OrderedDict[_PoolKey, _HTTPConnection]:
        pool: OrderedDict[_PoolKey, _HTTPConnection] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = OrderedDict()
            self._local.pool = pool
            with self._pools_lock:
                self._all_pools.append(pool)
        return pool

    def _take(self, key: _PoolKey) -> _HTTPConnection | None:
        return self._pool().pop(key, None)

    def _give(self, key: _PoolKey, conn: _HTTPConnection) -> None:
        pool = self._pool()
        pool[key] = conn
        while len(pool) > self._max_idle:
            _, oldest = pool.popitem(last=False)
            oldest.close()

    def _connect(self, key: _PoolKey) -> _HTTPConnection:
        scheme, host, port = key
        if scheme == "https":
            return _HTTPSConnection(host, port, self._resolver, self._tls)
        return _HTTPConnection(host, port, self._resolver)


def _checked(url: str) -> SplitResult:
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as err:
        raise FetchError(f"invalid URL: {err}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise FetchError(f"unsupported URL scheme {parts.scheme or '(none)'!r}: only http and https")
    if not host:
        raise FetchError("invalid URL: no host")
    return parts


def _pool_key(parts: SplitResult) -> _PoolKey:
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError(f"invalid host name {host!r}") from None
    return scheme, host, parts.port or (443 if scheme == "https" else 80)


def _target(parts: SplitResult) -> str:
    path = quote(parts.path or "/", safe=_SAFE_URL_CHARS)
    if parts.query:
        path += "?" + quote(parts.query, safe=_SAFE_URL_CHARS)
    return path


def _is_stale_connection(err: BaseException) -> bool:
    return isinstance(
        err, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError | ConnectionAbortedError
    )


def _as_fetch_error(err: BaseException) -> FetchError:
    if isinstance(err, TimeoutError | socket.timeout):
        return FetchError("timed out", transient=True)
    if isinstance(err, socket.gaierror):
        return FetchError(f"cannot resolve host: {err.strerror}", transient=err.errno == socket.EAI_AGAIN)
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return FetchError(f"SSL error: {err}")
    if isinstance(err, http.client.IncompleteRead):
        return FetchError("connection closed before the whole body arrived", transient=True)
    if isinstance(err, http.client.HTTPException):
        return FetchError(f"bad HTTP response: {type(err).__name__}", transient=True)
    if isinstance(err, ConnectionRefusedError):
        return FetchError("connection refused", transient=True)
    return FetchError(str(err) or type(err).__name__, transient=True)
