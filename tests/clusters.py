"""What the Ray and Spark tests share: an S3 server whose variables every cluster process inherits
(they are set before the cluster starts), a staged table on it, and reading shards back."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import write_url_file
from imageserver import ImageServer
from s3server import S3Server

from img2ds_dagster.engine.distribute import build_shards
from img2ds_dagster.engine.settings import DownloadSettings
from img2ds_dagster.engine.shard import ShardJob, ShardResult, Workers
from img2ds_dagster.engine.sources import Staging, TableManifest
from img2ds_dagster.errors import ShardError

BUCKET = "datasets"
ROWS_PER_SHARD = 4


@contextmanager
def s3_for_clusters() -> Iterator[S3Server]:
    """The S3 server, with its variables in this process's environment until the end (a cluster
    started meanwhile passes them on to its workers), and a bucket."""
    s3fs_class = fsspec.get_filesystem_class("s3")
    with S3Server() as server, pytest.MonkeyPatch.context() as env:
        for name, value in server.environ().items():
            env.setenv(name, value)
        s3fs_class.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield server
    s3fs_class.clear_instance_cache()


def stage_table(
    server: ImageServer, tmp_path: Path, root: str, table: str, *, shards: int, path: str = "/gen/64x48.jpg"
) -> tuple[Staging, TableManifest]:
    """A table of ``shards`` shards of small images, staged under ``root``, its output under
    ``root``/out/<table>: on S3 when ``root`` is an s3:// URL."""
    urls = [server.url(f"{path}?t={table}&i={i}") for i in range(shards * ROWS_PER_SHARD)]
    source = write_url_file(tmp_path / f"{table}.csv", urls, captions=[f"c{i}" for i in range(len(urls))])
    settings = DownloadSettings.from_flags(
        caption_col="caption",
        number_sample_per_shard=ROWS_PER_SHARD,
        output_format="webdataset",
        timeout=10,
        retries=1,
    )
    staging = Staging(f"{root}/staging")
    return staging, staging.stage(table, str(source), settings, f"{root}/out/{table}")


def build_all(
    staging: Staging, manifest: TableManifest, workers: Workers
) -> dict[ShardJob, ShardResult | ShardError]:
    """Every shard of the table through the distributor ``workers`` names; each must come once."""
    jobs = [ShardJob(manifest.table, i, manifest.shard_name(i)) for i in manifest.shard_ids]
    results: dict[ShardJob, ShardResult | ShardError] = {}
    for job, result in build_shards(staging.root, jobs, workers):
        assert job not in results, f"{job} came back twice"
        results[job] = result
    assert set(results) == set(jobs)
    return results


def shard_files(manifest: TableManifest) -> dict[str, bytes]:
    """Each shard's tar, by shard name."""
    out = {}
    for i in manifest.shard_ids:
        name = manifest.shard_name(i)
        with fsspec.open(f"{manifest.output_folder}/{name}.tar", "rb") as f:
            out[name] = f.read()
    return out


def assert_every_row_once(manifest: TableManifest) -> None:
    """Each shard's parquet has each of its rows once, with a status, and its tar each success once."""
    for i in manifest.shard_ids:
        name = manifest.shard_name(i)
        with fsspec.open(f"{manifest.output_folder}/{name}.parquet", "rb") as f:
            rows = pq.read_table(f).to_pylist()
        assert len(rows) == ROWS_PER_SHARD
        assert len({r["key"] for r in rows}) == ROWS_PER_SHARD
        assert all(r["status"] for r in rows)
        tar_bytes = shard_files(manifest)[name]
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            names = tar.getnames()
        successes = [r["key"] for r in rows if r["status"] == "success"]
        assert sorted(n for n in names if n.endswith(".jpg")) == sorted(f"{k}.jpg" for k in successes)


def shard_stats(manifest: TableManifest) -> list[dict[str, Any]]:
    """Each shard's stats file."""
    stats = []
    for i in manifest.shard_ids:
        with fsspec.open(f"{manifest.output_folder}/{manifest.shard_name(i)}_stats.json", "r") as f:
            stats.append(json.load(f))
    return stats


def workers_seen(manifest: TableManifest) -> set[str]:
    """Where each shard was built, as its stats file says."""
    return {stats["worker"] for stats in shard_stats(manifest)}


def started_shards(server: ImageServer, table: str, shards: int) -> Callable[[], set[int]]:
    """A function that tells which of stage_table's shards have had a request at the server yet."""

    def started() -> set[int]:
        rows = {key.rpartition(f"?t={table}&i=")[2] for key in server.hits.snapshot()}
        return {int(row) // ROWS_PER_SHARD for row in rows if row.isdigit()} & set(range(shards))

    return started


def in_process_tars(
    server: ImageServer, tmp_path: Path, table: str, shards: int, path: str
) -> dict[str, bytes]:
    """The same table built by the in-process distributor on local disk: the reference bytes."""
    staging, manifest = stage_table(
        server, tmp_path / "local", str(tmp_path / "local"), table, shards=shards, path=path
    )
    results = build_all(staging, manifest, Workers(thread_count=4))
    assert all(isinstance(r, ShardResult) for r in results.values())
    return shard_files(manifest)
