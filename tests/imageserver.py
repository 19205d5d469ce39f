"""A real, deliberately misbehaving HTTP image server for the test suite.

The downloader is tested against actual sockets rather than mocks, because the failure modes that
matter (slow drips, truncated bodies, lying Content-Length, redirect loops, decompression bombs)
live in the transport and are exactly what mocks paper over. The server binds 127.0.0.1 on an
ephemeral port, runs in a daemon thread and speaks HTTP/1.1 with keep-alive.

Usage::

    with ImageServer() as server:
        url = server.url("/gen/640x480.jpg")
        ...
        assert server.hits["/gen/640x480.jpg"] == 1

Routes (GET and HEAD). Unknown query parameters are ignored everywhere, so ``?i=3`` makes a URL
unique without changing the response.

================================  ===============================================================
``/samples/<file>``               a file of ``img2ds_dagster/demo/samples`` with its Content-Type
``/gen/<W>x<H>.<jpg|png|webp>``   exactly WxH, cut from a real photo; ``?alpha=1`` 4 channels
                                  (png/webp) with a soft radial alpha, ``?gray=1`` 1 channel
``/status/<code>``                that status with a short text body
``/html``                         200 ``text/html`` soft-404 page
``/truncated.jpg``                first 60% of a real JPEG, Content-Length matching the truncation
``/robots/<directive>.jpg``       real JPEG + ``X-Robots-Tag: <directive>`` (percent-decoded)
``/robots-multi.jpg``             two headers: ``img2dataset: noai`` and ``index``
``/slow.jpg``                     headers at once, then the body at 1 byte / 0.2 s
``/slow-headers.jpg``             status line and headers themselves at 1 byte / 0.2 s
``/redirect/<n>/<rest>``          n absolute 302 hops, then ``/<rest>`` (query kept)
``/redirect-relative/<n>/<rest>`` same with relative ``Location`` headers
``/redirect-to?url=<url>``        one 302 to an arbitrary Location
``/bomb.jpg``                     a few hundred bytes of real JPEG whose SOF claims 30000x30000
``/huge``                         Content-Length 10 GiB, then zeros until the client goes away
``/huge-chunked``                 chunked, no Content-Length, zeros forever
``/echo-ua.jpg``                  real JPEG; stores the User-Agent in ``last_user_agent`` and
                                  echoes it in ``X-Echo-User-Agent``
``/flaky/<k>/<rest>``             503 for the first k requests to that exact URL, then ``/<rest>``
``/close-early.jpg``              Content-Length N, half the bytes, then the connection closes
``/chunked/<rest>``               ``/<rest>``'s body in 1000-byte chunks (with an extension and a
                                  trailer), ``Transfer-Encoding: chunked``
``/until-close/<rest>``           ``/<rest>``'s body with no length: it ends when the server closes
``/gzip/<rest>``                  ``/<rest>``'s body gzip-compressed, ``Content-Encoding: gzip``,
                                  sent whatever the request's Accept-Encoding (``?deflate=1``: zlib)
``/gzip-bomb/<MiB>``              that many MiB of zeros, gzip-compressed (about 1 KiB per MiB)
``/retry-after/<k>/<v>/<rest>``   429 with ``Retry-After: <v>`` (percent-decoded: seconds or an
                                  HTTP date) for the first k requests to that exact URL, then
                                  ``/<rest>``; ``?status=503`` for 503
================================  ===============================================================

``hits`` counts requests keyed by the request target exactly as sent (path plus query, the same
string passed to :meth:`ImageServer.url`); redirect hops count under their own paths.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.server
import re
import socket
import struct
import sys
import threading
import zlib
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import cv2
import numpy as np
import numpy.typing as npt

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "img2ds_dagster" / "demo" / "samples"
# The real photos the synthetic routes are cut from (see SOURCES.md next to them).
GEN_SOURCE = "rocket_1200x800.jpg"
PHOTO_JPEG = "chelsea_320x320.jpg"

DRIP_INTERVAL = 0.2  # seconds between bytes on the slow routes
HUGE_LENGTH = 10 * 1024**3  # 10 GiB announced by /huge
BOMB_SIDE = 30000
MAX_GEN_SIDE = 10000  # keeps a typo in a test from allocating gigabytes inside the server

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".md": "text/markdown; charset=utf-8",
}

SOFT_404_HTML = b"""<!DOCTYPE html>
<html><head><title>Page not found</title></head>
<body><h1>Oops!</h1><p>The image you are looking for has moved. Try our <a href="/">homepage</a>.</p>
</body></html>
"""

_GEN_RE = re.compile(r"^/gen/(\d+)x(\d+)\.(jpg|jpeg|png|webp)$")
_REDIRECT_RE = re.compile(r"^/redirect(-relative)?/(\d+)(/.*)$")
_FLAKY_RE = re.compile(r"^/flaky/(\d+)(/.*)$")
_REFRAMED_RE = re.compile(r"^/(chunked|until-close)(/.*)$")
_GZIP_RE = re.compile(r"^/gzip(/.*)$")
_GZIP_BOMB_RE = re.compile(r"^/gzip-bomb/(\d+)$")
_RETRY_AFTER_RE = re.compile(r"^/retry-after/(\d+)/([^/]+)(/.*)$")
_STATUS_RE = re.compile(r"^/status/(\d{3})$")
_ROBOTS_RE = re.compile(r"^/robots/(.+)\.jpg$")

# cv2's stubs type results as integer-or-float arrays; the uint8 is a runtime fact, not a static one.
Image = npt.NDArray[Any]


class Hits(Counter[str]):
    """Request counter: a :class:`collections.Counter` (missing keys read as 0) with locked writes.

    Handler threads increment concurrently; ``Counter.__iadd__`` on a key is a read-modify-write,
    so increments go through :meth:`increment`. Use :meth:`snapshot` to iterate while requests
    may still be in flight.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def increment(self, key: str) -> None:
        with self._lock:
            self[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self)

    def reset(self) -> None:
        with self._lock:
            self.clear()


def soft_radial_alpha(height: int, width: int) -> Image:
    """Opaque centre, linear ramp to fully transparent corners: every alpha value occurs."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    ry, rx = max(height / 2, 0.5), max(width / 2, 0.5)
    dist = np.hypot((yy - (height - 1) / 2) / ry, (xx - (width - 1) / 2) / rx)
    alpha: Image = np.round(np.clip((1.0 - dist) / 0.4, 0.0, 1.0) * 255).astype(np.uint8)
    return alpha


def cover_resize(img: Image, width: int, height: int) -> Image:
    """Scale to cover ``width`` x ``height``, then centre-crop: exact size, no distortion."""
    src_h, src_w = img.shape[:2]
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized: Image = cv2.resize(img, (new_w, new_h), interpolation=interp)
    x0, y0 = (new_w - width) // 2, (new_h - height) // 2
    return np.ascontiguousarray(resized[y0 : y0 + height, x0 : x0 + width])


def encode(ext: str, img: Image) -> bytes:
    params: list[int] = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, 85]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 80]  # lossy, like most WebP on the web
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise RuntimeError(f"cv2.imencode({ext!r}) failed for shape {img.shape}")
    return bytes(buf.tobytes())


def patch_jpeg_dimensions(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOFn) so the JPEG claims ``width`` x ``height``.

    Walks the marker segments rather than searching for ``FFC0`` so that bytes inside quantisation
    or Huffman tables cannot be mistaken for the marker.
    """
    data = bytearray(jpeg)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"lost marker sync at {pos}")
        marker = data[pos + 1]
        (seg_len,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            # Segment layout: length(2) precision(1) height(2) width(2) ...
            struct.pack_into(">HH", data, pos + 5, height, width)
            return bytes(data)
        pos += 2 + seg_len
    raise ValueError("no SOF segment found")


class _Assets:
    """Response bodies built from the sample photos, computed once and cached (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, bytes] | None = None
        self._gen_cache: dict[tuple[int, int, str, bool, bool], bytes] = {}
        self._source: Image | None = None
        self._bomb: bytes | None = None

    @property
    def samples(self) -> dict[str, bytes]:
        with self._lock:
            if self._samples is None:
                # Only regular files that exist are servable, which also rules out path traversal.
                self._samples = {p.name: p.read_bytes() for p in SAMPLES_DIR.iterdir() if p.is_file()}
            return self._samples

    @property
    def photo_jpeg(self) -> bytes:
        return self.samples[PHOTO_JPEG]

    def _source_image(self) -> Image:
        if self._source is None:
            img = cv2.imdecode(np.frombuffer(self.samples[GEN_SOURCE], np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise RuntimeError(f"cannot decode {GEN_SOURCE}")
            self._source = img
        return self._source

    def generated(self, width: int, height: int, ext: str, alpha: bool, gray: bool) -> bytes:
        key = (width, height, ext, alpha, gray)
        with self._lock:
            cached = self._gen_cache.get(key)
        if cached is not None:
            return cached
        img = cover_resize(self._source_image(), width, height)
        if gray:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif alpha:
            img = np.dstack([img, soft_radial_alpha(height, width)])
        blob = encode(ext, img)
        with self._lock:
            self._gen_cache[key] = blob
        return blob

    @functools.cache  # noqa: B019 - one server per session, a handful of sizes
    def gzip_zeros(self, mib: int) -> bytes:
        return gzip.compress(bytes(mib << 20), compresslevel=9, mtime=0)

    @property
    def bomb(self) -> bytes:
        if self._bomb is None:
            # A real 16x16 photo crop with optimised Huffman tables, so the file is valid JPEG up
            # to the lie in its header and stays a few hundred bytes.
            tiny = cover_resize(self._source_image(), 16, 16)
            ok, buf = cv2.imencode(".jpg", tiny, [cv2.IMWRITE_JPEG_QUALITY, 50, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
            if not ok:
                raise RuntimeError("cannot encode bomb")
            self._bomb = patch_jpeg_dimensions(bytes(buf.tobytes()), BOMB_SIDE, BOMB_SIDE)
        return self._bomb


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that can kick its open connections when asked to stop."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for a handler stuck on a slow client
    allow_reuse_address = True

    def __init__(self, owner: ImageServer) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            self._connections.add(request)
            self.owner.connections += 1
        try:
            super().finish_request(request, client_address)
        finally:
            with self._conn_lock:
                self._connections.discard(request)

    def kick_connections(self) -> None:
        """Shut down every open connection so handlers blocked in recv/send return at once."""
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response is the point of several routes: not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or self.stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients may reuse the connection
    server_version = "img2ds-test-imageserver/1.0"
    # Idle keep-alive connections and stalled clients must not pin a thread forever.
    timeout = 10
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests would drown in access logs

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    # --- plumbing -------------------------------------------------------------------------------

    def _handle(self, head: bool) -> None:
        owner = self.server.owner
        owner.hits.increment(self.path)
        split = urlsplit(self.path)
        self._route(split.path, split.query, head)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        head: bool,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        for name, value in headers or []:
            self.send_header(name, value)
        no_body = status in (204, 304)
        self.send_header("Content-Length", "0" if no_body else str(len(body)))
        self.end_headers()
        if not head and not no_body:
            self.wfile.write(body)

    def _drip(self, data: bytes) -> bool:
        """Send ``data`` one byte per DRIP_INTERVAL; False if the server stopped or client left."""
        for i in range(len(data)):
            try:
                self.wfile.write(data[i : i + 1])
            except OSError:
                return False
            # Waiting on the event instead of sleeping lets stop() end the drip immediately.
            if self.server.stopping.wait(DRIP_INTERVAL):
                return False
        return True

    def _stream_forever(self, chunk: bytes, chunked: bool, limit: int | None) -> None:
        sent = 0
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
        while not self.server.stopping.is_set() and (limit is None or sent < limit):
            try:
                self.wfile.write(frame if limit is None else frame[: limit - sent])
            except OSError:
                return  # the client closed: that is the expected way out
            sent += len(chunk)

    # --- routes ---------------------------------------------------------------------------------

    def _route(self, path: str, query: str, head: bool) -> None:
        params = parse_qs(query)
        assets = self.server.owner.assets

        def flag(name: str) -> bool:
            return params.get(name, ["0"])[-1] not in ("", "0", "false")

        if path.startswith("/samples/"):
            name = unquote(path[len("/samples/") :])
            blob = assets.samples.get(name)
            if blob is None:
                self._send(404, b"no such sample\n", "text/plain", head)
                return
            ctype = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
            self._send(200, blob, ctype, head)
            return

        if m := _GEN_RE.match(path):
            width, height, ext = int(m[1]), int(m[2]), "." + m[3]
            alpha, gray = flag("alpha"), flag("gray")
            if not (1 <= width <= MAX_GEN_SIDE and 1 <= height <= MAX_GEN_SIDE):
                self._send(400, b"size out of range\n", "text/plain", head)
            elif alpha and (gray or ext in (".jpg", ".jpeg")):
                self._send(400, b"alpha needs png or webp, and not gray\n", "text/plain", head)
            else:
                blob = assets.generated(width, height, ext, alpha, gray)
                self._send(200, blob, CONTENT_TYPES[ext], head)
            return

        if m := _STATUS_RE.match(path):
            code = int(m[1])
            if not 200 <= code <= 599:
                self._send(400, b"status must be 200-599\n", "text/plain", head)
            else:
                self._send(code, f"status {code}\n".encode(), "text/plain", head)
            return

        if path == "/html":
            self._send(200, SOFT_404_HTML, "text/html; charset=utf-8", head)
            return

        if path == "/truncated.jpg":
            photo = assets.photo_jpeg
            self._send(200, photo[: len(photo) * 6 // 10], "image/jpeg", head)
            return

        if m := _ROBOTS_RE.match(path):
            directive = unquote(m[1])
            self._send(200, assets.photo_jpeg, "image/jpeg", head, [("X-Robots-Tag", directive)])
            return

        if path == "/robots-multi.jpg":
            tags = [("X-Robots-Tag", "img2dataset: noai"), ("X-Robots-Tag", "index")]
            self._send(200, assets.photo_jpeg, "image/jpeg", head, tags)
            return

        if path == "/slow.jpg":
            photo = assets.photo_jpeg
            self.close_connection = True  # the body is abandoned half way; never reuse
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(photo)))
            self.end_headers()
            if not head:
                self._drip(photo)
            return

        if path == "/slow-headers.jpg":
            photo = assets.photo_jpeg
            self.close_connection = True
            response_head = (
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(photo)}\r\nConnection: close\r\n\r\n"
            ).encode()
            # Bypasses send_response: the status line itself has to arrive byte by byte.
            if self._drip(response_head) and not head:
                self.wfile.write(photo)
            return

        if m := _REDIRECT_RE.match(path):
            relative, hops, rest = bool(m[1]), int(m[2]), m[3]
            suffix = f"?{query}" if query else ""
            if hops <= 0:
                self._route(rest, query, head)
                return
            target = f"/redirect{m[1] or ''}/{hops - 1}{rest}" if hops > 1 else rest
            location = target + suffix if relative else self.server.owner.url(target + suffix)
            self._send(302, b"", None, head, [("Location", location)])
            return

        if path == "/redirect-to":
            location = params.get("url", [""])[-1]
            if not location:
                self._send(400, b"missing url\n", "text/plain", head)
            else:
                self._send(302, b"", None, head, [("Location", location)])
            return

        if path == "/bomb.jpg":
            self._send(200, assets.bomb, "image/jpeg", head)
            return

        if path == "/huge":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(HUGE_LENGTH))
            self.end_headers()
            if not head:
                self._stream_forever(b"\x00" * 65536, chunked=False, limit=HUGE_LENGTH)
            return

        if path == "/huge-chunked":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not head:
                self._stream_forever(b"\x00" * 65536, chunked=True, limit=None)
            return

        if path == "/echo-ua.jpg":
            ua = self.headers.get("User-Agent")
            self.server.owner.last_user_agent = ua
            extra = [("X-Echo-User-Agent", ua)] if ua is not None else []
            self._send(200, assets.photo_jpeg, "image/jpeg", head, extra)
            return

        if m := _FLAKY_RE.match(path):
            failures, rest = int(m[1]), m[2]
            if self.server.owner.count_flaky(self.path) <= failures:
                self._send(503, b"try again later\n", "text/plain", head, [("Retry-After", "0")])
            else:
                self._route(rest, query, head)
            return

        if m := _REFRAMED_RE.match(path):
            body = self._body_of(m[2])
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            if m[1] == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
            self.end_headers()
            if head:
                return
            if m[1] == "chunked":
                for start in range(0, len(body), 1000):
                    part = body[start : start + 1000]
                    self.wfile.write(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n")
                self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
            else:
                self.wfile.write(body)
            return

        if m := _GZIP_RE.match(path):
            body = self._body_of(m[1])
            packed = zlib.compress(body) if flag("deflate") else gzip.compress(body, mtime=0)
            encoding = "deflate" if flag("deflate") else "gzip"
            self._send(200, packed, "image/jpeg", head, [("Content-Encoding", encoding)])
            return

        if m := _GZIP_BOMB_RE.match(path):
            self._send(
                200,
                self.server.owner.assets.gzip_zeros(int(m[1])),
                "image/jpeg",
                head,
                [("Content-Encoding", "gzip")],
            )
            return

        if m := _RETRY_AFTER_RE.match(path):
            failures, value, rest = int(m[1]), unquote(m[2]), m[3]
            if self.server.owner.count_flaky(self.path) <= failures:
                status = int(params.get("status", ["429"])[-1])
                self._send(status, b"slow down\n", "text/plain", head, [("Retry-After", value)])
            else:
                self._route(rest, query, head)
            return

        if path == "/close-early.jpg":
            photo = assets.photo_jpeg
            self.close_connection = True  # the socket is closed after the half body
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(photo)))
            self.end_headers()
            if not head:
                self.wfile.write(photo[: len(photo) // 2])
            return

        self._send(404, b"not found\n", "text/plain", head)

    def _body_of(self, path: str) -> bytes:
        """The body another route would send (only /gen/ images here)."""
        m = _GEN_RE.match(path)
        if m is None:
            raise ValueError(f"/chunked and /until-close take a /gen/ path, not {path}")
        return self.server.owner.assets.generated(int(m[1]), int(m[2]), f".{m[3]}", False, False)


class ImageServer:
    """Threaded loopback HTTP server serving the routes in the module docstring.

    Attributes:
        hits: requests per request target (path plus query, as sent).
        connections: TCP connections accepted so far (keep-alive reuse shows as fewer of them).
        last_user_agent: User-Agent of the latest ``/echo-ua.jpg`` request, or None.
    """

    def __init__(self) -> None:
        self.hits = Hits()
        self.connections = 0
        self.last_user_agent: str | None = None
        self.assets = _Assets()
        self._flaky_lock = threading.Lock()
        self._flaky: Counter[str] = Counter()
        self._httpd = _Server(self)
        self.host, self.port = "127.0.0.1", int(self._httpd.server_address[1])
        self.base_url = f"http://{self.host}:{self.port}"
        self._stopped = False
        # A short poll interval makes shutdown() (which waits for the loop to notice) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ImageServer-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def url(self, path: str) -> str:
        """Absolute URL for ``path`` (which must start with ``/``)."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        return self.base_url + path

    def count_flaky(self, target: str) -> int:
        """Count one more request to a ``/flaky/`` or ``/retry-after/`` target; the running total."""
        with self._flaky_lock:
            self._flaky[target] += 1
            return self._flaky[target]

    def stop(self) -> None:
        """Stop accepting, end in-flight slow responses and close the listening socket.

        Returns promptly (well under a second) even while a client is attached to a dripping route:
        the stopping event wakes the drip loops, and open sockets are shut down so handlers blocked
        in recv/send return too. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        self._httpd.stopping.set()
        self._httpd.shutdown()
        self._httpd.kick_connections()
        self._httpd.server_close()
        self._thread.join(timeout=2)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
