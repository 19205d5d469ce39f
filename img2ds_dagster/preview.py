"""``img2ds preview OUTPUT_FOLDER``: one self-contained HTML page showing a sample of each shard of
a dataset: thumbnails with their captions, and the rows that failed with their status and error."""

from __future__ import annotations

import html
import random
from collections.abc import Iterator
from pathlib import Path

import cv2
import fsspec
import pyarrow.parquet as pq

from .engine.export import SourceShard, finished_shards, read_images
from .engine.pictures import data_uri, thumbnail
from .errors import ExportError

THUMB = 160
_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h2 { margin-top: 2em; font-size: 1.1em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { width: 170px; margin: 0; font-size: 12px; }
figure img { display: block; max-width: 160px; max-height: 160px; margin-bottom: 4px; }
.failed { width: 170px; font-size: 12px; background: #fbeaea; padding: 4px; word-break: break-all; }
.status { font-weight: bold; }
"""


def write_preview(
    output_folder: str, destination: str, per_shard: int = 16, seed: int = 0
) -> tuple[int, int]:
    """Write the page to ``destination``; returns (shards shown, samples shown). The sample of each
    shard is drawn with ``seed``, so the same dataset gives the same page."""
    shards = finished_shards(output_folder.rstrip("/"), "")
    if not shards:
        raise ExportError(
            f"{output_folder}: no finished shard (a shard is finished once its _stats.json exists)"
        )
    sections, shown = [], 0
    for shard in shards:
        section, count = _section(shard, per_shard, random.Random(f"{seed}:{shard.name}"))
        sections.append(section)
        shown += count
    title = html.escape(f"img2ds preview of {output_folder}")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<p>{len(shards)} shards, up to {per_shard} samples each.</p>{''.join(sections)}</body></html>"
    )
    with fsspec.open(destination, "w", encoding="utf-8") as f:
        f.write(page)
    return len(shards), shown


def _section(shard: SourceShard, per_shard: int, rng: random.Random) -> tuple[str, int]:
    with fsspec.open(shard.parquet_path, "rb") as f:
        names = pq.read_schema(f).names
        columns = [
            c for c in ("key", "status", "error_message", "caption", "url", "width", "height") if c in names
        ]
        rows = pq.read_table(f, columns=columns).to_pylist()
    chosen = sorted(rng.sample(range(len(rows)), min(per_shard, len(rows))))
    picked = [rows[i] for i in chosen]
    wanted = {str(r["key"]) for r in picked if r["status"] == "success"}
    images = {key: data for key, _, data in _sample_images(shard, wanted)}
    ok = sum(r["status"] == "success" for r in rows)
    cells = [_cell(row, images.get(str(row["key"]))) for row in picked]
    heading = html.escape(f"shard {shard.name}: {ok} of {len(rows)} samples downloaded")
    return f"<h2>{heading}</h2><div class='grid'>{''.join(cells)}</div>", len(picked)


def _sample_images(shard: SourceShard, keys: set[str]) -> Iterator[tuple[str, str, bytes]]:
    if shard.output_format in ("webdataset", "files", "parquet") and keys:
        yield from read_images(shard, keys)


def _cell(row: dict[str, object], image: bytes | None) -> str:
    caption = html.escape(str(row.get("caption") or ""))
    url = html.escape(str(row.get("url") or ""))
    if row["status"] != "success":
        error = html.escape(str(row.get("error_message") or ""))
        return (
            f"<div class='failed'><span class='status'>{html.escape(str(row['status']))}</span><br>"
            f"{error}<br><a href='{url}'>{url}</a></div>"
        )
    thumb = thumbnail(image, THUMB) if image else None
    if thumb is None:
        return f"<figure><span class='status'>success, no image in this format</span><br>{caption}</figure>"
    ok, encoded = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 80])
    src = data_uri(encoded.tobytes(), "image/jpeg") if ok else ""
    size = html.escape(f"{row.get('width')}x{row.get('height')}")
    return (
        f"<figure><img src='{src}' alt='{caption}' title='{url}'>"
        f"<figcaption>{caption} ({size})</figcaption></figure>"
    )


def default_destination(output_folder: str) -> str:
    local = Path(output_folder)
    return (
        str(local / "preview.html")
        if "://" not in output_folder
        else output_folder.rstrip("/") + "/preview.html"
    )
