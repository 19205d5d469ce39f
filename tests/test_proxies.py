"""Proxies, for real: Debian's squid on 127.0.0.1, with names only it can resolve (its own hosts
file), its access log proving what went through it. HTTP_PROXY, HTTPS_PROXY (CONNECT), NO_PROXY and
their lowercase forms as urllib reads them, and the ``proxy`` option."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from imageserver import ImageServer
from realservers import Squid
from test_fetch import JPEG, https_url  # noqa: F401 - the https server fixture
from test_guard import connects, names

from img2ds_dagster.engine.fetch import Fetcher, FetchResult
from img2ds_dagster.engine.settings import FetchSettings

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY")
ONLY_PROXY = "images.only-proxy.test"  # no DNS of this machine knows it: only squid's hosts file


@pytest.fixture(scope="module")
def squid() -> Iterator[Squid]:
    with Squid({ONLY_PROXY: "127.0.0.1", "public.only-proxy.test": "127.0.0.1"}) as proxy:
        yield proxy


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The proxy variables, all unset to begin with."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fetch(url: str, **settings: Any) -> FetchResult:
    # Made after the test set the environment: a Fetcher reads the proxy variables once. Names the
    # machine would look up are not known here (no DNS query leaves the machine).
    fetcher = Fetcher(
        FetchSettings(**{"timeout": 5.0, **settings}), lookup=names({"localhost": ["127.0.0.1"]}, False)
    )
    try:
        return fetcher.fetch(url)
    finally:
        fetcher.close()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_http_proxy_carries_the_downloads(
    server: ImageServer, squid: Squid, env: pytest.MonkeyPatch, variable: str
) -> None:
    env.setenv(variable, squid.url())
    url = f"http://{ONLY_PROXY}:{server.port}/gen/16x16.jpg?via={variable}"
    with connects() as tried:
        result = fetch(url)
    assert result.error is None
    assert result.data == server.assets.generated(16, 16, ".jpg", False, False)
    assert f"GET {url}" in squid.requests(wait_for=1)
    assert set(tried) == {"127.0.0.1"}  # squid's address: nothing else was connected by us


@pytest.mark.parametrize("variable", ["NO_PROXY", "no_proxy"])
def test_no_proxy_goes_direct(
    server: ImageServer, squid: Squid, env: pytest.MonkeyPatch, variable: str
) -> None:
    env.setenv("HTTP_PROXY", squid.url())
    env.setenv(variable, f"{ONLY_PROXY},127.0.0.1")
    direct = fetch(server.url(f"/gen/16x16.jpg?via={variable}"))
    assert direct.error is None
    bypassed = fetch(f"http://{ONLY_PROXY}:{server.port}/gen/16x16.jpg?via={variable}")
    assert bypassed.error is not None
    assert bypassed.error.startswith("cannot resolve host")  # this machine cannot: it went direct
    assert not [r for r in squid.requests() if f"via={variable}" in r]


def test_the_proxy_option_needs_no_environment(
    server: ImageServer, squid: Squid, env: pytest.MonkeyPatch
) -> None:
    url = f"http://{ONLY_PROXY}:{server.port}/gen/16x16.jpg?via=option"
    result = fetch(url, proxy=squid.url().rstrip("/"))
    assert result.error is None
    assert f"GET {url}" in squid.requests(wait_for=1)


def test_https_goes_through_a_connect_tunnel(https_url: str, squid: Squid, env: pytest.MonkeyPatch) -> None:  # noqa: F811
    env.setenv("HTTPS_PROXY", squid.url())
    port = https_url.split(":")[2].split("/", maxsplit=1)[0]
    url = f"https://{ONLY_PROXY}:{port}/image.jpg"
    assert fetch(url, ignore_ssl_certificate=True) == FetchResult(JPEG, None)
    assert f"CONNECT {ONLY_PROXY}:{port}" in squid.requests(wait_for=1)


def test_a_redirect_from_a_public_hop_to_a_private_address_is_refused(
    server: ImageServer, squid: Squid, env: pytest.MonkeyPatch
) -> None:
    # The first hop goes through the proxy, so its address is not known here: it counts as public.
    env.setenv("HTTP_PROXY", squid.url())
    env.setenv("NO_PROXY", "127.0.0.1")
    private = server.url("/gen/16x16.jpg?via=redirect")
    url = f"http://public.only-proxy.test:{server.port}/redirect-to?url={quote(private, safe='')}"
    with connects() as tried:
        refused = fetch(url)
    assert refused.error == (
        "address guard: 127.0.0.1 refused (a loopback address reached by a redirect from a public one)"
    )
    assert server.hits["/gen/16x16.jpg?via=redirect"] == 0
    assert tried == ["127.0.0.1"]  # squid, once
    assert fetch(url, allowed_networks=("127.0.0.0/8",)).error is None  # unless allowed
