"""The HTTP client against real web servers, not only our own test server: Debian's nginx and
apache2 on 127.0.0.1, for the framings, encodings, redirects and keep-alive limits of the wild."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from imageserver import ImageServer
from realservers import Apache, Nginx

from img2ds_dagster.engine.fetch import Fetcher
from img2ds_dagster.engine.settings import FetchSettings

NAMES = [f"photo{i}.jpg" for i in range(8)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, server: ImageServer) -> tuple[Path, dict[str, bytes]]:
    """A folder of real JPEGs, each over 64 KiB (so that compressed bodies are streamed)."""
    root = tmp_path_factory.mktemp("site")
    files = {}
    for i, name in enumerate(NAMES):
        files[name] = server.assets.generated(900 + i, 700, ".jpg", False, False)
        (root / name).write_bytes(files[name])
    return root, files


@pytest.fixture(scope="module")
def nginx(site: tuple[Path, dict[str, bytes]]) -> Iterator[Nginx]:
    with Nginx(site[0]) as srv:
        yield srv


@pytest.fixture(scope="module")
def apache(site: tuple[Path, dict[str, bytes]]) -> Iterator[Apache]:
    with Apache(site[0]) as srv:
        yield srv


# (server, path prefix, what the server does there)
CASES = [
    ("nginx", "", "Content-Length, keep-alive"),
    ("nginx", "chunked/", "Transfer-Encoding: chunked"),
    ("nginx", "gzip/", "gzip, no length: the body ends when the connection closes"),
    ("nginx", "r307/", "307 to the file"),
    ("nginx", "r308/", "308 to the file"),
    ("nginx", "relative/", "302 with a relative Location"),
    ("apache", "", "Content-Length, keep-alive"),
    ("apache", "http10/", "an HTTP/1.0 response"),
    ("apache", "close/", "HTTP/1.0, no length: the body ends when the connection closes"),
    ("apache", "chunked/", "Transfer-Encoding: chunked"),
    ("apache", "gzip/", "gzip, chunked"),
    ("apache", "r307/", "307 to the file"),
    ("apache", "r308/", "308 to the file"),
]


@pytest.mark.parametrize(("which", "prefix", "what"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_real_servers_bodies_arrive_whole(
    request: pytest.FixtureRequest, site: tuple[Path, dict[str, bytes]], which: str, prefix: str, what: str
) -> None:
    srv = request.getfixturevalue(which)
    fetcher = Fetcher(FetchSettings(timeout=5.0))
    try:
        result = fetcher.fetch(srv.url(f"{prefix}{NAMES[0]}"))
    finally:
        fetcher.close()
    assert result.error is None, what
    assert result.data == site[1][NAMES[0]], what


@pytest.mark.parametrize("which", ["nginx", "apache"])
def test_a_server_that_closes_after_three_requests_costs_nothing(
    request: pytest.FixtureRequest, site: tuple[Path, dict[str, bytes]], which: str
) -> None:
    srv = request.getfixturevalue(which)
    before = len(srv.entries())
    fetcher = Fetcher(FetchSettings(timeout=5.0, respect_robots_txt=False))  # its request would count
    try:
        results = [fetcher.fetch(srv.url(f"{name}?keepalive={which}")) for name in NAMES]
    finally:
        fetcher.close()
    assert [r.data for r in results] == [site[1][name] for name in NAMES]
    mine = [e for e in srv.entries(wait_for=before + len(NAMES))[before:] if "keepalive=" in e.request]
    per_connection = Counter(e.connection for e in mine)
    # One request after another on the same connection until the server ends it after its third.
    assert sum(per_connection.values()) == len(NAMES)
    assert max(per_connection.values()) == 3
    assert len(per_connection) >= 3
