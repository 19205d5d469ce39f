"""The address guard on real sockets: every spelling of a refused address, redirects into them, names
that resolve to them, and the options. An audit hook records every ``connect`` this process makes,
which is what proves that a refused address is never even tried."""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import pytest
from imageserver import ImageServer

from img2ds_dagster.engine.fetch import Fetcher, FetchResult
from img2ds_dagster.engine.guard import Addresses, AddressPolicy, system_lookup
from img2ds_dagster.engine.settings import FetchSettings
from img2ds_dagster.errors import ConfigError

_CONNECTS: list[Any] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect":
        _CONNECTS.append(args[1])


sys.addaudithook(_audit)  # for the rest of the session: hooks cannot be removed, this one only appends


@contextmanager
def connects() -> Iterator[list[str]]:
    """The addresses connected to (or tried) inside the block, by this process."""
    start = len(_CONNECTS)
    found: list[str] = []
    yield found
    found.extend(str(address[0]) for address in _CONNECTS[start:] if isinstance(address, tuple))


def names(mapping: dict[str, Sequence[str]], others: bool = True) -> Any:
    """A lookup that gives these names these addresses (in this order), and asks the system for the
    rest (numeric forms, localhost), or with ``others=False`` knows no other name, so that no DNS
    query is ever sent: the test's own DNS, with nothing of the machine's edited."""

    async def lookup(host: str, port: int) -> Addresses:
        if host in mapping:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in mapping[host]]
        if not others:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await system_lookup(host, port)

    return lookup


def fetch(url: str, mapping: dict[str, Sequence[str]] | None = None, **settings: Any) -> FetchResult:
    fetcher = Fetcher(FetchSettings(**{"timeout": 3.0, **settings}), lookup=names(mapping or {}))
    try:
        return fetcher.fetch(url)
    finally:
        fetcher.close()


REFUSED = [
    # (address, what the rule says)
    ("169.254.169.254", "a cloud metadata address"),
    ("169.254.1.1", "a link-local address"),
    ("fe80::1", "a link-local address"),
    ("fd00:ec2::254", "a cloud metadata address"),
    ("100.100.100.200", "a cloud metadata address"),
    ("0.0.0.0", "the unspecified address"),
    ("::", "the unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("240.0.0.1", "a reserved address"),
    ("::a9fe:a9fe", "a reserved address"),  # IPv4-compatible
    ("::ffff:169.254.169.254", "a cloud metadata address (as 169.254.169.254)"),
    ("2002:a9fe:a9fe::1", "a cloud metadata address (as 169.254.169.254)"),  # 6to4
    ("64:ff9b::a9fe:a9fe", "a cloud metadata address (as 169.254.169.254)"),  # NAT64
]
PRIVATE = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "::1", "fc00::1", "::ffff:127.0.0.1"]


@pytest.mark.parametrize(("address", "rule"), REFUSED)
def test_these_are_refused_whatever_the_hop(address: str, rule: str) -> None:
    policy = AddressPolicy()
    for private_ok in (True, False):
        assert policy.refusal(ipaddress.ip_address(address), private_ok) == rule


@pytest.mark.parametrize("address", PRIVATE)
def test_private_addresses_are_refused_only_after_a_public_hop(address: str) -> None:
    policy = AddressPolicy()
    assert policy.refusal(ipaddress.ip_address(address), private_ok=True) is None
    rule = policy.refusal(ipaddress.ip_address(address), private_ok=False)
    assert rule is not None
    assert "reached by a redirect from a public one" in rule
    assert policy.refusal(ipaddress.ip_address("93.184.216.34"), private_ok=False) is None


def test_the_options_exempt_and_add_networks() -> None:
    policy = AddressPolicy.from_options(["10.0.0.0/8", "169.254.7.0/24"], ["10.9.0.0/16", "93.184.216.0/24"])
    assert policy.refusal(ipaddress.ip_address("10.1.2.3"), private_ok=False) is None
    assert policy.refusal(ipaddress.ip_address("169.254.7.7"), private_ok=True) is None
    assert policy.refusal(ipaddress.ip_address("10.9.0.1"), True) == "in blocked_networks (10.9.0.0/16)"
    assert policy.refusal(ipaddress.ip_address("::ffff:93.184.216.34"), True) == (
        "in blocked_networks (93.184.216.0/24)"
    )
    with pytest.raises(ConfigError, match=r"^allowed_networks: .*'10.0.0.300/8'"):
        AddressPolicy.from_options(["10.0.0.300/8"], [])
    with pytest.raises(ConfigError, match=r"^blocked_networks"):
        FetchSettings(blocked_networks=("not a network",))


# Every spelling a URL can carry of an address that is always refused (and names that stand for one).
SPELLINGS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://2852039166/latest/meta-data/",  # decimal
    "http://0251.0376.0251.0376/",  # octal
    "http://0xa9fea9fe/",  # hex
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://169.254.43518/",  # a.b.c: the last part 16 bits
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[fd00:ec2::254]/latest/",
    "http://[fe80::1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://METADATA.Google.Internal./",
    "http://0.0.0.0:{port}/gen/8x8.jpg",  # Linux connects 0.0.0.0 to the local machine
    "http://[::]:{port}/gen/8x8.jpg",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "http://rebinding.test/",  # a name whose DNS answer is the metadata address
]


@pytest.mark.parametrize("url", SPELLINGS)
def test_every_spelling_is_refused_before_any_connection(server: ImageServer, url: str) -> None:
    with connects() as tried:
        result = fetch(url.format(port=server.port), {"rebinding.test": ["169.254.169.254"]})
    assert result.data is None
    assert result.error is not None
    assert result.error.startswith("address guard: "), result.error
    assert tried == []


@pytest.mark.parametrize("url", SPELLINGS)
def test_a_redirect_into_a_refused_address_is_not_followed(server: ImageServer, url: str) -> None:
    start = server.url(f"/redirect-to?url={quote(url.format(port=server.port), safe='')}")
    with connects() as tried:
        result = fetch(start, {"rebinding.test": ["169.254.169.254"]})
    assert result.error is not None
    assert result.error.startswith("address guard: "), result.error
    assert set(tried) == {"127.0.0.1"}  # the server that redirected, nothing else


def test_a_name_with_a_refused_address_and_an_allowed_one_gets_the_allowed_one(server: ImageServer) -> None:
    url = f"http://mixed.test:{server.port}/gen/16x16.jpg"
    with connects() as tried:
        result = fetch(url, {"mixed.test": ["169.254.169.254", "127.0.0.1"]})
    assert result.error is None
    assert set(tried) == {"127.0.0.1"}


def test_blocked_networks_refuse_the_input_tables_own_server(server: ImageServer) -> None:
    with connects() as tried:
        result = fetch(server.url("/gen/16x16.jpg"), blocked_networks=("127.0.0.0/8",))
    assert result.error == "address guard: 127.0.0.1 refused (in blocked_networks (127.0.0.0/8))"
    assert tried == []


def test_a_redirect_between_private_addresses_is_followed(server: ImageServer) -> None:
    # The input table points at a private server, which redirects to another private name.
    target = f"http://intranet.test:{server.port}/gen/16x16.jpg"
    result = fetch(server.url(f"/redirect-to?url={quote(target, safe='')}"), {"intranet.test": ["127.0.0.1"]})
    assert result.error is None
