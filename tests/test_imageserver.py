"""Self-test of the misbehaving test server in ``tests/imageserver.py``.

The downloader's tests rely on each route misbehaving in exactly the advertised way, so this checks
the routes with plain ``http.client`` (no redirects followed, no retries, no decoding) and raw
sockets where even ``http.client`` would be too forgiving.
"""

from __future__ import annotations

import http.client
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest

# tests/ is not a package: pytest's default rootdir-relative import puts it on sys.path.
from imageserver import HUGE_LENGTH, SAMPLES_DIR, ImageServer


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


def fetch(
    srv: ImageServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, Message, bytes]:
    """One request on a fresh connection; returns status, headers and the whole body."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        with conn.getresponse() as resp:
            return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def decode(body: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None, "body does not decode as an image"
    return img


def sof_dimensions(jpeg: bytes) -> tuple[int, int]:
    """(width, height) from the first SOFn segment, found by walking the markers."""
    pos = 2
    while True:
        marker = jpeg[pos + 1]
        (length,) = struct.unpack(">H", jpeg[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", jpeg[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length


def test_samples_are_served_with_content_type(server: ImageServer) -> None:
    expected = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
    files = [p for p in sorted(SAMPLES_DIR.iterdir()) if p.suffix in expected]
    assert len(files) >= 8
    for path in files:
        status, headers, body = fetch(server, f"/samples/{path.name}")
        assert status == 200
        assert headers["Content-Type"] == expected[path.suffix]
        assert body == path.read_bytes()
    assert fetch(server, "/samples/../imageserver.py")[0] == 404


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
@pytest.mark.parametrize(("width", "height"), [(100, 100), (640, 360), (37, 501)])
def test_gen_exact_size(server: ImageServer, ext: str, width: int, height: int) -> None:
    status, headers, body = fetch(server, f"/gen/{width}x{height}.{ext}")
    assert status == 200
    assert headers["Content-Type"] == {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}[ext]
    img = decode(body)
    assert img.shape == (height, width, 3)
    assert img.std() > 5  # a photo, not a flat fill


@pytest.mark.parametrize("ext", ["png", "webp"])
def test_gen_alpha_and_gray(server: ImageServer, ext: str) -> None:
    rgba = decode(fetch(server, f"/gen/120x80.{ext}?alpha=1")[2])
    assert rgba.shape == (80, 120, 4)
    alpha = rgba[..., 3]
    assert alpha.min() < 10
    assert alpha.max() > 245
    assert len(np.unique(alpha)) > 20  # a soft ramp, not a binary mask
    gray = decode(fetch(server, f"/gen/120x80.{ext}?gray=1")[2])
    if ext == "png":
        assert gray.shape == (80, 120)
    else:
        # libwebp has no grayscale mode: the pixels are gray but come back as three equal planes.
        assert gray.shape[:2] == (80, 120)
        assert np.abs(gray.astype(int) - gray[..., :1]).max() <= 3
    assert fetch(server, "/gen/64x64.jpg?gray=1")[2][:2] == b"\xff\xd8"
    assert decode(fetch(server, "/gen/64x64.jpg?gray=1")[2]).shape == (64, 64)


def test_gen_is_deterministic_and_ignores_unknown_query(server: ImageServer) -> None:
    first = fetch(server, "/gen/200x150.jpg")[2]
    assert fetch(server, "/gen/200x150.jpg?i=7")[2] == first


@pytest.mark.parametrize("code", [403, 404, 410, 500, 503])
def test_status(server: ImageServer, code: int) -> None:
    status, headers, body = fetch(server, f"/status/{code}")
    assert status == code
    assert int(headers["Content-Length"]) == len(body)


def test_html_soft_404(server: ImageServer) -> None:
    status, headers, body = fetch(server, "/html")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<html" in body


def test_truncated_jpeg(server: ImageServer) -> None:
    status, headers, body = fetch(server, "/truncated.jpg")
    full = fetch(server, "/echo-ua.jpg")[2]
    assert status == 200
    assert int(headers["Content-Length"]) == len(body) == len(full) * 6 // 10
    assert full.startswith(body)
    assert not body.endswith(b"\xff\xd9")


@pytest.mark.parametrize("directive", ["noai", "noimageai", "noindex", "otherbot: noai", "none"])
def test_robots_header(server: ImageServer, directive: str) -> None:
    status, headers, body = fetch(server, f"/robots/{quote(directive)}.jpg")
    assert status == 200
    assert headers.get_all("X-Robots-Tag") == [directive]
    assert decode(body).ndim == 3


def test_robots_multi(server: ImageServer) -> None:
    _, headers, _ = fetch(server, "/robots-multi.jpg")
    assert headers.get_all("X-Robots-Tag") == ["img2dataset: noai", "index"]


def test_slow_body_drips(server: ImageServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=0.5)
    try:
        conn.request("GET", "/slow.jpg")
        with conn.getresponse() as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) > 1000
            # Each byte arrives well within a 0.5 s read timeout, yet 1 s yields only a handful.
            got = b""
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                got += resp.read(1)
            assert 2 <= len(got) < 10
            assert got.startswith(b"\xff\xd8")
    finally:
        conn.close()


def test_slow_headers_drip(server: ImageServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=0.5) as sock:
        sock.sendall(b"GET /slow-headers.jpg HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            got += sock.recv(100)
        assert 2 <= len(got) < 10
        assert b"HTTP/1.1 200".startswith(got[:12])


def test_redirect_chain(server: ImageServer) -> None:
    path = "/redirect/2/gen/100x100.jpg?i=1"
    status, headers, _ = fetch(server, path)
    assert status == 302
    assert headers["Location"] == server.url("/redirect/1/gen/100x100.jpg?i=1")
    status, headers, _ = fetch(server, "/redirect/1/gen/100x100.jpg?i=1")
    assert headers["Location"] == server.url("/gen/100x100.jpg?i=1")
    # urllib follows the whole chain to the image.
    with urllib.request.urlopen(server.url(path), timeout=5) as resp:
        assert decode(resp.read()).shape == (100, 100, 3)
    assert server.hits["/gen/100x100.jpg?i=1"] == 1
    status, headers, _ = fetch(server, "/redirect-relative/1/html")
    assert (status, headers["Location"]) == (302, "/html")


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/x.jpg", "file:///etc/passwd"])
def test_redirect_to(server: ImageServer, target: str) -> None:
    status, headers, _ = fetch(server, f"/redirect-to?url={quote(target, safe='')}")
    assert (status, headers["Location"]) == (302, target)


def test_bomb_claims_huge_dimensions(server: ImageServer) -> None:
    status, _, body = fetch(server, "/bomb.jpg")
    assert status == 200
    assert 200 < len(body) < 1000
    assert body[:2] == b"\xff\xd8"
    assert body[-2:] == b"\xff\xd9"
    assert sof_dimensions(body) == (30000, 30000)  # never decoded here: that is the point


def test_huge_announces_10_gib(server: ImageServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", "/huge")
        with conn.getresponse() as resp:
            assert int(resp.headers["Content-Length"]) == HUGE_LENGTH == 10 * 1024**3
            assert resp.read(1 << 20) == b"\x00" * (1 << 20)
    finally:
        conn.close()


def test_huge_chunked_streams_without_length(server: ImageServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", "/huge-chunked")
        with conn.getresponse() as resp:
            assert resp.headers["Content-Length"] is None
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert len(resp.read(300_000)) == 300_000
    finally:
        conn.close()


def test_echo_user_agent(server: ImageServer) -> None:
    status, headers, body = fetch(server, "/echo-ua.jpg", headers={"User-Agent": "img2ds-test/9.9"})
    assert status == 200
    assert server.last_user_agent == "img2ds-test/9.9"
    assert headers["X-Echo-User-Agent"] == "img2ds-test/9.9"
    assert decode(body).ndim == 3


def test_flaky_then_ok_and_hits(server: ImageServer) -> None:
    path = "/flaky/2/gen/50x40.png"
    assert [fetch(server, path)[0] for _ in range(4)] == [503, 503, 200, 200]
    # A different query string is a different URL with its own failure budget.
    assert fetch(server, "/flaky/2/gen/50x40.png?other=1")[0] == 503
    assert fetch(server, "/flaky/1/status/404?x=2")[0] == 503
    assert fetch(server, "/flaky/1/status/404?x=2")[0] == 404
    assert server.hits[path] == 4
    assert server.hits["/never-requested"] == 0


def test_close_early(server: ImageServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", "/close-early.jpg")
        with conn.getresponse() as resp:
            announced = int(resp.headers["Content-Length"])
            with pytest.raises(http.client.IncompleteRead) as excinfo:
                resp.read()
            assert len(excinfo.value.partial) == announced // 2
    finally:
        conn.close()


def test_keep_alive_reuses_connection(server: ImageServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", "/gen/10x10.jpg")
        with conn.getresponse() as resp:
            resp.read()
        sock = conn.sock
        conn.request("HEAD", "/status/404")
        with conn.getresponse() as resp:
            assert resp.status == 404
            assert resp.read() == b""
        conn.request("GET", "/html")
        with conn.getresponse() as resp:
            assert resp.status == 200
            assert resp.read()
        assert conn.sock is sock is not None
    finally:
        conn.close()


def test_stop_is_prompt_with_slow_client_attached() -> None:
    srv = ImageServer()
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    idle = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        idle.request("GET", "/gen/10x10.jpg")  # leaves an idle keep-alive connection open
        with idle.getresponse() as resp:
            resp.read()
        conn.request("GET", "/slow.jpg")
        with conn.getresponse() as resp:
            assert resp.read(1) == b"\xff"
            start = time.monotonic()
            srv.stop()
            assert time.monotonic() - start < 2.0
            # The dripping handler gave up: the client sees the stream end, not a hang.
            with pytest.raises((http.client.IncompleteRead, ConnectionError)):
                resp.read()
    finally:
        conn.close()
        idle.close()
        srv.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection((srv.host, srv.port), timeout=1):
        pass


def test_url_helper(server: ImageServer) -> None:
    assert server.url("/x.jpg") == f"http://127.0.0.1:{server.port}/x.jpg"
    with pytest.raises(ValueError, match="start with"):
        server.url("x.jpg")


def test_samples_folder_is_small() -> None:
    total = sum(p.stat().st_size for p in Path(SAMPLES_DIR).iterdir())
    assert total < 700 * 1024
