"""The fetcher against a real loopback server: deadlines, caps, redirects, opt-outs, retries."""

from __future__ import annotations

import asyncio
import http.server
import importlib.metadata
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import cv2
import numpy as np
import pytest
from imageserver import ImageServer
from multidict import CIMultiDict

from img2ds_dagster.engine.fetch import Fetcher, is_disallowed
from img2ds_dagster.engine.settings import FetchSettings


def fetch(url: str, **settings: object) -> tuple[bytes | None, str | None]:
    fetcher = Fetcher(FetchSettings(**settings))  # type: ignore[arg-type]
    try:
        result = fetcher.fetch(url)
    finally:
        fetcher.close()
    return result.data, result.error


def test_downloads_an_image(server: ImageServer) -> None:
    data, error = fetch(server.url("/gen/64x48.jpg"))
    assert error is None
    assert data is not None
    assert data[:2] == b"\xff\xd8"


def test_http_errors_use_urllib_wording(server: ImageServer) -> None:
    assert fetch(server.url("/status/404")) == (None, "HTTP Error 404: Not Found")


@pytest.mark.parametrize("path", ["/slow.jpg", "/slow-headers.jpg"])
def test_a_server_dripping_bytes_hits_the_total_deadline(server: ImageServer, path: str) -> None:
    # Each byte arrives well within any per-read timeout; only a total deadline stops this.
    started = time.monotonic()
    data, error = fetch(server.url(path), timeout=1.0)
    elapsed = time.monotonic() - started
    assert (data, error) == (None, "timed out")
    assert 0.9 < elapsed < 2.0


def test_declared_body_over_the_cap_is_not_downloaded(server: ImageServer) -> None:
    started = time.monotonic()
    data, error = fetch(server.url("/huge"), max_download_bytes=1_000_000)
    assert data is None
    assert error == "body of 10737418240 bytes is over the 1000000-byte limit"
    assert time.monotonic() - started < 1.0


def test_chunked_body_over_the_cap_stops_at_the_cap(server: ImageServer) -> None:
    data, error = fetch(server.url("/huge-chunked"), max_download_bytes=300_000)
    assert data is None
    assert error == "body is over the 300000-byte limit"


def test_short_body_is_an_error(server: ImageServer) -> None:
    assert fetch(server.url("/close-early.jpg")) == (None, "connection closed before the whole body arrived")


def test_redirects_are_followed_up_to_the_limit(server: ImageServer) -> None:
    data, error = fetch(server.url("/redirect/3/gen/20x10.jpg"))
    assert error is None
    assert data is not None
    assert fetch(server.url("/redirect/3/gen/20x10.jpg"), max_redirects=2) == (
        None,
        "too many redirects (more than 2)",
    )


@pytest.mark.parametrize(
    ("target", "scheme"), [("ftp://127.0.0.1/x.jpg", "ftp"), ("file:///etc/passwd", "file")]
)
def test_redirects_to_other_schemes_are_refused(server: ImageServer, target: str, scheme: str) -> None:
    data, error = fetch(server.url(f"/redirect-to?url={quote(target, safe='')}"))
    assert data is None
    assert error == f"redirect to a {scheme} URL refused: only http and https"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/a.jpg", "unsupported URL scheme 'ftp': only http and https"),
        ("file:///etc/passwd", "unsupported URL scheme 'file': only http and https"),
        ("not a url", "unsupported URL scheme '(none)': only http and https"),
        ("http:///no-host.jpg", "invalid URL: no host"),
        ("http://127.0.0.1:99999/a.jpg", "invalid URL: Port out of range 0-65535"),
    ],
)
def test_only_http_and_https_urls_are_fetched(url: str, message: str) -> None:
    assert fetch(url) == (None, message)


def test_refused_connection_is_an_error() -> None:
    # Port 1 on loopback: nothing listens there.
    refused = "connection refused (tried 127.0.0.1 port 1)"
    assert fetch("http://127.0.0.1:1/a.jpg", respect_robots_txt=False) == (None, refused)
    # robots.txt comes first, and its error is the sample's: RFC 9309 then disallows the whole host.
    assert fetch("http://127.0.0.1:1/a.jpg") == (
        None,
        f"{refused} (robots.txt unreachable: every path disallowed for this run)",
    )


@pytest.mark.parametrize(
    ("directive", "token", "disallowed"),
    [
        ("noai", None, True),
        ("noimageai", None, True),
        ("noindex", None, True),
        ("none", None, False),
        ("otherbot: noai", None, False),
        ("otherbot: noai", "otherbot", True),
    ],
)
def test_x_robots_tag_opt_outs(
    server: ImageServer, directive: str, token: str | None, disallowed: bool
) -> None:
    data, error = fetch(server.url(f"/robots/{quote(directive)}.jpg"), user_agent_token=token)
    if disallowed:
        assert (data, error) == (None, "Use of image disallowed by X-Robots-Tag directive")
    else:
        assert error is None
        assert data is not None


def test_opt_outs_can_be_ignored(server: ImageServer) -> None:
    data, error = fetch(server.url("/robots/noai.jpg"), disallowed_header_directives=())
    assert error is None
    assert data is not None


def test_x_robots_tag_rule_matches_img2dataset() -> None:
    headers = CIMultiDict([("X-Robots-Tag", "img2dataset: noai"), ("x-robots-tag", "index")])
    directives = frozenset({"noai"})
    assert is_disallowed(headers, "img2dataset", directives)
    assert not is_disallowed(headers, "otherbot", directives)
    assert not is_disallowed(headers, None, directives)


def test_the_user_agent_is_honest(server: ImageServer) -> None:
    version = importlib.metadata.version("img2ds_dagster")
    fetch(server.url("/echo-ua.jpg?ua=default"))
    assert server.last_user_agent == f"img2ds_dagster/{version}"
    fetch(server.url("/echo-ua.jpg?ua=token"), user_agent_token="MyCrawler", user_agent_contact="mailto:a@b")
    assert server.last_user_agent == f"img2ds_dagster/{version} (compatible; MyCrawler; +mailto:a@b)"
    fetch(server.url("/echo-ua.jpg?ua=whole"), user_agent="Mozilla/5.0 (X11) Firefox/72.0")
    assert server.last_user_agent == "Mozilla/5.0 (X11) Firefox/72.0"


def test_transient_failures_are_retried(server: ImageServer) -> None:
    path = "/flaky/2/gen/16x16.jpg?case=retried"
    data, error = fetch(server.url(path), retries=2)
    assert error is None
    assert data is not None
    assert server.hits[path] == 3


def test_permanent_failures_are_not_retried(server: ImageServer) -> None:
    path = "/status/404?case=not-retried"
    fetch(server.url(path), retries=3)
    assert server.hits[path] == 1


def test_without_retries_a_transient_failure_is_final(server: ImageServer) -> None:
    assert fetch(server.url("/flaky/1/gen/16x16.jpg?case=final")) == (
        None,
        "HTTP Error 503: Service Unavailable",
    )


def test_connections_are_reused_across_requests(server: ImageServer) -> None:
    fetcher = Fetcher(FetchSettings())
    try:
        before = server.connections
        for i in range(5):
            assert fetcher.fetch(server.url(f"/gen/8x8.jpg?reuse={i}")).error is None
        assert server.connections - before == 1
    finally:
        fetcher.close()


@pytest.mark.parametrize("framing", ["chunked", "until-close"])
def test_bodies_without_a_length_are_read_whole(server: ImageServer, framing: str) -> None:
    data, error = fetch(server.url(f"/{framing}/gen/90x60.jpg"))
    assert error is None
    assert data == server.assets.generated(90, 60, ".jpg", False, False)


def test_a_short_error_page_leaves_the_connection_usable(server: ImageServer) -> None:
    fetcher = Fetcher(FetchSettings())
    try:
        before = server.connections
        assert fetcher.fetch(server.url("/status/404?reuse=a")).error == "HTTP Error 404: Not Found"
        assert fetcher.fetch(server.url("/gen/8x8.jpg?reuse=b")).error is None
        assert server.connections - before == 1
    finally:
        fetcher.close()


def test_downloads_run_concurrently_on_one_fetcher(server: ImageServer) -> None:
    # Ten dripping responses at once: they share the event loop, so all ten time out together.
    fetcher = Fetcher(FetchSettings(timeout=1.0))

    async def ten() -> list[str | None]:
        results = await asyncio.gather(
            *(fetcher.fetch_async(server.url(f"/slow.jpg?n={i}")) for i in range(10))
        )
        return [r.error for r in results]

    try:
        started = time.monotonic()
        assert fetcher.run(ten()) == ["timed out"] * 10
        assert time.monotonic() - started < 3.0
    finally:
        fetcher.close()


def test_non_ascii_urls_are_percent_encoded(server: ImageServer) -> None:
    data, error = fetch(server.url("/gen/12x12.jpg?caption=café au lait"))
    assert error is None
    assert data is not None


@pytest.fixture(scope="module")
def https_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An https server on 127.0.0.1 with a self-signed certificate (made by the openssl command)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
    ]
    subprocess.run(
        [*request, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}/image.jpg"
    httpd.shutdown()
    httpd.server_close()


JPEG = bytes(cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1])


def test_self_signed_certificates_are_refused_unless_ignored(https_url: str) -> None:
    data, error = fetch(https_url)
    assert data is None
    assert error is not None
    assert "SSL error" in error
    assert "CERTIFICATE_VERIFY_FAILED" in error
    assert fetch(https_url, ignore_ssl_certificate=True) == (JPEG, None)
