"""``download_stats``: success and error totals over every shard's stats file, per table."""

# No `from __future__ import annotations` here: Dagster reads the parameter annotations of the
# decorated functions (context, config, resources) at definition time and needs real types.

import dagster as dg

from ..engine.pictures import bar_chart, markdown_image
from ..engine.stats import DatasetStats, aggregate, read_stats_files, stats_path
from ..engine.storage import write_json_atomic
from .resources import StorageResource
from .shards import shards


def collect_stats(storage: StorageResource) -> DatasetStats:
    """Read the stats file of every shard of every staged table."""
    staging = storage.staging_area()
    paths = {}
    for table in staging.tables():
        manifest = staging.manifest(table)
        paths[table] = [
            stats_path(manifest.output_folder, manifest.shard_name(i)) for i in manifest.shard_ids
        ]
    return aggregate(read_stats_files(paths))


def charts(stats: DatasetStats) -> str:
    """Success rate and images/s per table, and the most frequent errors, as images in markdown."""
    tables = stats.per_table.to_dicts()
    errors: dict[str, int] = {}
    for row in stats.errors.iter_rows(named=True):
        errors[row["error"]] = errors.get(row["error"], 0) + row["count"]
    svgs = [
        bar_chart("success rate per table", [(t["table"], 100 * t["success_rate"]) for t in tables], " %"),
        bar_chart("images/s per table", [(t["table"], t["images_per_second"]) for t in tables]),
        bar_chart("most frequent errors", sorted(errors.items(), key=lambda e: -e[1])[:10]),
    ]
    return "\n\n".join(markdown_image(svg.encode(), "image/svg+xml", "chart") for svg in svgs)


@dg.asset(
    deps=[shards],
    group_name="img2ds",
    kinds={"polars"},
    description="Totals, success rate, error breakdown and throughput over all shards, per table.",
)
def download_stats(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    stats = collect_stats(storage)
    path = storage.stats_path()
    write_json_atomic(path, stats.to_json())
    totals = stats.totals
    context.log.info(f"{totals['successes']} of {totals['count']} samples downloaded; stats in {path}")
    return dg.MaterializeResult(
        metadata={
            "tables": dg.MetadataValue.int(stats.per_table.height),
            "shards": dg.MetadataValue.int(totals["shards"]),
            "count": dg.MetadataValue.int(totals["count"]),
            "successes": dg.MetadataValue.int(totals["successes"]),
            "success_rate": dg.MetadataValue.float(round(totals.get("success_rate", 0.0), 4)),
            "failed_to_download": dg.MetadataValue.int(totals["failed_to_download"]),
            "failed_to_resize": dg.MetadataValue.int(totals["failed_to_resize"]),
            "opt_outs": dg.MetadataValue.json(totals["opt_outs"]),
            "retry_waits": dg.MetadataValue.int(totals["retry_waits"]),
            "retry_wait_seconds": dg.MetadataValue.float(round(totals["retry_wait_seconds"], 1)),
            "images_per_second": dg.MetadataValue.float(round(totals.get("images_per_second", 0.0), 1)),
            "summary": dg.MetadataValue.md(stats.markdown()),
            "charts": dg.MetadataValue.md(charts(stats)),
            "stats_file": dg.MetadataValue.path(path),
        }
    )


refresh_stats = dg.define_asset_job(
    "refresh_stats", selection=[download_stats], description="Recount download_stats over every shard."
)


@dg.sensor(
    target=refresh_stats,
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Refreshes download_stats when shards were materialized since its last refresh.",
)
def download_stats_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    # The cursor is the newest shard materialization a refresh was requested for: the refresh reads
    # the files after that, and any later shard has a larger storage id, so none is ever missed.
    # (An automation condition with since_last_handled drops an update that lands on the tick right
    # after a request.)
    latest = context.instance.fetch_materializations(shards.key, limit=1).records
    if not latest:
        return dg.SkipReason("no shard materialized yet")
    newest = latest[0].storage_id
    if context.cursor is not None and newest <= int(context.cursor):
        return dg.SkipReason("no shard materialized since the last refresh")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"download_stats@{newest}")], cursor=str(newest)
    )
