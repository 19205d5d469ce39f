"""Which addresses a download may connect to: the address policy, checked on every hop of every
download before a connection is opened, on the address that is then connected.

Always refused: link-local addresses (``169.254.0.0/16``, ``fe80::/10``), the cloud metadata
addresses and names, unspecified, multicast, broadcast and reserved addresses, whatever spelling the
URL uses (decimal, octal and hex IPv4 forms reach here as the address they stand for; an IPv4 address
inside an IPv6 one, mapped, 6to4 or NAT64, is checked as itself). Private and loopback addresses are
allowed when the URL of the input table points there (an intranet, a test server) and refused when a
redirect from a public address leads there. ``allowed_networks`` exempts networks from all of this,
``blocked_networks`` refuses more (and wins over allowed_networks).

The check sits in the resolver that aiohttp's connector asks for the addresses to connect to: it
answers only allowed addresses, so no later DNS answer can slip in between check and connect. A
host's addresses are cached for a few minutes, so the guard costs a dictionary lookup per URL.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult

from ..errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The instance metadata services of the big clouds (AWS, GCP, Azure, Oracle, DigitalOcean:
# 169.254.169.254; AWS over IPv6; AWS ECS task metadata; Alibaba Cloud, outside link-local space).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
METADATA_NAMES = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


class GuardRefusal(Exception):
    """A hop refused by the address policy; the message names the host, the address and the rule."""


def _networks(option: str, values: Iterable[str]) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as err:
        raise ConfigError(f"{option}: {err}") from None


def _as_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to (mapped, 6to4, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    allowed: tuple[IPNetwork, ...] = ()
    blocked: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_options(cls, allowed_networks: Iterable[str], blocked_networks: Iterable[str]) -> AddressPolicy:
        """ConfigError naming the option for a value that is not a network (``10.0.0.0/8``, ``fd00::1``)."""
        return cls(
            _networks("allowed_networks", allowed_networks), _networks("blocked_networks", blocked_networks)
        )

    def refusal(self, address: IPAddress, private_ok: bool) -> str | None:
        """None if ``address`` may be connected to, else the rule that refuses it. An IPv6 address
        that carries an IPv4 one is judged as that IPv4 address (both count for the options)."""
        inner = _as_ipv4(address)
        spellings = [a for a in (address, inner) if a is not None]
        for a in spellings:
            net = next((n for n in self.blocked if a.version == n.version and a in n), None)
            if net is not None:
                return f"in blocked_networks ({net})"
        if any(a.version == n.version and a in n for a in spellings for n in self.allowed):
            return None
        if inner is not None:
            rule = _builtin_rule(inner, private_ok)
            return f"{rule} (as {inner})" if rule else None
        return _builtin_rule(address, private_ok)

    @staticmethod
    def is_public(address: IPAddress) -> bool:
        return (_as_ipv4(address) or address).is_global


def _builtin_rule(a: IPAddress, private_ok: bool) -> str | None:
    if a in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if a.is_link_local:
        return "a link-local address"
    if a.is_unspecified:
        return "the unspecified address"
    if a.is_multicast:
        return "a multicast address"
    if a == _BROADCAST:
        return "the broadcast address"
    if a.is_reserved and not a.is_loopback:  # Python counts ::1 as reserved (it is in ::/8)
        return "a reserved address"
    if not a.is_global and not private_ok:
        kind = "a loopback" if a.is_loopback else "a private"
        return f"{kind} address reached by a redirect from a public one"
    return None


@dataclass(frozen=True, slots=True)
class Hop:
    """What the guard needs to know about the hop under way: the table's policy; whether it may still
    reach a private address (True for the input table's own URL and the redirects that have stayed
    on private addresses since); the proxies' hosts, which the user chose (never refused)."""

    policy: AddressPolicy
    private_ok: bool = True
    exempt: frozenset[str] = frozenset()


# The hop under way, set by the fetcher around each request; the resolver, which aiohttp's connector
# calls in the same task, reads it.
current_hop: contextvars.ContextVar[Hop] = contextvars.ContextVar("current_hop")


def name_refusal(host: str) -> str | None:
    """The rule refusing a host by its name alone (before any DNS), if any."""
    if host.rstrip(".").lower() in METADATA_NAMES:
        return "a cloud metadata host name"
    return None


def literal(host: str) -> IPAddress | None:
    """The address of a host that is an IP literal, else None."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# (family, address) pairs in getaddrinfo's order.
Addresses = list[tuple[int, str]]
Lookup = Callable[[str, int], Awaitable[Addresses]]


async def system_lookup(host: str, port: int) -> Addresses:
    """getaddrinfo, in the event loop's executor (it has no timeout of its own: the download's
    deadline bounds the wait)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: set[str] = set()
    found: Addresses = []
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in seen:
            seen.add(address)
            found.append((int(family), address))
    return found


@dataclass(frozen=True, slots=True)
class _Verdict:
    """A host's addresses judged for one kind of hop."""

    kept: Addresses  # the allowed ones, in getaddrinfo's order
    refused: list[str]  # "<address>, <rule>" for the others
    public: bool  # whether any kept address is public


def _judge(policy: AddressPolicy, found: Addresses, private_ok: bool) -> _Verdict:
    kept: Addresses = []
    refused = []
    public = False
    for fam, address in found:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        rule = policy.refusal(ip, private_ok)
        if rule is None:
            kept.append((fam, address))
            public = public or policy.is_public(ip)
        else:
            refused.append(f"{address}, {rule}")
    return _Verdict(kept, refused, public)


_Entry = tuple[float, Addresses, dict[tuple[AddressPolicy, bool], _Verdict]]  # expiry, addresses, verdicts


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver: every address of a host, in getaddrinfo's order (the connector tries them
    all, happy-eyeballs style), but only those the hop's policy allows (``current_hop``). A host none
    of whose addresses is allowed raises GuardRefusal, and nothing is connected.

    A host's addresses, and the verdicts on them, are kept for ``ttl`` seconds: checking a host seen
    before is a dictionary lookup."""

    def __init__(self, lookup: Lookup = system_lookup, ttl: float = 300.0, max_entries: int = 65536) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._max_entries = max_entries
        self._cache: dict[tuple[str, int], _Entry] = {}
        self._names: dict[str, tuple[str | None, IPAddress | None]] = {}  # what the name alone says
        self._unknown: dict[
            str, tuple[float, tuple[int | None, str | None]]
        ] = {}  # names DNS said do not exist
        self._unknown_ttl = min(ttl, 60.0)

    async def _entry(self, host: str, port: int) -> _Entry:
        now = time.monotonic()
        hit = self._cache.get((host, port))
        if hit is None or hit[0] <= now:
            unknown = self._unknown.get(host)
            if unknown is not None and unknown[0] > now:
                raise socket.gaierror(*unknown[1])
            try:
                found = await self._lookup(host, port)
            except socket.gaierror as err:
                # A name that does not exist is asked for once a minute, not once per URL: a dead
                # domain with thousands of URLs would otherwise hold the lookup threads.
                if err.errno != socket.EAI_AGAIN:
                    if len(self._unknown) >= self._max_entries:
                        self._unknown.clear()
                    self._unknown[host] = (now + self._unknown_ttl, (err.errno, err.strerror))
                raise
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            hit = (now + self._ttl, found, {})
            self._cache[(host, port)] = hit
        return hit

    async def _verdict(self, host: str, port: int, policy: AddressPolicy, private_ok: bool) -> _Verdict:
        _, found, verdicts = await self._entry(host, port)
        verdict = verdicts.get((policy, private_ok))
        if verdict is None:
            verdict = verdicts[(policy, private_ok)] = _judge(policy, found, private_ok)
        return verdict

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[ResolveResult]:
        hop = current_hop.get(None)
        if hop is None or host.lower() in hop.exempt:  # a proxy: the user's choice, whatever its address
            kept = (await self._entry(host, port))[1]
        else:
            verdict = await self._verdict(host, port, hop.policy, hop.private_ok)
            if not verdict.kept:
                raise _refusal(host, verdict)
            kept = verdict.kept
        return [
            {"hostname": host, "host": address, "port": port, "family": fam, "proto": 0, "flags": 0}
            for fam, address in kept
            if family in (socket.AF_UNSPEC, fam)
        ]

    async def check_hop(self, host: str, port: int, hop: Hop, proxied: bool, strict: bool) -> bool:
        """Check a hop before its request is sent; returns whether it goes to a public address.

        The connector checks again at connect time (``resolve``); this check also covers IP literals
        (which aiohttp connects without asking a resolver) and a kept-alive connection that would be
        reused. ``strict`` (redirect hops): every address of the host must pass, so a connection kept
        from an earlier hop to one of them cannot be reused where it is refused. Behind a proxy, the
        proxy resolves names: the names and literals are checked here, the proxy's rules do the rest.
        """
        named = self._names.get(host)
        if named is None:
            if len(self._names) >= self._max_entries:
                self._names.clear()
            named = self._names[host] = (name_refusal(host), literal(host))
        rule, address = named
        if rule is not None:
            raise GuardRefusal(f"address guard: {host} refused ({rule})")
        if address is not None:
            rule = hop.policy.refusal(address, hop.private_ok)
            if rule is not None:
                raise GuardRefusal(f"address guard: {address} refused ({rule})")
            return hop.policy.is_public(address)
        if proxied:
            return True  # unknown: count it as public
        verdict = await self._verdict(host, port, hop.policy, hop.private_ok)
        if not verdict.kept or (strict and verdict.refused):
            raise _refusal(host, verdict)
        return verdict.public

    async def close(self) -> None:
        self._cache.clear()
        self._unknown.clear()


def _refusal(host: str, verdict: _Verdict) -> GuardRefusal:
    return GuardRefusal(f"address guard: {host} refused ({'; '.join(verdict.refused) or 'no address'})")
