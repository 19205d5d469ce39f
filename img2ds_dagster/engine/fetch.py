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
import importlib.metadata
import random
import re
import socket
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
from multidict import CIMultiDictProxy
from yarl import URL

from .guard import AddressPolicy, GuardedResolver, GuardRefusal, Hop, Lookup, current_hop, system_lookup
from .polite import (
    ROBOTS_MAX_BYTES,
    HostGate,
    HostUnavailable,
    Politeness,
    Refused,
    header_usage_opt_out,
)
from .settings import FetchSettings

PRODUCT = "img2ds_dagster"  # the robot's product token, in its User-Agent and for robots.txt
try:
    VERSION = importlib.metadata.version(PRODUCT)
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
    VERSION = "0"
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
    opt_out: str | None = None  # the kind of site signal that refused it (polite.py, _opt_out)


class FetchError(Exception):
    """One failed attempt. ``transient`` failures (timeouts, resets, 5xx, 429) are worth a retry;
    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one; ``status`` the HTTP
    status when the server answered; ``unreachable`` a timeout or a failed connection (which count
    towards giving up on the host); ``opt_out`` the kind of signal that refused the image."""

    def __init__(  # noqa: PLR0913 - the fields of an exception, given by name
        self,
        message: str,
        transient: bool = False,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        unreachable: bool = False,
        opt_out: str | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after
        self.status = status
        self.unreachable = unreachable
        self.opt_out = opt_out


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


def user_agent(settings: FetchSettings) -> str:
    """``img2ds_dagster/<version>``, with ``(compatible; <token>; +<contact>)`` as far as they are set;
    or the ``user_agent`` option whole. Never another crawler's name."""
    if settings.user_agent:
        return settings.user_agent
    details = [f"compatible; {settings.user_agent_token}"] if settings.user_agent_token else []
    if settings.user_agent_contact:
        details.append(f"+{settings.user_agent_contact}")
    return f"{PRODUCT}/{VERSION}" + (f" ({'; '.join(details)})" if details else "")


class HttpClient:
    """The HTTP side of a process: one event loop in a thread of its own, one aiohttp session (its
    connection pool, and the address guard's resolver and cache), and the per-host politeness of
    ``polite.py``; shared by every shard built at once, whatever each table's settings.
    ``lookup`` replaces getaddrinfo (tests give names addresses of their own this way)."""

    def __init__(self, politeness: Politeness | None = None, lookup: Lookup = system_lookup) -> None:
        self.politeness = politeness or Politeness()
        self.resolver = GuardedResolver(lookup)
        self._loop = asyncio.new_event_loop()
        # getaddrinfo runs in the loop's default executor, which on 2 cores has 6 threads: a few slow
        # DNS answers would hold every other download's lookup.
        self._lookups = ThreadPoolExecutor(max_workers=16, thread_name_prefix="img2ds-dns")
        self._loop.set_default_executor(self._lookups)
        self._thread = threading.Thread(target=self._loop.run_forever, name="img2ds-http", daemon=True)
        self._thread.start()
        self._closed = False
        self.session = self.run(self._open())

    async def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0,  # the shard builders and the per-host gates bound what is in flight
            resolver=self.resolver,
            use_dns_cache=False,  # the resolver caches, and answers per hop (guard.py)
            happy_eyeballs_delay=0.25,
        )
        return aiohttp.ClientSession(
            connector=connector,
            # urllib's request headers, which img2dataset sends; the User-Agent is each table's.
            headers={"Accept": "*/*", "Accept-Encoding": "identity"},
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies are neither kept nor sent, as img2dataset
            timeout=aiohttp.ClientTimeout(total=None),  # the attempt's deadline is ours
            max_line_size=_MAX_LINE,
            max_field_size=_MAX_LINE,
        )

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the client's loop and wait for its result (not from the loop's thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

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
        await self.session.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fetcher:
    """Downloads URLs with one table's settings, on an HttpClient (its own when none is given, closed
    with it); ``fetch`` is safe to call from any thread but the client's loop.

    ``fetch_async`` runs on the client's loop (``run`` hands it a coroutine): the shard builder
    keeps ``thread_count`` downloads in flight there per shard.
    """

    def __init__(
        self, settings: FetchSettings, client: HttpClient | None = None, lookup: Lookup = system_lookup
    ) -> None:
        self.settings = settings
        self._own = client is None
        self.client = client if client is not None else HttpClient(lookup=lookup)
        # The robot's product token: what robots.txt groups and X-Robots-Tag lines are matched against.
        self.token = (settings.user_agent_token or PRODUCT).strip()
        self._directives = frozenset(d.strip().lower() for d in settings.disallowed_header_directives)
        self._headers = {"User-Agent": user_agent(settings)}
        self._ssl: bool | None = False if settings.ignore_ssl_certificate else None  # None: verify
        self._proxies = _Proxies(settings.proxy)
        policy = AddressPolicy.from_options(settings.allowed_networks, settings.blocked_networks)
        self._first_hop = Hop(policy, True, frozenset(h.lower() for h in self._proxies.hosts()))
        self._random = random.Random()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.client.run(coro)

    def fetch(self, url: str) -> FetchResult:
        """Download ``url``, retrying transient failures ``retries`` times."""
        return self.run(self.fetch_async(url))

    def close(self) -> None:
        if self._own:
            self.client.close()

    def gate(self, host: str) -> HostGate:
        """The host's gate (polite.py), for the shard's scheduler."""
        return self.client.politeness.gate(host)

    async def fetch_async(self, url: str, defer: bool = False) -> FetchResult:
        """Download ``url``: its robots.txt first (when respected), then attempts through the host's
        gate (polite.py). A transient failure is retried ``retries`` times, each attempt with its own
        ``timeout``, all of them and the waits between them within ``timeout x (retries + 1)``; a 429
        or 503 is retried after its Retry-After (or a backoff), and two in a row pause the host for
        every shard (polite.SLOW_DOWNS_TO_PAUSE). With ``defer``, a first attempt that would have to
        wait for its host raises Deferred instead (the caller has other downloads to start)."""
        s = self.settings
        try:
            target = _checked(url)
        except FetchError as err:
            return FetchResult(None, str(err))
        budget_end = time.monotonic() + s.timeout * (s.retries + 1)
        politeness = self.client.politeness
        host = (target.raw_host or "").lower()
        gate = politeness.gate(host)
        if s.respect_robots_txt:
            # The guard first (a dictionary lookup once the host is known): what it refuses, or a
            # name that does not resolve, fails the sample as such, not as a robots.txt unreachable.
            try:
                proxied = self._proxies.for_url(target)[0] is not None
                await self.client.resolver.check_hop(host, target.port or 0, self._first_hop, proxied, False)
            except GuardRefusal as err:
                return FetchResult(None, str(err))
            except socket.gaierror as err:
                return FetchResult(None, str(_dns_error(err)))
            refusal = await self._robots_refusal(target, host)
            if refusal is not None:
                return FetchResult(None, str(refusal), opt_out=refusal.kind)
        waits, waited = 0, 0.0
        error = FetchError("not attempted")
        for attempt in range(s.retries + 1):
            try:
                async with gate.turn(budget_end, defer=defer and attempt == 0):
                    data = await self._attempt(target, image=True)
            except HostUnavailable as err:
                error = FetchError(f"{host}: {err}")
                break
            except FetchError as err:
                error = err
                wait = self._after_failure(err, gate)
                if not err.transient or attempt == s.retries:
                    break
                left = budget_end - time.monotonic()
                if err.retry_after is not None and err.retry_after >= left:
                    left = max(0.0, left)
                    error = FetchError(
                        f"{err} (Retry-After {err.retry_after:g} s, more than the {left:.1f} s left)"
                    )
                    break
                if wait is None:  # the host is not paused: this sample waits on its own
                    wait = self._own_wait(err, attempt, left)
                    await asyncio.sleep(wait)
                waits, waited = waits + 1, waited + wait
                continue
            gate.answered()
            return FetchResult(data[1], None, waits, waited)
        return FetchResult(None, str(error), waits, waited, opt_out=error.opt_out)

    def _own_wait(self, err: FetchError, attempt: int, left: float) -> float:
        """Before a sample's next attempt: the server's Retry-After (it fits in ``left``), else an
        exponential backoff with full jitter."""
        if err.retry_after is not None:
            return err.retry_after
        return min(self._random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)), left)

    def _after_failure(self, err: FetchError, gate: HostGate) -> float | None:
        """Tell the host's gate what happened; the pause it now makes every request wait, if any."""
        if err.status in RETRY_AFTER_STATUSES:
            return gate.slow_down(err.retry_after, self.client.politeness.rng)
        if err.unreachable:
            gate.failed(str(err), self.client.politeness.failure_limit)
        elif err.status is not None:
            gate.answered()  # the host answers: a 404 is not a dead host
        return None

    async def _robots_refusal(self, target: URL, host: str) -> Refused | None:
        origin = f"{target.scheme}://{target.raw_authority}"
        rules = await self.client.politeness.robots(origin, host, self.token, self._fetch_robots)
        return rules.refusal(str(target), target.raw_path_qs, self.token)

    async def _fetch_robots(self, url: str) -> tuple[int | None, bytes | str]:
        """robots.txt through the same gate, guard and deadline as an image: (status, body), or
        (None, why) when the host did not answer."""
        target = _checked(url)
        gate = self.client.politeness.gate((target.raw_host or "").lower())
        try:
            async with gate.turn(time.monotonic() + self.settings.timeout):
                status, body = await self._attempt(target, image=False)
        except HostUnavailable as err:
            return None, str(err)
        except FetchError as err:
            if err.status is not None:
                return err.status, b""
            if err.unreachable:
                gate.failed(str(err), self.client.politeness.failure_limit)
            return None, str(err)
        gate.answered()
        return status, body

    # -- one attempt ---------------------------------------------------------------------------

    async def _attempt(self, target: URL, image: bool) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await self._follow(target, image)
        except TimeoutError:
            raise FetchError("timed out", transient=True, unreachable=True) from None
        except GuardRefusal as err:
            raise FetchError(str(err)) from None
        except socket.gaierror as err:  # the guard's own lookup, before the request
            raise _dns_error(err) from None
        except aiohttp.ClientError as err:
            raise _as_fetch_error(err) from None

    async def _follow(self, target: URL, image: bool) -> tuple[int, bytes]:
        """Each hop checked by the guard before its request: private addresses stay allowed while
        the chain has not been on a public address (the input table's own URL may be private)."""
        hop = self._first_hop
        for number in range(self.settings.max_redirects + 1):
            proxy, proxy_auth = self._proxies.for_url(target)
            host, port = target.raw_host or "", target.port or 0
            public = await self.client.resolver.check_hop(
                host, port, hop, proxy is not None, strict=number > 0
            )
            token = current_hop.set(hop)
            try:
                answer = await self._get(target, proxy, proxy_auth, image)
            finally:
                current_hop.reset(token)
            if not isinstance(answer, str):
                return answer
            url = urljoin(str(target), answer)
            scheme = urlsplit(url).scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchError(f"redirect to a {scheme or 'relative'} URL refused: only http and https")
            target = _checked(url)
            if hop.private_ok and public:
                hop = Hop(hop.policy, False, hop.exempt)
        raise FetchError(f"too many redirects (more than {self.settings.max_redirects})")

    async def _get(
        self, url: URL, proxy: URL | None, proxy_auth: BasicAuth | None, image: bool
    ) -> tuple[int, bytes] | str:
        """One request: (status, body), or the Location of a redirect."""
        async with self.client.session.get(
            url,
            allow_redirects=False,
            headers=self._headers,
            proxy=proxy,
            proxy_auth=proxy_auth,
            ssl=True if self._ssl is None else self._ssl,
        ) as resp:
            status, headers = resp.status, resp.headers
            if status in REDIRECT_STATUSES:
                location = headers.get("Location")
                await _drain(resp)
                if not location:
                    raise FetchError(
                        f"HTTP Error {status}: redirect without a Location header", status=status
                    )
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
                    status=status,
                )
            if not image:
                return status, await _read_capped(resp, ROBOTS_MAX_BYTES, truncate=True)
            refusal = self._opt_out(headers)
            if refusal is not None:
                resp.close()  # not a byte of the body is read
                raise FetchError(str(refusal), opt_out=refusal.kind)
            return status, await _read_capped(resp, self.settings.max_download_bytes)

    def _opt_out(self, headers: CIMultiDictProxy[str]) -> Refused | None:
        """The opt-out signals of an image's response headers, in the order they are checked."""
        s = self.settings
        if self._directives and is_disallowed(headers, self.token.lower(), self._directives):
            return Refused("Use of image disallowed by X-Robots-Tag directive", "x-robots-tag")
        if s.respect_tdm_reservation and headers.get("tdm-reservation", "").strip() == "1":
            return Refused(
                "Use of image reserved by its TDMRep header (tdm-reservation: 1)", "tdm-reservation"
            )
        if s.respect_content_usage and header_usage_opt_out(headers.get("Content-Usage")):
            usage = headers.get("Content-Usage")
            return Refused(f"AI training opted out by the Content-Usage header ({usage})", "content-usage")
        return None


def host_of(url: str | None) -> str:
    """The host a URL's politeness is counted under (as ``fetch_async`` counts it); "" if none."""
    try:
        return (URL((url or "").strip()).raw_host or "").lower()
    except (ValueError, UnicodeError):
        return ""


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


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, truncate: bool = False) -> bytes:
    """The (decoded) body, refused once over ``cap`` bytes: first by its declared length (the
    encoded length: a body larger than the cap encoded is not read at all), then while streaming.
    With ``truncate``, the first ``cap`` bytes instead (robots.txt)."""
    length = resp.content_length
    if length is not None and length > cap and not truncate:
        resp.close()
        raise FetchError(f"body of {length} bytes is over the {cap}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            resp.close()
            if truncate:
                chunks.append(chunk[: len(chunk) - (size - cap)])
                break
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
            return FetchError(f"connection refused{_tried(err.os_error)}", transient=True, unreachable=True)
        reason = getattr(err.os_error, "strerror", None) or str(err.os_error)
        return FetchError(f"cannot connect: {reason}{_tried(err.os_error)}", transient=True, unreachable=True)
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
