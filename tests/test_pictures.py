"""Pictures: the contact sheet of a shard, the stats charts (and the rate they show), and
``img2ds preview``'s page."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from imageserver import ImageServer

from img2ds_dagster import download
from img2ds_dagster.cli import main
from img2ds_dagster.defs.stats import charts
from img2ds_dagster.engine.pictures import bar_chart, contact_sheet
from img2ds_dagster.engine.stats import ShardStats, aggregate, read_stats_files


def decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_a_contact_sheet_is_a_grid_of_the_images_that_decode(server: ImageServer) -> None:
    images = [server.assets.generated(w, h, ".jpg", False, False) for w, h in [(640, 480), (200, 600)] * 5]
    sheet = contact_sheet([b"not an image", *images], limit=8, columns=4, size=64)
    assert sheet is not None
    assert decode(sheet).shape == (2 * 66 + 2, 4 * 66 + 2, 3)  # 2 rows of 4 cells of 64 + 2 px gaps
    assert contact_sheet([b"nothing", b""]) is None


def test_a_bar_chart_is_svg_with_a_bar_per_value() -> None:
    svg = bar_chart("errors", [("HTTP Error 404 <Not Found>", 12), ("timeout", 3.5)])
    root = ET.fromstring(svg)
    bars = [e for e in root if e.tag.endswith("rect")][1:]  # the first is the background
    assert len(bars) == 2
    assert float(bars[0].get("width", 0)) > float(bars[1].get("width", 0)) > 0
    assert "HTTP Error 404 &lt;Not Found&gt;" in svg


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_preview_shows_each_shard_with_images_captions_and_failures(
    server: ImageServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    urls = [server.url(p) for p in (*GOOD_IMAGES, *BAD_IMAGES)]
    captions = [f"caption number {i}" for i in range(len(urls))]
    url_file = write_url_file(tmp_path / "urls.parquet", urls, captions=captions)
    out = tmp_path / "out"
    download(
        str(url_file),
        output_folder=str(out),
        input_format="parquet",
        caption_col="caption",
        number_sample_per_shard=6,
        timeout=5,
        retries=0,
    )
    assert main(["preview", str(out), "--per_shard", "100"]) == 0
    assert f"{out / 'preview.html'}: {len(urls)} samples of 2 shards" in capsys.readouterr().out
    page = _Page()
    page.feed((out / "preview.html").read_text())
    assert len(page.images) == len(GOOD_IMAGES)
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")
        assert max(decode(base64.b64decode(src.split(",", 1)[1])).shape[:2]) == 160
    text = " ".join(page.text)
    assert "shard 00000:" in text
    assert "shard 00001:" in text
    assert text.count("failed_to_download") + text.count("failed_to_resize") == len(BAD_IMAGES)
    assert "HTTP Error 404" in text
    assert all(
        f"caption number {i}" in text for i, u in enumerate(urls) if u.split(":", 2)[-1] in str(GOOD_IMAGES)
    )
    assert re.search(r"\d+x\d+", text)


def test_download_stats_charts_are_svg_images_in_markdown(server: ImageServer, tmp_path: Path) -> None:
    urls = [server.url(p) for p in (*GOOD_IMAGES, *BAD_IMAGES)]
    download(str(write_url_file(tmp_path / "urls.txt", urls)), output_folder=str(tmp_path / "out"), timeout=5)
    stats = aggregate(read_stats_files({"urls": [str(tmp_path / "out" / "00000_stats.json")]}))
    uris = re.findall(r"!\[chart\]\((data:image/svg\+xml;base64,[^)]+)\)", charts(stats))
    assert len(uris) == 3
    svgs = [ET.fromstring(base64.b64decode(u.split(",", 1)[1])) for u in uris]
    titles = [next(e.text for e in svg if e.tag.endswith("text")) for svg in svgs]
    assert titles == ["success rate per table", "images/s per table", "most frequent errors"]
    error_bars = [e for e in svgs[2] if e.tag.endswith("rect")][1:]
    assert len(error_bars) == len(stats.errors)


def test_images_per_second_counts_only_the_time_shards_were_being_built(tmp_path: Path) -> None:
    """Two shards built at the same time, and a third rebuilt an hour later: the rate is over the
    union of their spans (20 s), not over the span from the first start to the last end."""
    spans = {"00000": (0.0, 10.0), "00001": (5.0, 15.0), "00002": (3600.0, 3605.0)}
    paths = []
    for name, (start, end) in spans.items():
        stats = ShardStats(count=100, successes=90, start_time=start, end_time=end)
        path = tmp_path / f"{name}_stats.json"
        path.write_text(json.dumps(stats.to_json()))
        paths.append(str(path))
    totals = aggregate(read_stats_files({"t": paths})).totals
    assert totals["images_per_second"] == pytest.approx(300 / 20)
