"""tests/realservers.py's servers do what their docstrings say, checked with the standard library only
(raw sockets where the exact bytes on the wire matter)."""

from __future__ import annotations

import gzip
import http.client
import http.server
import os
import random
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from realservers import Apache, Nginx, Squid

PHOTO = random.Random(1).randbytes(30_000)  # incompressible: the gzipped body is bigger than the file
NOTES = b"a line of text that compresses well\n" * 40
TINY = b"tiny\n"
FILES = {"photo.jpg": PHOTO, "notes.txt": NOTES, "tiny.txt": TINY}
PROXY_ONLY_NAME = "only-the-proxy-knows.test"  # .test never resolves (RFC 6761): only squid knows it


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    (root / "sub").mkdir()
    (root / "sub" / "deep.bin").write_bytes(PHOTO[:1000])
    return root


@pytest.fixture(scope="module")
def nginx(site: Path) -> Iterator[Nginx]:
    with Nginx(site) as server:
        yield server


@pytest.fixture(scope="module")
def apache(site: Path) -> Iterator[Apache]:
    with Apache(site) as server:
        yield server


@pytest.fixture(scope="module")
def origin(site: Path) -> Iterator[int]:
    """A plain http.server on 127.0.0.1 serving ``site``: the origin squid forwards to. Yields its port."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def squid() -> Iterator[Squid]:
    with Squid({PROXY_ONLY_NAME: "127.0.0.1"}) as server:
        yield server


# --------------------------------------------------------------------------------------------------
# Raw HTTP


@dataclass
class Raw:
    status_line: str
    headers: dict[str, str]  # names in lower case
    body: bytes  # as it came on the wire: chunked framing, gzip and all


def raw_get(port: int, path: str, *, close: bool = False, timeout: float = 10.0) -> Raw:
    """GET ``path`` as an HTTP/1.1 client that asks for no compression and reads to the end of the
    connection. Without ``close`` the request leaves the connection open, so the server must end it."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept-Encoding: identity\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Raw(status_line, headers, body)


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked body; fails on anything that is not exact chunked framing."""
    out = b""
    while True:
        size_line, sep, body = body.partition(b"\r\n")
        assert sep, "chunk size line without CRLF"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert body == b"\r\n", f"unexpected bytes after the last chunk: {body[:40]!r}"
            return out
        out += body[:size]
        assert body[size : size + 2] == b"\r\n", "chunk without its CRLF"
        body = body[size + 2 :]


def three_requests_on_one_connection(port: int, marker: str) -> tuple[list[str | None], bool]:
    """Sends 3 keep-alive requests one after the other on one connection; returns each response's
    Connection header and whether the server had closed the connection after the third."""
    connection_headers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for i in range(3):
            sock.sendall(f"GET /notes.txt?{marker}={i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            response = http.client.HTTPResponse(sock)
            try:
                response.begin()
                assert response.status == 200
                assert response.read() == NOTES
                connection_headers.append(response.getheader("Connection"))
            finally:
                response.close()
        closed = sock.recv(1) == b""
    return connection_headers, closed


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
        return data


# --------------------------------------------------------------------------------------------------
# nginx


def test_nginx_serves_files(nginx: Nginx) -> None:
    assert nginx.url("/photo.jpg") == f"http://127.0.0.1:{nginx.port}/photo.jpg"
    assert fetch(nginx.url("photo.jpg")) == PHOTO
    assert fetch(nginx.url("sub/deep.bin")) == PHOTO[:1000]
    plain = raw_get(nginx.port, "/photo.jpg", close=True)
    assert plain.headers["content-length"] == str(len(PHOTO))


@pytest.mark.parametrize("name", ["photo.jpg", "notes.txt", "tiny.txt"])
def test_nginx_gzip_is_close_delimited(nginx: Nginx, name: str) -> None:
    # The request says Accept-Encoding: identity and keeps the connection open: the server gzips anyway
    # and ends the body by closing the connection.
    response = raw_get(nginx.port, f"/gzip/{name}")
    assert response.status_line == "HTTP/1.1 200 OK"
    assert response.headers["content-encoding"] == "gzip"
    assert "content-length" not in response.headers
    assert "transfer-encoding" not in response.headers
    assert response.headers["connection"] == "close"
    assert gzip.decompress(response.body) == FILES[name]


def test_nginx_chunked(nginx: Nginx) -> None:
    response = raw_get(nginx.port, "/chunked/photo.jpg", close=True)
    assert response.status_line == "HTTP/1.1 200 OK"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert "content-encoding" not in response.headers
    assert dechunk(response.body) == PHOTO
    assert fetch(nginx.url("chunked/notes.txt")) == NOTES


def test_nginx_redirects(nginx: Nginx) -> None:
    for code in (307, 308):
        response = raw_get(nginx.port, f"/r{code}/sub/deep.bin", close=True)
        assert response.status_line.startswith(f"HTTP/1.1 {code} ")
        assert response.headers["location"] == nginx.url("sub/deep.bin")
    relative = raw_get(nginx.port, "/relative/sub/deep.bin", close=True)
    assert relative.status_line.startswith("HTTP/1.1 302 ")
    assert relative.headers["location"] == "/sub/deep.bin"


def test_nginx_closes_keepalive_after_3_requests(nginx: Nginx) -> None:
    connection_headers, closed = three_requests_on_one_connection(nginx.port, "nginx-ka")
    assert connection_headers == ["keep-alive", "keep-alive", "close"]
    assert closed
    entries = [e for e in nginx.entries(wait_for=3) if "nginx-ka=" in e.request]
    assert [(e.number, e.status) for e in entries] == [(1, 200), (2, 200), (3, 200)]
    assert len({e.connection for e in entries}) == 1
    assert entries[0].request == "GET /notes.txt?nginx-ka=0 HTTP/1.1"


# --------------------------------------------------------------------------------------------------
# Apache


def test_apache_serves_files(apache: Apache) -> None:
    assert fetch(apache.url("photo.jpg")) == PHOTO
    assert fetch(apache.url("sub/deep.bin")) == PHOTO[:1000]


def test_apache_http10(apache: Apache) -> None:
    response = raw_get(apache.port, "/http10/photo.jpg")  # keep-alive asked for, not given
    assert response.status_line == "HTTP/1.0 200 OK"
    assert response.headers["content-length"] == str(len(PHOTO))
    assert response.headers["connection"] == "close"
    assert response.body == PHOTO


@pytest.mark.parametrize("name", ["photo.jpg", "tiny.txt"])
def test_apache_close_delimited(apache: Apache, name: str) -> None:
    response = raw_get(apache.port, f"/close/{name}")
    assert response.status_line == "HTTP/1.0 200 OK"
    assert "content-length" not in response.headers
    assert "transfer-encoding" not in response.headers
    assert "content-encoding" not in response.headers
    assert response.headers["connection"] == "close"
    assert response.body == FILES[name]
    assert raw_get(apache.port, "/close/missing.jpg").status_line == "HTTP/1.0 404 Not Found"


def test_apache_chunked(apache: Apache) -> None:
    response = raw_get(apache.port, "/chunked/photo.jpg", close=True)
    assert response.status_line == "HTTP/1.1 200 OK"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert dechunk(response.body) == PHOTO


def test_apache_gzip(apache: Apache) -> None:
    for name, data in [("photo.jpg", PHOTO), ("notes.txt", NOTES)]:
        response = raw_get(apache.port, f"/gzip/{name}", close=True)
        assert response.status_line == "HTTP/1.1 200 OK"
        assert response.headers["content-encoding"] == "gzip"
        assert response.headers["content-length"] == str(len(response.body))
        assert gzip.decompress(response.body) == data
    # Bodies of 68 bytes or less are left alone.
    tiny = raw_get(apache.port, "/gzip/tiny.txt", close=True)
    assert "content-encoding" not in tiny.headers
    assert tiny.body == TINY


def test_apache_redirects(apache: Apache) -> None:
    for code in (307, 308):
        response = raw_get(apache.port, f"/r{code}/sub/deep.bin", close=True)
        assert response.status_line.startswith(f"HTTP/1.1 {code} ")
        assert response.headers["location"] == apache.url("sub/deep.bin")


def test_apache_closes_keepalive_after_3_requests(apache: Apache) -> None:
    connection_headers, closed = three_requests_on_one_connection(apache.port, "apache-ka")
    assert connection_headers == [None, None, "close"]
    assert closed
    entries = [e for e in apache.entries(wait_for=3) if "apache-ka=" in e.request]
    assert [(e.number, e.status) for e in entries] == [(1, 200), (2, 200), (3, 200)]
    assert len({e.connection for e in entries}) == 1


# --------------------------------------------------------------------------------------------------
# Squid


def test_squid_resolves_its_own_hosts(squid: Squid, origin: int) -> None:
    assert PROXY_ONLY_NAME not in Path("/etc/hosts").read_text()
    url = f"http://{PROXY_ONLY_NAME}:{origin}/photo.jpg"
    conn = http.client.HTTPConnection("127.0.0.1", squid.port, timeout=10)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert body == PHOTO
    assert "squid" in (response.getheader("Via") or "")
    assert f"GET {url}" in squid.requests(wait_for=1)


def test_squid_fails_fast_on_unknown_names(squid: Squid) -> None:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", squid.port, timeout=10)
    try:
        conn.request("GET", "http://no-such-name.test/x.jpg")
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status in (502, 503)
    assert time.monotonic() - started < 5


def test_squid_connect_tunnel(squid: Squid, origin: int) -> None:
    with socket.create_connection(("127.0.0.1", squid.port), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{origin} HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"squid closed the connection: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 Connection established"
        # The tunnel reaches the origin: speak HTTP to it through squid.
        sock.sendall(b"GET /notes.txt HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        while chunk := sock.recv(65536):
            rest += chunk
    assert rest.startswith(b"HTTP/1.0 200")
    assert rest.endswith(NOTES)
    assert f"CONNECT 127.0.0.1:{origin}" in squid.requests(wait_for=1)


# --------------------------------------------------------------------------------------------------
# Failures and clean-up


def test_missing_binary_names_the_package(site: Path) -> None:
    class NotInstalled(Nginx):
        name = "img2ds-no-such-server"

    with pytest.raises(RuntimeError, match=r"install Debian's nginx package \(apt-get install nginx"):
        NotInstalled(site).__enter__()


def test_start_failure_shows_the_error_log(site: Path) -> None:
    class Broken(Nginx):
        def _command(self, binary: str, folder: Path, port: int) -> list[str]:
            command = super()._command(binary, folder, port)
            with open(folder / "nginx.conf", "a") as conf:
                conf.write("no_such_directive on;\n")
            return command

    with pytest.raises(RuntimeError, match=r"(?s)nginx exited at start.*unknown directive"), Broken(site):
        pass


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and proc.name != str(os.getpid()):
                found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.parametrize("server", [Nginx, Apache])
def test_exit_stops_every_process(site: Path, server: type[Nginx] | type[Apache]) -> None:
    with server(site) as running:
        folder = running.folder
        assert _processes_mentioning(str(folder))
        assert fetch(running.url("tiny.txt")) == TINY
    assert not folder.exists()
    assert _processes_mentioning(str(folder)) == []
