"""Resources: where URL files arrive and datasets go, how much parallelism a shard run uses, and
the S3 client and inbox of ``s3_url_drop_sensor``.

Paths are fsspec URLs; relative ones are relative to the code location's working directory (the
project folder, as ``workspace.yaml`` sets it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import dagster as dg
import fsspec
import pydantic

from ..engine.settings import DistributorName
from ..engine.shard import Workers
from ..engine.sources import INPUT_FORMATS, Staging, table_key
from ..engine.storage import join
from ..errors import InputTableError, StagingMissingError
from .inbox import is_url_file, split_s3_url

if TYPE_CHECKING:
    from dagster_aws.s3 import S3Resource


class StorageResource(dg.ConfigurableResource):
    """The inbox of URL files, the staging area of shard inputs, and the root of the datasets."""

    inbox: str = "data/inbox"
    staging: str = "data/staging"
    datasets: str = "data/datasets"
    stats_file: str | None = None  # default: <datasets>/download_stats.json
    inbox_settle_seconds: float = 2.0  # files younger than this may still be being written

    def staging_area(self) -> Staging:
        return Staging(self.staging)

    def dataset_folder(self, table: str) -> str:
        return join(self.datasets, table)

    def stats_path(self) -> str:
        return self.stats_file or join(self.datasets, "download_stats.json")

    def inbox_files(self) -> list[tuple[str, float]]:
        """URL files in the inbox as (path, arrival time), oldest first; hidden and temporary files
        are skipped."""
        fs, root = fsspec.core.url_to_fs(self.inbox)
        if not fs.exists(root):
            return []
        found = []
        for info in fs.ls(root, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info["type"] != "file" or not is_url_file(name):
                continue
            path = fs.unstrip_protocol(info["name"]) if "://" in self.inbox else info["name"]
            found.append((path, _arrival(info)))
        return sorted(found, key=lambda f: (f[1], f[0]))

    def inbox_file(self, table: str) -> str:
        """The inbox file whose name gives the partition key ``table``; for a table staged before
        from a file that is not in this inbox (the S3 inbox's, or a ``source``), that file again."""
        matches = [path for path, _ in self.inbox_files() if table_key(path) == table]
        if not matches:
            with contextlib.suppress(StagingMissingError):
                return self.staging_area().manifest(table).source
        if len(matches) != 1:
            problem = "no file" if not matches else f"several files ({matches})"
            raise InputTableError(
                f"url_tables[{table}]: {problem} in the inbox {self.inbox} is named {table}.<format> "
                f"(formats: {', '.join(INPUT_FORMATS)}); pass config.source to name the file"
            )
        return matches[0]


def _arrival(info: dict[str, object]) -> float:
    """When a file arrived. Locally the later of mtime and ctime: ``mv`` and ``cp -p`` keep an old
    mtime but set ctime, and a file moved in after a newer one must still count as new. Object
    stores report the upload time ("LastModified", a datetime)."""
    times = [info.get(k) for k in ("mtime", "created", "LastModified", "last_modified")]
    return max((_seconds(t) for t in times if t is not None), default=0.0)


def _seconds(value: object) -> float:
    timestamp = getattr(value, "timestamp", None)
    return float(timestamp()) if callable(timestamp) else float(value)  # type: ignore[arg-type]


_WORKERS = Workers()


class WorkersResource(dg.ConfigurableResource):
    """Parallelism of shard runs, and where their shards are built. It changes speed, never the
    output, so it is not part of a table's settings and can differ between the runs of one table.
    With the default distributor a run is one process, whose threads use every core; run more runs
    at once (dagster.yaml) to use more machines, or send each run's shards to a Ray or Spark cluster
    (``distributor`` and ``cluster``; deploy/README.md)."""

    # The engine's defaults (engine/shard.py's Workers says what each one is).
    thread_count: int = _WORKERS.thread_count
    parallel_shards: int = _WORKERS.parallel_shards
    cpu_threads: int = _WORKERS.cpu_threads
    spool_dir: str | None = _WORKERS.spool_dir
    max_connections_per_host: int = _WORKERS.max_connections_per_host
    min_request_interval: float = _WORKERS.min_request_interval
    host_failure_limit: int = _WORKERS.host_failure_limit
    distributor: DistributorName = _WORKERS.distributor
    cluster: str | None = _WORKERS.cluster
    task_retries: int = _WORKERS.task_retries
    shared_filesystem: bool = _WORKERS.shared_filesystem

    def workers(self) -> Workers:
        return Workers(
            thread_count=self.thread_count,
            parallel_shards=self.parallel_shards,
            cpu_threads=self.cpu_threads,
            spool_dir=self.spool_dir,
            max_connections_per_host=self.max_connections_per_host,
            min_request_interval=self.min_request_interval,
            host_failure_limit=self.host_failure_limit,
            distributor=self.distributor,
            cluster=self.cluster,
            task_retries=self.task_retries,
            shared_filesystem=self.shared_filesystem,
        )


class S3InboxResource(dg.ConfigurableResource):
    """An S3 prefix that URL files are dropped under (``s3://bucket/prefix/``), for
    ``s3_url_drop_sensor``. Its settings files live under the same prefix."""

    url: str
    # Ticks between two full listings of the prefix; the ticks in between list only the keys that sort
    # after the last one listed. At the sensor's 10 s interval, 30 is a full listing every 5 minutes.
    full_listing_every: int = 30
    # A file whose LastModified is this much older than the newest file picked up, and that sorts
    # before it, is taken for one picked up already. A multipart upload's LastModified is when it
    # started: this must exceed the longest upload plus the time between two full listings.
    late_upload_window_seconds: float = 3600.0

    @pydantic.field_validator("url")
    @classmethod
    def _an_s3_prefix(cls, url: str) -> str:
        split_s3_url(url)  # a bad IMG2DS_S3_INBOX stops the code location from loading, named
        return url

    def bucket_and_prefix(self) -> tuple[str, str]:
        return split_s3_url(self.url)


# The standard AWS variables, read by boto3 and by botocore under s3fs alike: one set configures this
# resource and every s3:// path (inbox, staging, datasets, url_list, output_folder), in every process.
S3_ENV_VARS = {
    "endpoint_url": "AWS_ENDPOINT_URL",  # S3-compatible stores (MinIO, R2, moto); unset: AWS
    "region_name": "AWS_DEFAULT_REGION",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
}


def s3_resource(environ: Mapping[str, str] = os.environ) -> S3Resource:
    """dagster-aws's S3Resource, configured from the AWS variables that are set. Each is passed as a
    ``dg.EnvVar``: Dagster resolves it when the resource is used, and the UI shows the variable's
    name, never its value. Unset variables are left to boto3's usual lookup (profile, instance role)."""
    # Imported here: dagster_aws takes half a second to import, which download() does not need.
    from dagster_aws.s3 import S3Resource  # noqa: PLC0415

    config: dict[str, Any] = {field: dg.EnvVar(var) for field, var in S3_ENV_VARS.items() if environ.get(var)}
    return S3Resource(**config)
