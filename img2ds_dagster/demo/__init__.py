"""The offline demo: serve the bundled sample photos on 127.0.0.1 and turn a URL file pointing at them
into a dataset through the project's Dagster assets and instance (``make demo``)."""

from __future__ import annotations

import contextlib
import csv
import os
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg

from ..defs.partitions import shard_keys
from ..defs.stats import collect_stats
from ..runner import AssetRunner

SAMPLES = Path(__file__).resolve().parent / "samples"
TABLE = "demo"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_samples() -> Iterator[str]:
    """The sample folder over HTTP on an ephemeral loopback port; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(SAMPLES)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_url_file(path: Path, base_url: str) -> int:
    """A CSV of the samples (url, caption) plus two URLs that fail, as a real list would have."""
    rows = [
        (f"{base_url}/{p.name}", p.stem.replace("_", " "))
        for p in sorted(SAMPLES.iterdir())
        if p.suffix in (".jpg", ".png", ".webp")
    ]
    rows += [(f"{base_url}/missing.jpg", "a 404"), (f"{base_url}/SOURCES.md", "not an image")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    return len(rows)


def run_demo() -> int:
    """Download the bundled sample photos from a local server into data/datasets/demo."""
    root = Path.cwd()
    if not (root / "dagster.yaml").exists():
        print("img2ds demo: run it from the project folder (the one with dagster.yaml)")
        return 2
    os.environ.setdefault("DAGSTER_HOME", str(root))
    os.environ.setdefault("IMG2DS_DAGSTER_STORAGE", str(root / "data" / "dagster"))
    # Imported here, after the environment is set: the code location reads its paths from it.
    from ..definitions import defs  # noqa: PLC0415

    url_file = root / "data" / "demo" / "demo_urls.csv"
    with serve_samples() as base_url, dg.DagsterInstance.get() as instance:
        rows = write_url_file(url_file, base_url)
        print(f"Serving {rows - 2} sample photos at {base_url}; URL list: {url_file}")
        assert defs.resources is not None
        runner = AssetRunner(instance, defs.resources)
        manifest = runner.stage_table(
            TABLE,
            {
                "source": str(url_file),
                "caption_col": "caption",
                "output_format": "webdataset",
                "number_sample_per_shard": 4,
            },
        )
        # The URLs change with the server's port, so every run rebuilds every shard.
        outcome = runner.build_shards(shard_keys(manifest))
        runner.refresh_stats()
    storage = defs.resources["storage"]
    print(f"\nurl_tables[{TABLE}] -> {manifest.shard_count} shards -> download_stats")
    print(f"Dataset: {Path(manifest.output_folder).resolve()}")
    for path in sorted(Path(manifest.output_folder).iterdir()):
        print(f"  {path.name:<22} {path.stat().st_size:>9,} bytes")
    print(f"Stats:   {Path(storage.stats_path()).resolve()}\n")
    print(collect_stats(storage).markdown())
    print(f"\nDagster instance: {os.environ['IMG2DS_DAGSTER_STORAGE']} (see it with `make dev`)")
    return 0 if not outcome.failed else 1
