"""One download, as policy over aiohttp: what we allow, on top of a well-kept HTTP client.

aiohttp does the wire work (HTTP/1.0 and 1.1, keep-alive, chunked and close-delimited bodies,
content encodings, proxies with CONNECT for https, every address of a host tried, happy-eyeballs
style). Here: a total deadline per attempt (connect, headers and body), a cap on the body
(``Content-Length`` checked before reading, the decoded bytes counted while streaming, so a
compressed bomb is refused, not inflated), redirects followed hop by hop (http and https only, at
most ``max_redirects``, each hop through the address guard of ``guard.py``), X-Robots-Tag opt-outs
decided from the headers before any byte of the body is read (the connection is dropped, not
drained), and retries of transient failures: after a ``Retry-After`` on 429 and 503 when it fits in
what is left of the sample's time, else after an exponential backoff with full jitter.

All downloads of a Fetcher share one ``ClientSession`` on one asyncio event loop, in a thread of its
own; the shard builder keeps ``thread_count`` of them in flight there.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.helpers import BasicAuth, proxies_from_env
from yarl import URL

from .guard import AddressPolicy, GuardedResolver, GuardRefusal, Lookup, private_allowed, system_lookup
from .settings import FetchSettings

# img2dataset's User-Agent, so that sites treat both tools alike.
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
_MAX_DRAIN = 64 * 1024  # a redirect's or an error page's body read so that its connection is kept
_MAX_LINE = 64 * 1024  # status line and each header, as http.client allows
_BACKOFF_BASE = 0.5  # seconds before the first retry, doubling on each one (full jitter)
_BACKOFF_CAP = 8.0
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The body of a successful download, or the error message recorded for the sample; and the
    waits before retries (how many, how long in all)."""

    data: bytes | None
    error: str | None
    waits: int = 0
    waited: float = 0.0


class FetchError(Exception):
    """One failed attempt. ``transient`` failures (timeouts, resets, 5xx, 429) are worth a retry;
    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one."""

    def __init__(self, message: str, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


class _HeaderValues(Protocol):
    def getall(self, key: str, default: list[str]) -> list[str]: ...


def is_disallowed(headers: _HeaderValues, user_agent_token: str | None, directives: frozenset[str]) -> bool:
    """True if an X-Robots-Tag header opts this image out, for every robot or for our token.

    Same rule as img2dataset: ``X-Robots-Tag: noai`` applies to all robots, ``X-Robots-Tag: bot: noai``
    only to a user agent token ``bot``.
    """
    for value in headers.getall("X-Robots-Tag", []):
        robot, colon, names = value.partition(":")
        if not colon:
            robot, names = "", value
        if robot.strip().lower() in ("", user_agent_token) and directives.intersection(
            n.strip().lower() for n in names.split(",")
        ):
            return True
    return False


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds or an HTTP date; None if absent or
    unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Proxies:
    """Which proxy a URL goes through: the ``proxy`` option for every URL, else ``HTTP_PROXY`` /
    ``HTTPS_PROXY`` with ``NO_PROXY`` (and their lowercase forms), read once as urllib reads them.

    aiohttp's ``trust_env`` would do this too, but per request, reading the environment and the
    netrc file in a worker thread each time: a thread hop and file reads for every URL. Here it is
    a dictionary lookup per host."""

    def __init__(self, explicit: str | None) -> None:
        self._explicit = URL(explicit) if explicit else None
        self._env = {} if explicit else proxies_from_env()
        self._bypass: dict[str, bool] = {}

    def hosts(self) -> list[str]:
        proxies = [self._explicit] if self._explicit else [p.proxy for p in self._env.values()]
        return [p.host for p in proxies if p is not None and p.host]

    def for_url(self, url: URL) -> tuple[URL | None, BasicAuth | None]:
        if self._explicit is not None:
            return self._explicit, None
        info = self._env.get(url.scheme)
        host = url.host or ""
        if info is None:
            return None, None
        bypass = self._bypass.get(host)
        if bypass is None:
            bypass = bool(urllib.request.proxy_bypass(host))
            if len(self._bypass) > 65536:
                self._bypass.clear()
            self._bypass[host] = bypass
        return (None, None) if bypass else (info.proxy, info.proxy_auth)


class Fetcher:
    """Downloads URLs on an event loop of its own; ``fetch`` is safe to call from any other thread.

    ``fetch_async`` runs on that loop (``run`` hands it a coroutine): the shard builder keeps
    ``thread_count`` downloads in flight there per shard. ``close()`` stops the loop. ``lookup``
    replaces getaddrinfo (tests give names addresses of their own this way).
    """

    def __init__(self, settings: FetchSettings, lookup: Lookup = system_lookup) -> None:
        self.settings = settings
        token = settings.user_agent_token
        self._token = token.strip().lower() if token else None
        self._directives = frozenset(d.strip().lower() for d in settings.disallowed_header_directives)
        user_agent = USER_AGENT
        if token:
            user_agent += f" (compatible; {token}; +https://github.com/rom1504/img2dataset)"
        # urllib's request headers, which img2dataset sends: servers treat both alike.
        self._headers = {"User-Agent": user_agent, "Accept": "*/*", "Accept-Encoding": "identity"}
        self._proxies = _Proxies(settings.proxy)
        policy = AddressPolicy.from_options(settings.allowed_networks, settings.blocked_networks)
        self._resolver = GuardedResolver(policy, lookup, exempt_hosts=self._proxies.hosts())
        self._random = random.Random()
        self._loop = asyncio.new_event_loop()
        # getaddrinfo runs in the loop's default executor, which on 2 cores has 6 threads: a few slow
        # DNS answers would hold every other download's lookup.
        self._lookups = ThreadPoolExecutor(max_workers=16, thread_name_prefix="img2ds-dns")
        self._loop.set_default_executor(self._lookups)
        self._thread = threading.Thread(target=self._loop.run_forever, name="img2ds-fetch", daemon=True)
        self._thread.start()
        self._closed = False
        self._session = self.run(self._open())

    async def _open(self) -> aiohttp.ClientSession:
        tls: ssl.SSLContext | bool = ssl.create_default_context()
        if self.settings.ignore_ssl_certificate:
            tls = False
        connector = aiohttp.TCPConnector(
            limit=0,  # the shard builder bounds the downloads in flight
            resolver=self._resolver,
            use_dns_cache=False,  # the resolver caches, and answers per hop (guard.py)
            ssl=tls,
            happy_eyeballs_delay=0.25,
        )
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies are neither kept nor sent, as img2dataset
            timeout=aiohttp.ClientTimeout(total=None),  # the attempt's deadline is ours
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
        )

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the fetcher's loop and wait for its result (not from the loop's thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def fetch(self, url: str) -> FetchResult:
        """Download ``url``, retrying transient failures ``retries`` times."""
        return self.run(self.fetch_async(url))

    async def fetch_async(self, url: str) -> FetchResult:
        """Download ``url``; a transient failure is retried ``retries`` times, each attempt with its
        own ``timeout``, all of them and the waits between them within ``timeout x (retries + 1)``."""
        retries = self.settings.retries
        budget_end = time.monotonic() + self.settings.timeout * (retries + 1)
        waits, waited = 0, 0.0
        for attempt in range(retries + 1):
            try:
                return FetchResult(await self._attempt(url), None, waits, waited)
            except FetchError as err:
                error = err
                if not err.transient or attempt == retries:
                    break
                left = budget_end - time.monotonic()
                if err.retry_after is not None:
                    wait = err.retry_after
                    if wait >= left:
                        error = FetchError(
                            f"{err} (Retry-After {wait:g} s, more than the {max(0, left):.1f} s left)"
                        )
                        break
                else:
                    wait = min(self._random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)), left)
                await asyncio.sleep(wait)
                waits, waited = waits + 1, waited + wait
        return FetchResult(None, str(error), waits, waited)

    def close(self) -> None:
        """Cancel what is still running, close every connection and stop the loop's thread."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # the loop is already gone
            self.run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._lookups.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._session.close()

    # -- one attempt ---------------------------------------------------------------------------

    async def _attempt(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await self._follow(url)
        except TimeoutError:
            raise FetchError("timed out", transient=True) from None
        except GuardRefusal as err:
            raise FetchError(str(err)) from None
        except socket.gaierror as err:  # the guard's own lookup, before the request
            raise _dns_error(err) from None
        except aiohttp.ClientError as err:
            raise _as_fetch_error(err) from None

    async def _follow(self, url: str) -> bytes:
        """Each hop checked by the guard before its request: private addresses stay allowed while
        the chain has not been on a public address (the input table's own URL may be private)."""
        private_ok = True
        for hop in range(self.settings.max_redirects + 1):
            target = _checked(url)
            proxy, proxy_auth = self._proxies.for_url(target)
            host, port = target.raw_host or "", target.port or 0
            public = await self._resolver.check_hop(host, port, private_ok, proxy is not None, strict=hop > 0)
            token = private_allowed.set(private_ok)
            try:
                location = await self._get(target, proxy, proxy_auth)
            finally:
                private_allowed.reset(token)
            if isinstance(location, bytes):
                return location
            url = urljoin(str(target), location)
            scheme = urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchError(f"redirect to a {scheme or 'relative'} URL refused: only http and https")
            private_ok = private_ok and not public
        raise FetchError(f"too many redirects (more than {self.settings.max_redirects})")

    async def _get(self, url: URL, proxy: URL | None, proxy_auth: BasicAuth | None) -> bytes | str:
        """One request: the body, or the Location of a redirect."""
        async with self._session.get(url, allow_redirects=False, proxy=proxy, proxy_auth=proxy_auth) as resp:
            status, headers = resp.status, resp.headers
            if status in REDIRECT_STATUSES:
                location = headers.get("Location")
                await _drain(resp)
                if not location:
                    raise FetchError(f"HTTP Error {status}: redirect without a Location header")
                return location
            if not 200 <= status < 300:
                await _drain(resp)
                retry_after = None
                if status in RETRY_AFTER_STATUSES:
                    retry_after = retry_after_seconds(headers.get("Retry-After"))
                raise FetchError(
                    f"HTTP Error {status}: {resp.reason}",
                    transient=status in TRANSIENT_STATUSES,
                    retry_after=retry_after,
                )
            if self._directives and is_disallowed(headers, self._token, self._directives):
                resp.close()  # not a byte of the body is read
                raise FetchError("Use of image disallowed by X-Robots-Tag directive")
            return await _read_capped(resp, self.settings.max_download_bytes)


def _checked(url: str) -> URL:
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
    try:
        return URL(url.strip())
    except (ValueError, UnicodeError) as err:
        raise FetchError(f"invalid URL: {err}") from None


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read a short body nobody needs (a redirect's, an error page) so that its connection can serve
    the next request; a long or unknown one closes the connection instead."""
    length = resp.content_length
    if length is not None and length <= _MAX_DRAIN:
        with contextlib.suppress(aiohttp.ClientError):
            await resp.read()
            return
    resp.close()


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The (decoded) body, refused once over ``cap`` bytes: first by its declared length (the
    encoded length: a body larger than the cap encoded is not read at all), then while streaming."""
    length = resp.content_length
    if length is not None and length > cap:
        resp.close()
        raise FetchError(f"body of {length} bytes is over the {cap}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            resp.close()
            raise FetchError(f"body is over the {cap}-byte limit")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_TRIED = re.compile(r"\('([^']+)', (\d+)")


def _tried(err: OSError | None) -> str:
    """`` (tried ::1 port 80, 127.0.0.1 port 80)``: the addresses a connect error names."""
    tried = [f"{host} port {port}" for host, port in _TRIED.findall(str(err or ""))]
    return f" (tried {', '.join(tried)})" if tried else ""


def _dns_error(err: OSError) -> FetchError:
    # EAI_AGAIN is a temporary failure in name resolution: worth a retry; "no such name" is not.
    return FetchError(f"cannot resolve host: {err.strerror or err}", transient=err.errno == socket.EAI_AGAIN)


def _as_fetch_error(err: aiohttp.ClientError) -> FetchError:
    """aiohttp's errors in the words the metadata uses (img2dataset's where it has them)."""
    if isinstance(err, aiohttp.ClientConnectorDNSError):
        return _dns_error(err.os_error)
    if isinstance(err, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return FetchError(f"SSL error: {err}")
    if isinstance(err, aiohttp.ClientProxyConnectionError):
        return FetchError(
            f"cannot connect to the proxy {err.host}:{err.port}{_tried(err.os_error)}", transient=True
        )
    if isinstance(err, aiohttp.ClientConnectorError):
        if isinstance(err.os_error, ConnectionRefusedError):
            return FetchError(f"connection refused{_tried(err.os_error)}", transient=True)
        reason = getattr(err.os_error, "strerror", None) or str(err.os_error)
        return FetchError(f"cannot connect: {reason}{_tried(err.os_error)}", transient=True)
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return FetchError("bad HTTP response: RemoteDisconnected", transient=True)
    if isinstance(err, aiohttp.ClientPayloadError):
        cause = str(err.__cause__ or err)
        if "ecompress" in cause or "encoding" in cause.lower():
            return FetchError(f"cannot decode the body: {cause}")
        return FetchError("connection closed before the whole body arrived", transient=True)
    if isinstance(err, aiohttp.ClientResponseError):
        return FetchError(f"bad HTTP response: {err.message}", transient=True)
    if isinstance(err, aiohttp.InvalidURL):
        return FetchError(f"invalid URL: {err}")
    return FetchError(str(err) or type(err).__name__, transient=True)
