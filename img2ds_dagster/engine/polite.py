"""Per-host politeness, shared by every shard a process builds at once: robots.txt and its AI-usage
lines, at most so many requests in flight to a host, starts spaced by an interval (and Crawl-delay),
a host that asks to slow down (429/503) twice in a row backed off for everyone, a host that keeps
failing given up.

robots.txt follows RFC 9309: fetched once per origin (scheme, host, port) through the same client,
guard and deadline as images, at most 500 KiB read, kept for the run (at most 24 hours); a 4xx answer
means no restrictions, a 5xx answer or no answer means everything is disallowed for this run. Its
rules are matched by protego against our product token, else ``*``. The AI-usage lines sit in the
same groups: Cloudflare's ``Content-Signal: ai-train=no`` and IETF aipref's ``Content-Usage:
[path] train-ai=n`` opt the matching paths out.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from protego import Protego

ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309: at least 500 KiB must be parsed; we read no more
ROBOTS_TTL = 24 * 3600.0  # RFC 9309: a cached robots.txt should not be used for more than 24 hours
_BACKOFF_BASE = 1.0  # a host's first pause without Retry-After lasts up to 1 s, then 2, 4...
_BACKOFF_CAP = 60.0
# The 429/503 answers in a row, with no other answer between, that pause a host for everyone. A
# rate limiter refuses every request over its rate, so its second refusal comes at once; a host that
# refuses one request in ten whatever the rate is not asking everyone to stop (pausing it at each
# such answer cost 16% of images/s on benchmarks/polite.py's corpus). The request refused alone
# still waits its Retry-After before it is asked again (fetch.py).
SLOW_DOWNS_TO_PAUSE = 2
# Usage vocabularies that opt content out of AI training: aipref's Content-Usage (train-ai, and its
# broader categories ai and tdm) and Cloudflare's Content-Signal (ai-train).
_USAGE_OPT_OUTS = {"train-ai": "n", "train-genai": "n", "ai": "n", "genai": "n", "tdm": "n"}
_SIGNAL_OPT_OUTS = {"ai-train": "no"}


# Defaults of the workers' politeness options (engine/shard.py's Workers).
DEFAULT_CONNECTIONS_PER_HOST = 16
DEFAULT_HOST_FAILURE_LIMIT = 8


class Refused(Exception):
    """A sample a site's rules refuse; ``kind`` says which signal (for the stats)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Deferred(Exception):
    """A download that would have had to wait for its host, given back to be taken again later."""


class HostUnavailable(Exception):
    """A host given up on for this run, or paused past the sample's time; the message says which."""


def _pattern(path: str) -> re.Pattern[str]:
    """A robots.txt path pattern (``*`` any characters, a final ``$`` the end) as a regex."""
    anchored = path.endswith("$")
    body = re.escape(path.rstrip("$")).replace(r"\*", ".*")
    return re.compile(body + ("$" if anchored else ""))


@dataclass(frozen=True, slots=True)
class _Usage:
    path: str  # "" for every path
    expression: str


@dataclass(frozen=True, slots=True)
class RobotsRules:
    """What one origin's robots.txt says to one product token."""

    parser: Protego | None  # None: no restrictions (no file, or a 4xx)
    disallow_all: str | None = None  # why everything is disallowed (a 5xx, no answer)
    usage: tuple[_Usage, ...] = ()  # the AI-usage lines of our groups
    crawl_delay: float = 0.0

    @classmethod
    def parse(cls, text: str, token: str) -> RobotsRules:
        parser = Protego.parse(text)
        delay = parser.crawl_delay(token)
        return cls(parser, None, _usage_lines(text, token), float(delay or 0.0))

    def refusal(self, url: str, path: str, token: str) -> Refused | None:
        if self.disallow_all is not None:
            return Refused(self.disallow_all, "robots.txt unavailable")
        if self.parser is not None and not self.parser.can_fetch(url, token):
            return Refused(f"robots.txt: disallowed for {token} (path {path})", "robots.txt")
        best: _Usage | None = None
        for usage in self.usage:
            if (not usage.path or _pattern(usage.path).match(path)) and (
                best is None or len(usage.path) > len(best.path)
            ):
                best = usage
        if best is not None and _opts_out(best.expression, _USAGE_OPT_OUTS | _SIGNAL_OPT_OUTS):
            where = f" for {best.path}" if best.path else ""
            return Refused(
                f"robots.txt: AI training opted out{where} ({best.expression})", "robots.txt ai-usage"
            )
        return None


def _opts_out(expression: str, opt_outs: dict[str, str]) -> bool:
    for part in re.split(r"[,;]", expression):
        key, _, value = part.partition("=")
        if opt_outs.get(key.strip().lower()) == value.strip().lower().strip('"'):
            return True
    return False


def header_usage_opt_out(value: str | None) -> bool:
    """Whether an aipref ``Content-Usage`` response header opts the image out of AI training."""
    return value is not None and _opts_out(value, _USAGE_OPT_OUTS)


def _usage_lines(text: str, token: str) -> tuple[_Usage, ...]:
    """The Content-Usage and Content-Signal lines of the groups that apply to ``token``: the groups
    naming it (case-insensitively), else those of ``*`` (RFC 9309's choice of group)."""
    groups: list[tuple[list[str], list[_Usage]]] = []
    in_agents = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name, value = name.strip().lower(), value.strip()
        if name == "user-agent":
            if not in_agents:
                groups.append(([], []))
            groups[-1][0].append(value.lower())
            in_agents = True
            continue
        in_agents = False
        if name in ("content-usage", "content-signal") and groups:
            path, _, expression = value.partition(" ") if value.startswith("/") else ("", "", value)
            groups[-1][1].append(_Usage(path.strip(), expression.strip()))
    token = token.lower()
    chosen = token if any(token in agents for agents, _ in groups) else "*"
    return tuple(usage for agents, lines in groups if chosen in agents for usage in lines)


RobotsFetch = Callable[[str], Awaitable[tuple[int | None, bytes | str]]]


@dataclass
class HostGate:
    """One host's turn-taking. Lives on the client's event loop."""

    limit: int
    interval: float = 0.0  # seconds between two request starts (min_request_interval, Crawl-delay)
    next_start: float = 0.0
    paused_until: float = 0.0  # after 429/503 answers in a row
    slow_downs: int = 0  # 429/503 answers in a row
    pauses: int = 0  # consecutive pauses
    failures: int = 0  # consecutive timeouts and connection failures
    given_up: str | None = None
    taken: int = 0  # downloads the shard schedulers have taken for this host and not finished
    _waiters: asyncio.Semaphore | None = field(default=None, repr=False)

    @contextlib.asynccontextmanager
    async def turn(self, deadline: float, defer: bool = False) -> AsyncIterator[None]:
        """Hold one of the host's ``limit`` slots, started no sooner than the interval allows and
        not while the host is paused; HostUnavailable if it is given up on or paused past
        ``deadline``. With ``defer``, Deferred instead of waiting for a slot or a start."""
        if self._waiters is None:
            self._waiters = asyncio.Semaphore(self.limit)
        if defer and self._would_wait():
            raise Deferred
        async with self._waiters:
            self._check(deadline)
            now = time.monotonic()
            start = max(now, self.next_start, self.paused_until)
            self.next_start = start + self.interval
            if start > now:
                await asyncio.sleep(start - now)
                self._check(deadline)
            yield

    def claim(self) -> Claim:
        """A shard scheduler's claim on one of the host's slots, until its download is over."""
        self.taken += 1
        return Claim(self)

    def busy(self) -> bool:
        """Whether a download taken now would have to wait: as many downloads of this host are
        taken and not done as it has slots, or ``turn`` would make it wait. A download taken while
        the host is not busy is deferred only if something changed meanwhile (another download
        ran), so a deferred download is never taken again at once in a loop."""
        return self.taken >= self.limit or self._would_wait()

    def _would_wait(self) -> bool:
        full = self._waiters is not None and self._waiters.locked()
        return full or max(self.next_start, self.paused_until) > time.monotonic()

    def _check(self, deadline: float) -> None:
        if self.given_up is not None:
            raise HostUnavailable(self.given_up)
        if self.paused_until > deadline:
            wait = self.paused_until - time.monotonic()
            raise HostUnavailable(
                f"host asked to slow down: paused {wait:.0f} s more, past this sample's time"
            )

    def slow_down(self, retry_after: float | None, rng: random.Random) -> float | None:
        """A 429 or 503. From the SLOW_DOWNS_TO_PAUSE-th in a row on, pause the host for its
        Retry-After, or an exponential backoff with jitter, and return the pause; else None."""
        self.slow_downs += 1
        if self.slow_downs < SLOW_DOWNS_TO_PAUSE:
            return None
        self.pauses += 1
        wait = retry_after
        if wait is None:
            wait = rng.uniform(0.5, 1.0) * min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (self.pauses - 1))
        self.paused_until = max(self.paused_until, time.monotonic() + wait)
        return wait

    def answered(self) -> None:
        self.failures = 0
        self.slow_downs = 0
        self.pauses = 0

    def failed(self, error: str, limit: int) -> None:
        self.failures += 1
        if limit and self.failures >= limit and self.given_up is None:
            self.given_up = f"host given up after {self.failures} failures in a row (the last: {error})"


class Claim:
    """A download taken for a host and not over yet; ``release()`` gives it back (once)."""

    def __init__(self, gate: HostGate) -> None:
        self._gate: HostGate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.taken -= 1
            self._gate = None


class Politeness:
    """Every host's gate and robots.txt, for one process's run. Not thread-safe: used from the HTTP
    client's event loop only."""

    def __init__(
        self,
        max_connections_per_host: int = DEFAULT_CONNECTIONS_PER_HOST,
        min_request_interval: float = 0.0,
        host_failure_limit: int = DEFAULT_HOST_FAILURE_LIMIT,
    ) -> None:
        self.limit = max_connections_per_host
        self.interval = min_request_interval
        self.failure_limit = host_failure_limit
        self._gates: dict[str, HostGate] = {}
        self._robots: dict[tuple[str, str], tuple[float, asyncio.Future[RobotsRules]]] = {}
        self.rng = random.Random()

    def gate(self, host: str) -> HostGate:
        gate = self._gates.get(host)
        if gate is None:
            gate = self._gates[host] = HostGate(self.limit, self.interval)
        return gate

    async def robots(self, origin: str, host: str, token: str, fetch: RobotsFetch) -> RobotsRules:
        """The origin's robots.txt for ``token``, fetched once per run through ``fetch(url) ->
        (status or None, body or error)``. The download is a task of its own that every caller
        waits on: a caller that goes away (its shard cancelled) does not cancel it for the others."""
        key = (origin, token)
        now = time.monotonic()
        hit = self._robots.get(key)
        if hit is None or hit[0] <= now:
            task = asyncio.ensure_future(self._fetch_robots(origin, token, fetch))
            task.add_done_callback(lambda done: self._learned(key, host, done))
            hit = self._robots[key] = (now + ROBOTS_TTL, task)
        return await asyncio.shield(hit[1])

    def _learned(self, key: tuple[str, str], host: str, done: asyncio.Future[RobotsRules]) -> None:
        if done.cancelled() or done.exception() is not None:
            self._robots.pop(key, None)  # the next sample asks again
            return
        gate = self.gate(host)
        gate.interval = max(gate.interval, done.result().crawl_delay)

    async def _fetch_robots(self, origin: str, token: str, fetch: RobotsFetch) -> RobotsRules:
        status, body = await fetch(f"{origin}/robots.txt")
        if status is None:
            # The error first: it is what the image's own download would have met.
            return RobotsRules(None, f"{body!s} (robots.txt unreachable: every path disallowed for this run)")
        if status >= 500:
            return RobotsRules(None, f"robots.txt answered {status}: every path disallowed for this run")
        if status >= 400:
            return RobotsRules(None)  # no file: no restrictions
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return RobotsRules.parse(text, token)
