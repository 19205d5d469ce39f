"""Per-shard statistics (img2dataset's ``<shard>_stats.json``) and their aggregation across shards.

Aggregation reads the files the shards wrote, with polars, not Dagster's event log: the files are
the dataset's own record and stay correct when shards are rebuilt outside Dagster.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import polars as pl

STATS_SUFFIX = "_stats.json"
# Counts summed over shards; the last ones are not in img2dataset's stats files (0 when absent).
COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize", "retry_waits")


def stats_path(folder: str, shard_name: str) -> str:
    """Where a shard's stats file is: ``<folder>/<shard name>_stats.json``, as img2dataset names it."""
    return f"{folder.rstrip('/')}/{shard_name}{STATS_SUFFIX}"


@dataclass(slots=True)
class ShardStats:
    """Counts for one shard; ``to_json()`` gives img2dataset's stats file, key for key."""

    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    start_time: float = 0.0
    end_time: float = 0.0
    status_dict: Counter[str] = field(default_factory=Counter)
    # Not in img2dataset's file: the waits before retries (Retry-After, backoff), count and seconds.
    retry_waits: int = 0
    retry_wait_seconds: float = 0.0
    # Not in img2dataset's file either: the samples each kind of site signal refused (fetch.py),
    # and where the shard was built (the host and process, or the cluster's node or executor).
    opt_outs: Counter[str] = field(default_factory=Counter)
    worker: str = ""

    def add(
        self, status: str, error: str | None, waits: int = 0, waited: float = 0.0, opt_out: str | None = None
    ) -> None:
        self.count += 1
        self.retry_waits += waits
        self.retry_wait_seconds += waited
        if opt_out is not None:
            self.opt_outs[opt_out] += 1
        if status == "success":
            self.successes += 1
            self.status_dict["success"] += 1
            return
        if status == "failed_to_download":
            self.failed_to_download += 1
        else:
            self.failed_to_resize += 1
        self.status_dict[error or status] += 1

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time

    def top_errors(self, n: int = 5) -> list[tuple[str, int]]:
        return [(k, v) for k, v in self.status_dict.most_common() if k != "success"][:n]

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "successes": self.successes,
            "failed_to_download": self.failed_to_download,
            "failed_to_resize": self.failed_to_resize,
            "duration": self.duration,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "status_dict": dict(self.status_dict),
            "retry_waits": self.retry_waits,
            "retry_wait_seconds": round(self.retry_wait_seconds, 3),
            "opt_outs": dict(sorted(self.opt_outs.items())),
            "worker": self.worker,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardStats:
        """The stats a shard's stats file holds (``to_json()``'s keys; ours 0 or empty if absent)."""
        return cls(
            count=data["count"],
            successes=data["successes"],
            failed_to_download=data["failed_to_download"],
            failed_to_resize=data["failed_to_resize"],
            start_time=data["start_time"],
            end_time=data["end_time"],
            status_dict=Counter(data.get("status_dict", {})),
            retry_waits=data.get("retry_waits", 0),
            retry_wait_seconds=data.get("retry_wait_seconds", 0.0),
            opt_outs=Counter(data.get("opt_outs", {})),
            worker=data.get("worker", ""),
        )


@dataclass(frozen=True, slots=True)
class DatasetStats:
    """Totals over many shards, per table and overall."""

    per_table: pl.DataFrame  # one row per table
    errors: pl.DataFrame  # table, error, count (most frequent first)
    opt_outs: dict[str, int] = field(default_factory=dict)  # samples refused, per kind of site signal

    @property
    def totals(self) -> dict[str, Any]:
        t = self.per_table
        if t.is_empty():
            return {"shards": 0, **dict.fromkeys(COUNTS, 0), "retry_wait_seconds": 0.0, "opt_outs": {}}
        sums = t.select(pl.col("shards", *COUNTS, "retry_wait_seconds").sum())
        out: dict[str, Any] = sums.row(0, named=True)
        out["success_rate"] = out["successes"] / out["count"] if out["count"] else 0.0
        out["download_seconds"] = float(t["download_seconds"].sum())
        # Tables are usually downloaded one after another: rate over the sum of their busy times.
        wall = float(t["busy_seconds"].sum())
        out["images_per_second"] = out["count"] / wall if wall > 0 else 0.0
        out["opt_outs"] = self.opt_outs
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "totals": self.totals,
            "tables": self.per_table.to_dicts(),
            "top_errors": self.errors.head(20).to_dicts(),
        }

    def markdown(self) -> str:
        """A markdown table per table plus the most frequent errors, for the Dagster UI."""
        lines = [
            "| table | shards | count | successes | success rate | failed to download | failed to resize "
            "| images/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.per_table.iter_rows(named=True):
            lines.append(
                f"| {r['table']} | {r['shards']} | {r['count']} | {r['successes']} | {r['success_rate']:.1%} "
                f"| {r['failed_to_download']} | {r['failed_to_resize']} | {r['images_per_second']:.1f} |"
            )
        if not self.errors.is_empty():
            lines += ["", "| table | error | count |", "|---|---|---:|"]
            for r in self.errors.head(20).iter_rows(named=True):
                message = str(r["error"]).replace("|", "\\|").replace("\n", " ")[:200]
                lines.append(f"| {r['table']} | {message} | {r['count']} |")
        return "\n".join(lines)


def read_stats_files(paths_by_table: dict[str, list[str]]) -> pl.DataFrame:
    """One row per shard stats file: table, shard, counts, times and the status dict as JSON."""
    records = []
    for table, paths in paths_by_table.items():
        if not paths:
            continue
        fs, _ = fsspec.core.url_to_fs(paths[0])
        for path, raw in fs.cat(paths, on_error="omit").items():
            data = json.loads(raw)
            records.append(
                {
                    "table": table,
                    "shard": str(path).rsplit("/", 1)[-1].removesuffix(STATS_SUFFIX),
                    **{k: data.get(k, 0) for k in COUNTS},
                    "retry_wait_seconds": float(data.get("retry_wait_seconds", 0.0)),
                    "start_time": float(data["start_time"]),
                    "end_time": float(data["end_time"]),
                    "status_dict": json.dumps(data.get("status_dict", {})),
                    "opt_outs": json.dumps(data.get("opt_outs", {})),
                }
            )
    schema = {
        "table": pl.String,
        "shard": pl.String,
        **dict.fromkeys(COUNTS, pl.Int64),
        "retry_wait_seconds": pl.Float64,
        "start_time": pl.Float64,
        "end_time": pl.Float64,
        "status_dict": pl.String,
        "opt_outs": pl.String,
    }
    return pl.DataFrame(records, schema=schema)


def aggregate(shards: pl.DataFrame) -> DatasetStats:
    """Per-table totals and error counts from ``read_stats_files``' frame."""
    per_table = (
        shards.group_by("table")
        .agg(
            pl.len().alias("shards"),
            pl.col(*COUNTS, "retry_wait_seconds").sum(),
            (pl.col("end_time") - pl.col("start_time")).sum().alias("download_seconds"),
            (pl.col("end_time").max() - pl.col("start_time").min()).alias("wall_seconds"),
        )
        .join(_busy_seconds(shards), on="table", how="left")
        .with_columns(
            (pl.col("successes") / pl.col("count")).fill_nan(0.0).alias("success_rate"),
            # Shards of a table run several at a time, and some are rebuilt hours later: the rate is
            # over the time some shard of the table was being built (the union of their spans), so
            # neither the overlap nor the idle time between a build and a rebuild counts.
            (pl.col("count") / pl.col("busy_seconds"))
            .fill_nan(0.0)
            .fill_null(0.0)
            .alias("images_per_second"),
        )
        .sort("table")
    )
    errors = _error_counts(shards)
    opt_outs: Counter[str] = Counter()
    for raw in shards["opt_outs"]:
        opt_outs.update(json.loads(raw))
    return DatasetStats(per_table=per_table, errors=errors, opt_outs=dict(sorted(opt_outs.items())))


def _busy_seconds(shards: pl.DataFrame) -> pl.DataFrame:
    """Per table, the length of the union of its shards' [start, end] spans."""
    busy: dict[str, float] = {}
    ordered = shards.select("table", "start_time", "end_time").sort("table", "start_time")
    current: tuple[str, float, float] | None = None
    for table, start, end in ordered.iter_rows():
        if current is not None and current[0] == table and start <= current[2]:
            current = (table, current[1], max(current[2], end))
            continue
        if current is not None:
            busy[current[0]] = busy.get(current[0], 0.0) + current[2] - current[1]
        current = (table, start, end)
    if current is not None:
        busy[current[0]] = busy.get(current[0], 0.0) + current[2] - current[1]
    return pl.DataFrame(
        {"table": list(busy), "busy_seconds": list(busy.values())},
        schema={"table": pl.String, "busy_seconds": pl.Float64},
    )


def _error_counts(shards: pl.DataFrame) -> pl.DataFrame:
    counts: dict[tuple[str, str], int] = {}
    for table, status_json in shards.select("table", "status_dict").iter_rows():
        for error, n in json.loads(status_json).items():
            if error != "success":
                counts[(table, error)] = counts.get((table, error), 0) + n
    frame = pl.DataFrame(
        [{"table": t, "error": e, "count": n} for (t, e), n in counts.items()],
        schema={"table": pl.String, "error": pl.String, "count": pl.Int64},
    )
    return frame.sort(["count", "table", "error"], descending=[True, False, False])
