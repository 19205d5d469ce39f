"""``bucketed_dataset``: one partition per URL table, the bucketed export (``bucketed_shards_v1``,
engine/export.py) of the table's finished shards; and the sensor that refreshes it as they finish."""

# No `from __future__ import annotations` here: Dagster reads the parameter annotations of the
# decorated functions (context, config, resources) at definition time and needs real types.

import json
from typing import Literal

import dagster as dg

from ..engine.export import (
    DEFAULT_SAMPLES_PER_TAR,
    ExportReport,
    ExportSettings,
    SourceTable,
    export_tables,
    source_table,
)
from ..engine.sources import Staging
from ..engine.storage import join
from ..errors import ExportError, StagingMissingError
from .partitions import RANGE_END_TAG, RANGE_START_TAG, URL_TABLES, url_tables_partitions
from .resources import StorageResource
from .shards import shards


class BucketExportConfig(dg.Config):
    """How a table's bucketed export is made."""

    samples_per_tar: int = DEFAULT_SAMPLES_PER_TAR
    dedup: bool = True
    # "table": duplicates within the table; "all": also the samples of the bucket-mode tables
    # registered before it
    dedup_scope: Literal["table", "all"] = "table"
    destination: str | None = None  # default: <datasets>/bucketed/<table>


@dg.asset(
    partitions_def=url_tables_partitions,
    # As for shards -> url_tables: the edge shows the lineage, and Dagster has no mapping from a
    # table's key to its many shard keys (design/dagster-findings.md).
    deps=[dg.AssetDep(shards, partition_mapping=dg.SpecificPartitionsPartitionMapping([]))],
    group_name="img2ds",
    kinds={"webdataset"},
    description=(
        "A table's finished bucket-mode shards regrouped by aspect-ratio bucket, exact duplicates "
        "removed, with a manifest.json (bucketed_shards_v1)."
    ),
)
def bucketed_dataset(
    context: dg.AssetExecutionContext, config: BucketExportConfig, storage: StorageResource
) -> dg.MaterializeResult:
    table = context.partition_key
    staging = storage.staging_area()
    try:
        settings = ExportSettings(config.samples_per_tar, config.dedup, config.dedup_scope)
        source = source_table(staging.manifest(table))
        earlier = _earlier_tables(context.instance, staging, table) if config.dedup_scope == "all" else []
    except (ExportError, StagingMissingError) as err:  # the same on a retry
        raise dg.Failure(description=str(err), allow_retries=False) from err
    if not source.shards:
        raise dg.Failure(
            description=f"table {table}: no finished shard yet; materialize its shards first",
            allow_retries=False,
        )
    destination = config.destination or join(storage.datasets, "bucketed", table)
    try:
        report = export_tables([source], destination, settings, earlier)
    except ExportError as err:
        raise dg.Failure(description=str(err), allow_retries=False) from err
    totals = report.manifest["totals"]
    context.log.info(
        f"{table}: {totals['samples']} samples in {totals['tars']} tars to {destination} "
        f"({report.tars_written} written, {report.tars_kept} kept"
        + (f"; all written: {report.rewrote_all}" if report.rewrote_all else "")
        + ")"
    )
    return dg.MaterializeResult(metadata=export_metadata(report, source))


def _earlier_tables(instance: dg.DagsterInstance, staging: Staging, table: str) -> list[SourceTable]:
    """The bucket-mode tables registered before ``table``, with their finished shards."""
    keys = instance.get_dynamic_partitions(URL_TABLES)
    earlier = keys[: keys.index(table)] if table in keys else []
    found = []
    for key in earlier:
        try:
            found.append(source_table(staging.manifest(key)))
        except (ExportError, StagingMissingError):
            continue  # not staged, or not in bucket mode: none of its samples is in an export
    return found


def export_metadata(report: ExportReport, source: SourceTable) -> dict[str, dg.MetadataValue]:
    manifest = report.manifest
    totals = manifest["totals"]
    columns = [
        dg.TableColumn("bucket_id", "string"),
        dg.TableColumn("target", "string"),
        dg.TableColumn("samples", "int"),
        dg.TableColumn("tars", "int"),
    ]
    records = [
        dg.TableRecord(
            {
                "bucket_id": b["bucket_id"],
                "target": f"{b['target_width']}x{b['target_height']}",
                "samples": b["count"],
                "tars": len(b["shards"]),
            }
        )
        for b in sorted(manifest["buckets"], key=lambda b: -b["count"])
    ]
    return {
        "samples": dg.MetadataValue.int(totals["samples"]),
        "buckets": dg.MetadataValue.table(records, schema=dg.TableSchema(columns=columns)),
        "tars": dg.MetadataValue.int(totals["tars"]),
        "tars_written": dg.MetadataValue.int(report.tars_written),
        "tars_kept": dg.MetadataValue.int(report.tars_kept),
        "rewrote_all": dg.MetadataValue.text(report.rewrote_all or "no"),
        "duplicates_removed": dg.MetadataValue.int(totals["duplicates_removed"]),
        "caption_coverage": dg.MetadataValue.float(totals["caption_coverage"]),
        "source_successes": dg.MetadataValue.int(totals["source_successes"]),
        "shards_exported": dg.MetadataValue.int(len(source.shards)),
        "shards_total": dg.MetadataValue.int(source.shards_total or len(source.shards)),
        "export_id": dg.MetadataValue.text(manifest["export_id"]),
        "samples_per_second": dg.MetadataValue.float(round(report.samples_per_second, 1)),
        "manifest": dg.MetadataValue.path(join(report.destination, "manifest.json")),
    }


export_buckets = dg.define_asset_job(
    "export_buckets",
    selection=[bucketed_dataset],
    description="Regroup a bucket-mode table's shards into its bucketed export (pick the table).",
)
# How many shard materializations a tick reads at most (the next tick reads on from its cursor).
_TICK_RECORDS = 10_000
_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dg.sensor(
    target=export_buckets,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Refreshes the bucketed_dataset of each bucket-mode table whose shards were materialized "
        "since its last refresh, once no run of its shards is queued or running (a refresh rewrites "
        "only the tars that changed)."
    ),
)
def bucketed_dataset_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    # The cursor: the newest shard materialization read, and the tables with new shards whose
    # refresh waits for their shard runs to end. Later shards have larger storage ids.
    cursor = json.loads(context.cursor) if context.cursor else {"after": None, "waiting": []}
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=shards.key, after_storage_id=cursor["after"]),
        limit=_TICK_RECORDS,
        ascending=True,
    )
    newest = max((r.storage_id for r in result.records), default=cursor["after"])
    touched = {(r.partition_key or "").rpartition("/")[0] for r in result.records} - {""}
    staging = storage.staging_area()
    candidates = sorted(touched | set(cursor["waiting"]))
    bucketed = [t for t in candidates if _bucket_mode(staging, t)]
    busy = _tables_in_flight(context.instance)
    ready = [t for t in bucketed if t not in busy]
    waiting = [t for t in bucketed if t in busy]
    next_cursor = json.dumps({"after": newest, "waiting": waiting})
    if not ready:
        why = (
            f"waiting for the shard runs of {waiting}"
            if waiting
            else "no shard of a bucket-mode table materialized since the last refresh"
        )
        return dg.SensorResult(skip_reason=dg.SkipReason(why), cursor=next_cursor)
    requests = [dg.RunRequest(partition_key=t, run_key=f"bucketed_dataset:{t}@{newest}") for t in ready]
    return dg.SensorResult(run_requests=requests, cursor=next_cursor)


def _bucket_mode(staging: Staging, table: str) -> bool:
    try:
        return staging.manifest(table).settings.image.resize_mode == "bucket"
    except StagingMissingError:
        return False


def _tables_in_flight(instance: dg.DagsterInstance) -> set[str]:
    """The tables whose shards a queued or running run builds (by its partition or range tags)."""
    busy = set()
    for record in instance.get_run_records(dg.RunsFilter(statuses=_IN_FLIGHT)):
        tags = record.dagster_run.tags
        for tag in ("dagster/partition", RANGE_START_TAG, RANGE_END_TAG):
            key = tags.get(tag, "")
            if "/" in key:
                busy.add(key.rpartition("/")[0])
    return busy
