"""``export_buckets()``: the bucketed export of a finished ``download()`` output folder, beside
``download()`` (``img2ds export-buckets OUTPUT_FOLDER DEST`` from the shell). The Dagster asset
``bucketed_dataset`` makes the same export per table."""

from __future__ import annotations

import contextlib

from .api import STATE_FOLDER, _staging_folder, _state_folder
from .engine.export import DEFAULT_SAMPLES_PER_TAR, ExportReport, ExportSettings, export_tables, folder_source
from .engine.sources import Staging, TableManifest
from .engine.storage import absolute, join
from .errors import ExportError, StagingMissingError


def export_buckets(
    output_folder: str,
    destination: str,
    samples_per_tar: int = DEFAULT_SAMPLES_PER_TAR,
    dedup: bool = True,
) -> ExportReport:
    """Regroup the finished shards of ``output_folder`` (built with ``resize_mode="bucket"``) into
    ``destination``: ``buckets/<bucket_id>/shard-NNNNN.tar`` of ``samples_per_tar`` samples and a
    ``manifest.json`` (format ``bucketed_shards_v1``), exact duplicates by source SHA-256 dropped
    when ``dedup``. Both are fsspec URLs. Run again after more shards finished, it rewrites only the
    tars that changed."""
    output_folder = absolute(output_folder)
    destination = absolute(destination)
    if destination.rstrip("/") == output_folder.rstrip("/"):
        raise ExportError(f"destination: {destination} is the output folder itself; export to another folder")
    settings = ExportSettings(samples_per_tar=samples_per_tar, dedup=dedup)
    source = folder_source(output_folder, _manifests(output_folder))
    if not source.shards:
        raise ExportError(
            f"{output_folder}: no finished shard (a shard is finished once its _stats.json exists)"
        )
    return export_tables([source], destination, settings)


def _manifests(output_folder: str) -> list[TableManifest]:
    """The staging manifests of the tables ``download()`` wrote into ``output_folder``, where they
    are still around (they give the export the tables' settings and input fingerprints)."""
    roots = {
        _staging_folder(output_folder, _state_folder(output_folder), "multiprocessing"),
        join(output_folder, STATE_FOLDER, "staging"),
    }
    found: dict[str, TableManifest] = {}
    for root in sorted(roots):
        staging = Staging(root)
        with contextlib.suppress(FileNotFoundError, OSError):
            for table in staging.tables():
                with contextlib.suppress(StagingMissingError, FileNotFoundError, ValueError):
                    manifest = staging.manifest(table)
                    if absolute(manifest.output_folder).rstrip("/") == output_folder.rstrip("/"):
                        found[table] = manifest
    return sorted(found.values(), key=lambda m: m.first_shard_id)
