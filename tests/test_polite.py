"""Crawling like a good citizen, against real servers on loopback: robots.txt (RFC 9309) and its
AI-usage lines, every opt-out signal of a response or an image, the per-host connection cap across
shards, a host answering 429s in a row backed off while others go on, a dead host given up, Crawl-delay."""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import write_url_file
from imageserver import ImageServer

from img2ds_dagster.engine.distribute import build_on_worker, build_shards, drop_worker_shared, worker_shared
from img2ds_dagster.engine.fetch import Fetcher, FetchResult, HttpClient
from img2ds_dagster.engine.polite import Politeness
from img2ds_dagster.engine.sample import xmp_data_mining_prohibition
from img2ds_dagster.engine.settings import DownloadSettings, FetchSettings
from img2ds_dagster.engine.shard import ShardJob, Workers
from img2ds_dagster.engine.sources import Staging


@dataclass
class Site:
    """What the site serves and what it saw. ``robots``: (status, body) of /robots.txt, or None for
    a 404; ``headers``: extra response headers by path; ``delay``: seconds before each image."""

    image: bytes
    robots: tuple[int, str] | None = None
    headers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    delay: float = 0.0
    statuses: dict[str, list[int]] = field(default_factory=dict)  # answered in turn, then 200
    hits: list[tuple[float, str, str]] = field(default_factory=list)  # (time, Host, path)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hits_of(self, path: str) -> int:
        return sum(1 for _, _, p in self.hits if p == path)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _SiteServer

    def do_GET(self) -> None:
        site = self.server.site
        path = self.path
        with site.lock:
            site.hits.append((time.monotonic(), self.headers.get("Host", ""), path))
            site.in_flight += 1
            site.most_in_flight = max(site.most_in_flight, site.in_flight)
        try:
            self._answer(site, path)
        finally:
            with site.lock:
                site.in_flight -= 1

    def _answer(self, site: Site, path: str) -> None:
        if path == "/robots.txt":
            status, body = site.robots or (404, "no robots here\n")
            self._send(status, body.encode(), "text/plain", [])
            return
        if site.delay:
            time.sleep(site.delay)
        with site.lock:
            queued = site.statuses.get(path)
            status = queued.pop(0) if queued else 200
        if status != 200:
            self._send(status, b"slow down\n", "text/plain", [("Retry-After", "2")] if status == 429 else [])
            return
        self._send(200, site.bodies.get(path, site.image), "image/jpeg", site.headers.get(path, []))

    def _send(self, status: int, body: bytes, ctype: str, extra: list[tuple[str, str]]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _SiteServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    site: Site


@pytest.fixture
def site(server: ImageServer) -> Iterator[tuple[Site, int]]:
    """A fresh site on 127.0.0.1 per test, and its port; ``localhost`` reaches it too (another host)."""
    state = Site(image=server.assets.generated(32, 24, ".jpg", False, False))
    httpd = _SiteServer(("127.0.0.1", 0), _Handler)
    httpd.site = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state, int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


def fetch_all(urls: list[str], client: HttpClient | None = None, **settings: Any) -> list[FetchResult]:
    """Fetch every URL at once, on one client (a new one unless given)."""
    own = client is None
    client = client or HttpClient()
    fetcher = Fetcher(FetchSettings(**{"timeout": 5.0, **settings}), client)

    async def everything() -> list[FetchResult]:
        return list(await asyncio.gather(*(fetcher.fetch_async(u) for u in urls)))

    try:
        return client.run(everything())
    finally:
        if own:
            client.close()


ROBOTS = """\
User-agent: *
Disallow: /private/

User-agent: otherbot
Disallow: /

User-agent: img2ds_dagster
Disallow: /nobots/
Allow: /nobots/except/
"""


def test_robots_rules_for_our_token_and_for_everyone(site: tuple[Site, int]) -> None:
    state, port = site
    state.robots = (200, ROBOTS)
    base = f"http://127.0.0.1:{port}"
    paths = ["/a.jpg", "/private/a.jpg", "/nobots/a.jpg", "/nobots/except/a.jpg"]
    ours = fetch_all([base + p for p in paths])
    # Our group replaces *'s: /private/ is allowed to us, /nobots/ not (but its exception).
    assert [r.error for r in ours] == [
        None,
        None,
        "robots.txt: disallowed for img2ds_dagster (path /nobots/a.jpg)",
        None,
    ]
    assert ours[2].opt_out == "robots.txt"
    other = fetch_all([base + p for p in paths], user_agent_token="otherbot")
    assert all(
        r.error == f"robots.txt: disallowed for otherbot (path {p})"
        for r, p in zip(other, paths, strict=True)
    )
    unknown = fetch_all([base + p for p in paths], user_agent_token="somebot")  # falls back to *
    assert [r.error is None for r in unknown] == [True, False, True, True]
    assert state.hits_of("/robots.txt") == 3  # once per client (each fetch_all is a run), not per URL


def test_robots_txt_is_fetched_once_per_origin_for_every_shard(site: tuple[Site, int]) -> None:
    state, port = site
    state.robots = (200, ROBOTS)
    with HttpClient() as client:
        for _ in range(3):
            fetch_all([f"http://127.0.0.1:{port}/{i}.jpg" for i in range(10)], client)
        fetch_all([f"http://localhost:{port}/{i}.jpg" for i in range(10)], client)  # another origin
    assert state.hits_of("/robots.txt") == 2


@pytest.mark.parametrize(
    ("robots", "error"),
    [
        ((404, "gone"), None),  # no file: no restrictions
        ((403, "forbidden"), None),  # any 4xx
        ((503, "down"), "robots.txt answered 503: every path disallowed for this run"),
        ((500, "broken"), "robots.txt answered 500: every path disallowed for this run"),
    ],
)
def test_robots_txt_failures_as_rfc_9309_says(
    site: tuple[Site, int], robots: tuple[int, str], error: str | None
) -> None:
    state, port = site
    state.robots = robots
    (result,) = fetch_all([f"http://127.0.0.1:{port}/a.jpg"])
    assert result.error == error
    if error:
        assert result.opt_out == "robots.txt unavailable"
        assert state.hits_of("/a.jpg") == 0


def test_robots_txt_can_be_ignored(site: tuple[Site, int]) -> None:
    state, port = site
    state.robots = (200, "User-agent: *\nDisallow: /\n")
    (result,) = fetch_all([f"http://127.0.0.1:{port}/a.jpg"], respect_robots_txt=False)
    assert result.error is None
    assert state.hits_of("/robots.txt") == 0


@pytest.mark.parametrize(
    ("robots", "path", "error"),
    [
        (
            "User-agent: *\nContent-Signal: search=yes, ai-train=no\nAllow: /\n",
            "/a.jpg",
            "robots.txt: AI training opted out (search=yes, ai-train=no)",
        ),
        ("User-agent: *\nContent-Signal: search=yes, ai-train=yes\n", "/a.jpg", None),
        (
            "User-agent: *\nContent-Usage: train-ai=y\nContent-Usage: /art/ train-ai=n\n",
            "/art/a.jpg",
            "robots.txt: AI training opted out for /art/ (train-ai=n)",
        ),
        (
            "User-agent: *\nContent-Usage: train-ai=y\nContent-Usage: /art/ train-ai=n\n",
            "/photos/a.jpg",
            None,
        ),
        # A group of our own without the line: *'s does not apply.
        (
            "User-agent: *\nContent-Signal: ai-train=no\n\nUser-agent: img2ds_dagster\nAllow: /\n",
            "/a.jpg",
            None,
        ),
    ],
)
def test_ai_usage_lines_in_robots_txt(
    site: tuple[Site, int], robots: str, path: str, error: str | None
) -> None:
    state, port = site
    state.robots = (200, robots)
    (result,) = fetch_all([f"http://127.0.0.1:{port}{path}"])
    assert result.error == error
    if error:
        assert result.opt_out == "robots.txt ai-usage"


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" '
    b'plus:DataMining="http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING"/></rdf:RDF></x:xmpmeta>'
)


def with_xmp(jpeg: bytes, packet: bytes) -> bytes:
    """The JPEG with an XMP APP1 segment after its SOI."""
    payload = b"http://ns.adobe.com/xap/1.0/\x00" + packet
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


@pytest.mark.parametrize(
    ("path", "headers", "error", "kind"),
    [
        (
            "/noml.jpg",
            [("X-Robots-Tag", "noml")],
            "Use of image disallowed by X-Robots-Tag directive",
            "x-robots-tag",
        ),
        (
            "/ours.jpg",
            [("X-Robots-Tag", "img2ds_dagster: noai")],
            "Use of image disallowed by X-Robots-Tag directive",
            "x-robots-tag",
        ),
        ("/others.jpg", [("X-Robots-Tag", "otherbot: noai")], None, None),
        (
            "/tdm.jpg",
            [("tdm-reservation", "1")],
            "Use of image reserved by its TDMRep header (tdm-reservation: 1)",
            "tdm-reservation",
        ),
        ("/tdm0.jpg", [("tdm-reservation", "0")], None, None),
        (
            "/usage.jpg",
            [("Content-Usage", "train-ai=n, search=y")],
            "AI training opted out by the Content-Usage header (train-ai=n, search=y)",
            "content-usage",
        ),
        ("/usage-y.jpg", [("Content-Usage", "train-ai=y")], None, None),
    ],
)
def test_opt_out_headers(
    site: tuple[Site, int], path: str, headers: list[tuple[str, str]], error: str | None, kind: str | None
) -> None:
    state, port = site
    state.headers[path] = headers
    (result,) = fetch_all([f"http://127.0.0.1:{port}{path}"])
    assert (result.error, result.opt_out) == (error, kind)


def test_opt_out_headers_can_be_ignored(site: tuple[Site, int]) -> None:
    state, port = site
    state.headers["/both.jpg"] = [("tdm-reservation", "1"), ("Content-Usage", "train-ai=n")]
    (result,) = fetch_all(
        [f"http://127.0.0.1:{port}/both.jpg"], respect_tdm_reservation=False, respect_content_usage=False
    )
    assert result.error is None


def test_xmp_data_mining_is_read_from_the_bytes() -> None:
    jpeg = b"\xff\xd8\xff\xdb" + bytes(100) + b"\xff\xd9"
    assert xmp_data_mining_prohibition(with_xmp(jpeg, XMP)) == "DMI-PROHIBITED-AIMLTRAINING"
    allowed = XMP.replace(b"DMI-PROHIBITED-AIMLTRAINING", b"DMI-ALLOWED")
    assert xmp_data_mining_prohibition(with_xmp(jpeg, allowed)) is None
    assert xmp_data_mining_prohibition(jpeg) is None


def stage(tmp_path: Path, urls: list[str], name: str = "t", **flags: Any) -> Staging:
    path = write_url_file(tmp_path / f"{name}.txt", urls)
    staging = Staging(str(tmp_path / "staging"))
    settings = DownloadSettings.from_flags(timeout=5, output_format="webdataset", **flags)
    staging.stage(name, str(path), settings, str(tmp_path / "out" / name))
    return staging


def test_an_xmp_opt_out_refuses_the_sample_and_is_counted(site: tuple[Site, int], tmp_path: Path) -> None:
    state, port = site
    state.bodies["/xmp.jpg"] = with_xmp(state.image, XMP)
    urls = [f"http://127.0.0.1:{port}/xmp.jpg", f"http://127.0.0.1:{port}/plain.jpg"]
    staging = stage(tmp_path, urls, number_sample_per_shard=2)
    ((_, result),) = build_shards(staging.root, [ShardJob("t", 0)], Workers(thread_count=2))
    assert not isinstance(result, Exception)
    assert result.stats.opt_outs == {"xmp-data-mining": 1}
    assert (
        result.stats.status_dict[
            "Use of image prohibited by its XMP DataMining field (DMI-PROHIBITED-AIMLTRAINING)"
        ]
        == 1
    )


def test_the_connection_cap_per_host_holds_across_shards(site: tuple[Site, int], tmp_path: Path) -> None:
    state, port = site
    state.delay = 0.05  # each image takes a while, so requests pile up
    urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(60)]
    staging = stage(tmp_path, urls, number_sample_per_shard=20)
    workers = Workers(thread_count=16, parallel_shards=3, max_connections_per_host=3)
    results = dict(build_shards(staging.root, [ShardJob("t", i) for i in range(3)], workers))
    assert all(r.stats.successes == 20 for r in results.values() if not isinstance(r, Exception))
    assert state.most_in_flight == 3  # reached, never passed, with 48 downloads wanting to go


def test_a_cluster_worker_process_fetches_robots_txt_once_for_all_its_shards(
    site: tuple[Site, int], tmp_path: Path
) -> None:
    """Ray and Spark run a worker process's tasks one after another: its shards share one client."""
    state, port = site
    state.robots = (200, ROBOTS)
    staging = stage(
        tmp_path, [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(6)], number_sample_per_shard=2
    )
    workers = Workers(thread_count=2, max_connections_per_host=5)
    try:
        results = [build_on_worker(staging.root, ShardJob("t", i), workers, "test") for i in range(3)]
        assert [r.stats.successes for r in results if not isinstance(r, Exception)] == [2, 2, 2]
        assert state.hits_of("/robots.txt") == 1
        assert worker_shared(workers) is worker_shared(workers)
        assert worker_shared(dataclasses.replace(workers, max_connections_per_host=6)) is not worker_shared(
            workers
        )
    finally:
        drop_worker_shared(workers)
        drop_worker_shared(dataclasses.replace(workers, max_connections_per_host=6))


def test_a_host_that_answers_429_twice_in_a_row_is_backed_off_while_others_go_on(
    site: tuple[Site, int],
) -> None:
    state, port = site
    state.statuses["/first.jpg"] = [429]  # with Retry-After: 2
    state.statuses["/second.jpg"] = [429]
    later = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(3)]
    other = [f"http://localhost:{port}/other{i}.jpg" for i in range(3)]  # another host name
    with HttpClient() as client:
        fetcher = Fetcher(FetchSettings(timeout=5.0, retries=1), client)

        async def scenario() -> list[FetchResult]:
            first = [
                asyncio.ensure_future(fetcher.fetch_async(f"http://127.0.0.1:{port}/{name}.jpg"))
                for name in ("first", "second")
            ]
            await asyncio.sleep(0.3)  # both 429s have come: the host is paused for 2 s
            rest = await asyncio.gather(*(fetcher.fetch_async(u) for u in [*later, *other]))
            return [*(await asyncio.gather(*first)), *rest]

        results = client.run(scenario())
    assert [r.error for r in results] == [None] * 8
    answered_429 = max(
        min(t for t, _, path in state.hits if path == p) for p in ("/first.jpg", "/second.jpg")
    )
    later_starts = [
        t - answered_429 for t, host, path in state.hits if host.startswith("127.0.0.1") and path[1].isdigit()
    ]
    other_starts = [t - answered_429 for t, host, path in state.hits if path.startswith("/other")]
    assert min(later_starts) >= 1.9  # held by the pause, though they came 0.3 s after the 429s
    assert max(other_starts) < 1.0  # the other host was not held


def test_a_429_alone_delays_its_own_retry_and_not_the_host(site: tuple[Site, int]) -> None:
    state, port = site
    state.statuses["/first.jpg"] = [429]  # with Retry-After: 2
    later = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(3)]
    with HttpClient() as client:
        fetcher = Fetcher(FetchSettings(timeout=5.0, retries=1), client)

        async def scenario() -> list[FetchResult]:
            first = asyncio.ensure_future(fetcher.fetch_async(f"http://127.0.0.1:{port}/first.jpg"))
            await asyncio.sleep(0.3)
            rest = await asyncio.gather(*(fetcher.fetch_async(u) for u in later))
            return [await first, *rest]

        results = client.run(scenario())
    assert [r.error for r in results] == [None] * 4
    assert (results[0].waits, results[0].waited) == (1, 2.0)
    first_hits = [t for t, _, path in state.hits if path == "/first.jpg"]
    assert len(first_hits) == 2
    assert first_hits[1] - first_hits[0] >= 1.9  # its Retry-After
    later_starts = [t - first_hits[0] for t, _, path in state.hits if path[1].isdigit()]
    assert max(later_starts) < 1.0  # the host was not paused for the others


def test_a_dead_host_stops_costing_time(tmp_path: Path) -> None:
    # A server that accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead.listen(256)
        port = dead.getsockname()[1]
        urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(200)]
        started = time.monotonic()
        with HttpClient(Politeness(host_failure_limit=3)) as client:
            results = fetch_all(urls, client, timeout=0.5, respect_robots_txt=False)
        elapsed = time.monotonic() - started
    # 16 in flight time out together; the host is given up after 3 of them (the slots the first two
    # freed may start two more), and the rest fail at once: without it, 200 URLs 16 at a time would
    # take 13 timeouts, 6.5 s.
    assert elapsed < 3.0, elapsed
    errors = [r.error or "" for r in results]
    assert 3 <= errors.count("timed out") <= 20
    assert sum(e.startswith("127.0.0.1: host given up after 3 failures in a row") for e in errors) >= 180


def test_crawl_delay_spaces_the_hosts_requests(site: tuple[Site, int]) -> None:
    state, port = site
    state.robots = (200, "User-agent: *\nCrawl-delay: 0.5\n")
    fetch_all([f"http://127.0.0.1:{port}/{i}.jpg" for i in range(4)])
    starts = sorted(t for t, _, path in state.hits if path != "/robots.txt")
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 3
    assert all(gap >= 0.45 for gap in gaps), gaps


def test_the_shard_is_the_same_whatever_the_politeness_schedule(
    site: tuple[Site, int], tmp_path: Path
) -> None:
    # Two hosts; one slow and capped at a connection, so downloaders skip to the other host's rows
    # and the rows complete out of order: the tar and the parquet come out byte for byte the same.
    state, port = site
    state.delay = 0.02
    urls = [f"http://{host}:{port}/{i}.jpg" for i in range(30) for host in ("127.0.0.1", "localhost")]
    outputs = []
    for cap in (1, 16):
        staging = stage(tmp_path / f"cap{cap}", urls, number_sample_per_shard=60)
        workers = Workers(thread_count=8, max_connections_per_host=cap)
        ((_, result),) = build_shards(staging.root, [ShardJob("t", 0)], workers)
        assert not isinstance(result, Exception)
        assert result.stats.successes == 60
        folder = tmp_path / f"cap{cap}" / "out" / "t"
        outputs.append(((folder / "00000.tar").read_bytes(), (folder / "00000.parquet").read_bytes()))
    assert outputs[0] == outputs[1]
