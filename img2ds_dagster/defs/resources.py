"""Resources: where URL files arrive and datasets go, and how much parallelism a shard run uses.

Paths are fsspec URLs; relative ones are relative to the code location's working directory (the
project folder, as ``workspace.yaml`` sets it).
"""

from __future__ import annotations

import dagster as dg
import fsspec

from ..engine.shard import Workers
from ..engine.sources import INPUT_FORMATS, Staging, input_format_of, table_key
from ..engine.storage import join
from ..errors import InputTableError


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
            if info["type"] != "file" or name.startswith((".", "_")) or input_format_of(name) is None:
                continue
            path = fs.unstrip_protocol(info["name"]) if "://" in self.inbox else info["name"]
            found.append((path, _arrival(info)))
        return sorted(found, key=lambda f: (f[1], f[0]))

    def inbox_file(self, table: str) -> str:
        """The inbox file whose name gives the partition key ``table``."""
        matches = [path for path, _ in self.inbox_files() if table_key(path) == table]
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


class WorkersResource(dg.ConfigurableResource):
    """Parallelism of shard runs. It changes speed, never the output, so it is not part of a table's
    settings and can differ between the runs of one table. A run is one process: its threads use
    every core; run more runs at once (dagster.yaml) to use more machines."""

    thread_count: int = 256  # download threads per shard
    parallel_shards: int = 2  # shards of a run built at once
    cpu_threads: int = 0  # images processed at once; 0: one per core
    spool_dir: str | None = None

    def workers(self) -> Workers:
        return Workers(
            thread_count=self.thread_count,
            parallel_shards=self.parallel_shards,
            cpu_threads=self.cpu_threads,
            spool_dir=self.spool_dir,
        )
