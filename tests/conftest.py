"""Shared fixtures: a real HTTP server on 127.0.0.1 serving real images (and misbehaving on purpose),
and helpers that write URL files in every input format."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

# pytest puts this folder on sys.path (tests/ is not a package), so the server module imports as is.
from imageserver import ImageServer

from img2ds_dagster.engine.runtime import prepare_process

# The engine's tests call it below its entry points (download(), build_shards, the code location),
# which each make the process-wide settings first: so does the test process.
prepare_process()

# The server's routes that give a real image, with the size it has.
GOOD_IMAGES = {
    "/gen/640x480.jpg": (640, 480),
    "/gen/100x300.png?alpha=1": (100, 300),
    "/gen/50x50.webp": (50, 50),
    "/gen/1000x250.jpg": (1000, 250),
    "/samples/chelsea_451x300_exif.jpg": (451, 300),
    "/samples/camera_384x384_gray.jpg": (384, 384),
}
# Routes that must fail, with the status they must get.
BAD_IMAGES = {
    "/status/404": "failed_to_download",
    "/html": "failed_to_resize",
    "/truncated.jpg": "failed_to_resize",
    "/robots/noai.jpg": "failed_to_download",
    "/bomb.jpg": "failed_to_resize",
}


@pytest.fixture(scope="session")
def server() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        yield srv


def write_url_file(
    path: Path,
    urls: Sequence[str],
    *,
    captions: Sequence[str] | None = None,
    extra: dict[str, Sequence[Any]] | None = None,
    url_col: str = "url",
    caption_col: str = "caption",
) -> Path:
    """Write a URL file in the format its name says (txt, csv, tsv, json, jsonl, parquet, + .gz)."""
    columns: dict[str, Sequence[Any]] = {url_col: list(urls)}
    if captions is not None:
        columns[caption_col] = list(captions)
    columns.update(extra or {})
    table = pa.table(columns)
    name = path.name
    compress = name.endswith(".gz")
    fmt = name.removesuffix(".gz").rsplit(".", 1)[-1]
    buffer = io.BytesIO()
    if fmt == "txt":
        buffer.write(("\n".join(urls) + "\n").encode())
    elif fmt in ("csv", "tsv"):
        options = pa_csv.WriteOptions(delimiter="\t" if fmt == "tsv" else ",")
        pa_csv.write_csv(table, buffer, write_options=options)
    elif fmt == "json":
        buffer.write(json.dumps(table.to_pylist()).encode())
    elif fmt == "jsonl":
        buffer.write("".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode())
    elif fmt == "parquet":
        pq.write_table(table, buffer)
    else:
        raise ValueError(name)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path
