"""The HTTP client against the world outside the lab, on this machine: hosts with several addresses
(IPv6 and IPv4), compressed bodies, 429 and 503 with Retry-After, backoff, and the waits in a
shard's stats."""

from __future__ import annotations

import email.utils
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from imageserver import ImageServer
from test_guard import connects, names

from img2ds_dagster.engine.fetch import Fetcher, FetchResult, retry_after_seconds
from img2ds_dagster.engine.settings import FetchSettings

JPEG_90x60 = ("/gen/90x60.jpg", (90, 60))


def fetch(url: str, mapping: dict[str, list[str]] | None = None, **settings: Any) -> FetchResult:
    fetcher = Fetcher(FetchSettings(**{"timeout": 5.0, **settings}), lookup=names(mapping or {}))
    try:
        return fetcher.fetch(url)
    finally:
        fetcher.close()


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture(scope="module")
def v6_only(server: ImageServer) -> Iterator[tuple[int, bytes]]:
    """A server listening on [::1] only, serving one JPEG; its port, and the bytes."""
    body = server.assets.generated(40, 30, ".jpg", False, False)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = _V6Server(("::1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield int(httpd.server_address[1]), body
    httpd.shutdown()
    httpd.server_close()


# --- every address tried -----------------------------------------------------------------------------


def test_a_host_whose_first_address_does_not_answer_is_reached_on_the_next(server: ImageServer) -> None:
    # As `localhost` resolves when /etc/hosts lists ::1 first, with the server on 127.0.0.1 only.
    url = f"http://dual.test:{server.port}/gen/16x16.jpg"
    with connects() as tried:
        result = fetch(url, {"dual.test": ["::1", "127.0.0.1"]})
    assert result.error is None
    assert tried == ["::1", "127.0.0.1"]


def test_a_server_on_ipv6_only_is_reached(v6_only: tuple[int, bytes]) -> None:
    port, body = v6_only
    assert fetch(f"http://dual.test:{port}/a.jpg", {"dual.test": ["127.0.0.1", "::1"]}).data == body
    assert fetch(f"http://[::1]:{port}/a.jpg").data == body


def test_the_error_names_every_address_tried() -> None:
    port = _free_port()
    result = fetch(
        f"http://dual.test:{port}/a.jpg", {"dual.test": ["::1", "127.0.0.1"]}, respect_robots_txt=False
    )
    assert result.error == f"connection refused (tried ::1 port {port}, 127.0.0.1 port {port})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- content encodings -------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "?deflate=1"])
def test_a_compressed_body_is_decoded_though_identity_was_asked_for(server: ImageServer, query: str) -> None:
    result = fetch(server.url(f"/gzip/gen/90x60.jpg{query}"))
    assert result.error is None
    assert result.data == server.assets.generated(90, 60, ".jpg", False, False)


def test_a_compression_bomb_is_refused_at_its_decoded_size(server: ImageServer) -> None:
    # 200 MiB of zeros in about 200 KiB: the cap applies to the decoded bytes, which stop at the cap.
    result = fetch(server.url("/gzip-bomb/200"), max_download_bytes=10_000_000)
    assert result.error == "body is over the 10000000-byte limit"


# --- Retry-After and backoff ----------------------------------------------------------------------------


def test_retry_after_seconds_and_dates() -> None:
    now = time.time()
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_that_fits_is_waited_for(server: ImageServer, status: int) -> None:
    path = f"/retry-after/1/1/gen/16x16.jpg?status={status}&case=fits"
    started = time.monotonic()
    result = fetch(server.url(path), retries=1, timeout=3.0)
    assert result.error is None
    assert (result.waits, result.waited) == (1, 1.0)
    assert time.monotonic() - started >= 1.0
    assert server.hits[path] == 2


def test_a_retry_after_as_an_http_date_is_waited_for(server: ImageServer) -> None:
    when = quote(email.utils.formatdate(time.time() + 2, usegmt=True), safe="")
    result = fetch(server.url(f"/retry-after/1/{when}/gen/16x16.jpg?case=date"), retries=1, timeout=4.0)
    assert result.error is None
    assert result.waits == 1
    assert 0.5 < result.waited <= 2.0


def test_a_retry_after_longer_than_the_time_left_fails_at_once_saying_why(server: ImageServer) -> None:
    path = "/retry-after/1/120/gen/16x16.jpg?case=too-long"
    started = time.monotonic()
    result = fetch(server.url(path), retries=1, timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert result.error is not None
    assert result.error.startswith("HTTP Error 429: Too Many Requests (Retry-After 120 s, more than the ")
    assert result.error.endswith(" s left)")
    assert server.hits[path] == 1


def test_without_retries_a_429_fails_with_img2datasets_message(server: ImageServer) -> None:
    result = fetch(server.url("/retry-after/1/1/gen/16x16.jpg?case=no-retries"))
    assert (result.error, result.waits) == ("HTTP Error 429: Too Many Requests", 0)


def test_other_transient_failures_back_off_with_jitter(server: ImageServer) -> None:
    # A 500 is this sample's failure, not the host asking to slow down: its own exponential backoff,
    # at most 0.5 s then 1 s here.
    path = "/retry-after/2/soon/gen/16x16.jpg?status=500&case=backoff"
    result = fetch(server.url(path), retries=2)
    assert result.error is None
    assert result.waits == 2
    assert 0 <= result.waited <= 1.5
    assert server.hits[path] == 3


def test_a_name_that_does_not_exist_is_looked_up_once_not_once_per_url() -> None:
    asked: list[str] = []

    async def lookup(host: str, port: int) -> list[tuple[int, str]]:
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    fetcher = Fetcher(FetchSettings(timeout=2.0), lookup=lookup)
    try:
        errors = [fetcher.fetch(f"http://gone.test/{i}.jpg").error for i in range(5)]
    finally:
        fetcher.close()
    assert errors == ["cannot resolve host: Name or service not known"] * 5
    assert asked == ["gone.test"]
