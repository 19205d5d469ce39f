"""``shards``: one partition per shard. A run builds one or several shards (a backfill groups up to
``shards_per_run()`` of them, IMG2DS_SHARDS_PER_RUN) and records one materialization per shard as
each finishes."""

# No `from __future__ import annotations` here: Dagster reads the parameter annotations of the
# decorated functions (context, config, resources) at definition time and needs real types.

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from ..config import ShardsConfig
from ..engine import progress
from ..engine.distribute import build_shards
from ..engine.shard import ShardResult
from ..engine.sources import TableManifest
from ..engine.verify import ShardReport
from ..errors import ConfigError, ShardError
from .checks import contact_sheet_metadata, inspect_shard, log_shard_checks, shard_check_specs, step_results
from .partitions import shard_job, shard_keys, shards_partitions, shards_per_run
from .resources import StorageResource, WorkersResource
from .url_tables import url_tables

# BackfillPolicy is a beta parameter in Dagster 1.13; we rely on it on purpose (several shards per
# backfill run), so its warning is silenced here rather than shown to every user at import.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

    @dg.asset(
        partitions_def=shards_partitions,
        # The shards of a table depend on that table, but Dagster cannot map one dynamic key to many:
        # an empty specific mapping keeps the lineage edge without a per-partition dependency. A bare
        # dependency would infer an identity mapping, and every backfill would then fail.
        deps=[dg.AssetDep(url_tables, partition_mapping=dg.SpecificPartitionsPartitionMapping([]))],
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=shards_per_run()),
        retry_policy=dg.RetryPolicy(
            max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
        ),
        pool="img2ds_download",
        output_required=False,
        check_specs=shard_check_specs(),
        group_name="img2ds",
        # No format badge: the format is a table's setting (each materialization names it).
        description="One shard of a URL table: images downloaded, resized and written with their metadata.",
    )
    def shards(
        context: dg.AssetExecutionContext,
        config: ShardsConfig,
        storage: StorageResource,
        workers: WorkersResource,
    ) -> Iterator[dg.AssetMaterialization | dg.AssetCheckResult]:
        keys = context.partition_keys
        done = _materialized_in_this_run(context) if context.retry_number > 0 else set()
        if done:
            context.log.info(f"retry {context.retry_number}: skipping {len(done)} shards finished before")
        try:
            settings = dataclasses.replace(workers.workers(), retry_failed=config.retry_failed)
        except ConfigError as err:  # the same on every retry: not retried
            raise dg.Failure(description=str(err), allow_retries=False) from err
        jobs = {shard_job(key): key for key in keys if key not in done}
        failed: dict[str, ShardError] = {}
        staging = storage.staging_area()
        reports: dict[str, tuple[ShardReport, float]] = {}
        per_shard_checks = len(keys) > 1  # see checks.py
        tally = progress.Tally(total=len(jobs))
        for job, result in build_shards(staging.root, list(jobs), settings):
            key = jobs[job]
            if isinstance(result, ShardError):
                failed[key] = result
                context.log.error(f"{key} failed: {result}")
                continue
            manifest = staging.manifest(result.table)
            report = inspect_shard(manifest, result)
            threshold = manifest.settings.output.min_success_rate
            reports[key] = (report, threshold)
            yield shard_materialization(context.asset_key, key, result, contact_sheet_metadata(report))
            if per_shard_checks:
                log_shard_checks(context, key, report, threshold)
            tally.add(result)
            context.log.info(f"{key} done; this run: {tally.line()}")
            progress.shard_done(result)
        if failed:
            raise dg.Failure(
                description=f"{len(failed)} of {len(jobs)} shards failed: "
                + "; ".join(map(str, failed.values())),
                metadata={"failed_shards": dg.MetadataValue.json(sorted(failed))},
            )
        yield from step_results(reports, per_shard_checks)


def _materialized_in_this_run(context: dg.AssetExecutionContext) -> set[str]:
    """Shards this run already recorded before a retry (a retry re-runs the whole step)."""
    records = context.instance.get_records_for_run(
        run_id=context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    return {r.partition_key for r in records if r.asset_key == context.asset_key and r.partition_key}


INPUT_FINGERPRINT = "input_fingerprint"
# Each shard materialization's data version is its input fingerprint. Dagster indexes that one tag
# of asset events in a table of its own, so the latest fingerprint of every shard of a table comes
# from one query per batch of keys, without reading the events: the whole re-stage tick of a table
# of 200,000 built shards takes 5.0 s on Postgres, where reading each latest event's metadata took
# 0.32 ms per shard, 64 s (benchmarks/orchestration.py). Batches keep the query's key list under
# sqlite's variable limit.
_TAG_BATCH = 10_000


def recorded_fingerprints(
    instance: dg.DagsterInstance, keys: Sequence[str], batch: int = 500, page: int = 1000
) -> dict[str, str | None]:
    """The input fingerprint (sources.py) each of these shards' latest materialization recorded, by
    key; None when it recorded none, and no entry for a shard never materialized."""
    storage = instance.event_log_storage
    found: dict[str, str | None] = {}
    untagged: list[str] = []
    for start in range(0, len(keys), _TAG_BATCH):
        wanted = list(keys[start : start + _TAG_BATCH])
        tags = storage.get_latest_tags_by_partition(
            shards.key, dg.DagsterEventType.ASSET_MATERIALIZATION, [DATA_VERSION_TAG], asset_partitions=wanted
        )
        found.update((k, t[DATA_VERSION_TAG]) for k, t in tags.items())
        if len(tags) < len(wanted):  # never built, or built before fingerprints became the data version
            latest = storage.get_latest_storage_id_by_partition(
                shards.key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(wanted)
            )
            untagged.extend(k for k in wanted if k in latest and k not in tags)
    found.update(_fingerprints_in_metadata(instance, untagged, batch, page))
    return found


def _fingerprints_in_metadata(
    instance: dg.DagsterInstance, keys: Sequence[str], batch: int, page: int
) -> dict[str, str | None]:
    """The fingerprints of shards materialized before the data version carried them, from the
    metadata of each one's latest materialization."""
    found: dict[str, str | None] = {}
    for start in range(0, len(keys), batch):
        missing = set(keys[start : start + batch])
        records_filter = dg.AssetRecordsFilter(asset_key=shards.key, asset_partitions=sorted(missing))
        cursor = None
        while missing:
            result = instance.fetch_materializations(
                records_filter, limit=page, cursor=cursor, ascending=False
            )
            for record in result.records:  # newest first: the first one per shard is its latest
                key, materialization = record.partition_key, record.asset_materialization
                if key not in missing or materialization is None:
                    continue
                missing.discard(key)
                value = materialization.metadata.get(INPUT_FINGERPRINT)
                found[key] = value.text if isinstance(value, dg.TextMetadataValue) else None
            if not result.has_more:
                break
            cursor = result.cursor
    return found


def built_from_staging(instance: dg.DagsterInstance, manifest: TableManifest) -> set[str]:
    """The table's shard keys whose latest materialization was built from the rows staged now."""
    keys = shard_keys(manifest)
    staged = dict(zip(keys, (manifest.fingerprint(i) for i in manifest.shard_ids), strict=True))
    return {
        k
        for k, recorded in recorded_fingerprints(instance, keys).items()
        if recorded and recorded == staged[k]
    }


def shard_materialization(
    asset_key: dg.AssetKey, key: str, result: ShardResult, extra: dict[str, dg.MetadataValue] | None = None
) -> dg.AssetMaterialization:
    """A built shard's materialization: its metadata, and its input fingerprint as data version."""
    fingerprint = result.input_fingerprint
    return dg.AssetMaterialization(
        asset_key=asset_key,
        partition=key,
        metadata={**shard_metadata(result), **(extra or {})},
        tags={DATA_VERSION_TAG: fingerprint} if fingerprint else None,
    )


def shard_metadata(result: ShardResult) -> dict[str, dg.MetadataValue[Any]]:
    s = result.stats
    fingerprint = result.input_fingerprint
    return {
        "count": dg.MetadataValue.int(s.count),
        "successes": dg.MetadataValue.int(s.successes),
        "success_rate": dg.MetadataValue.float(s.successes / s.count if s.count else 0.0),
        "failed_to_download": dg.MetadataValue.int(s.failed_to_download),
        "failed_to_resize": dg.MetadataValue.int(s.failed_to_resize),
        "top_errors": dg.MetadataValue.md("\n".join(f"- {n} x {msg}" for msg, n in s.top_errors()) or "none"),
        "opt_outs": dg.MetadataValue.json(dict(sorted(s.opt_outs.items()))),
        "retry_waits": dg.MetadataValue.int(s.retry_waits),
        "retry_wait_seconds": dg.MetadataValue.float(round(s.retry_wait_seconds, 2)),
        "bytes_written": dg.MetadataValue.int(result.bytes_written),
        "images_per_second": dg.MetadataValue.float(round(result.images_per_second, 1)),
        "duration_seconds": dg.MetadataValue.float(round(s.duration, 2)),
        "output": dg.MetadataValue.path(f"{result.output_folder}/{result.name}"),
        "output_format": dg.MetadataValue.text(result.output_format),
        # Where it was built: this process, or a Ray node or Spark executor.
        "worker": dg.MetadataValue.text(s.worker),
        # What download() and new_shards_sensor compare with the table's staging (built_from_staging).
        **({INPUT_FINGERPRINT: dg.MetadataValue.text(fingerprint)} if fingerprint else {}),
        **(retry_metadata(result) if result.retry is not None else {}),
    }


def retry_metadata(result: ShardResult) -> dict[str, dg.MetadataValue[Any]]:
    """A retry_failed build's counts, and why the shard was built in full instead, if it was."""
    retry = result.retry
    assert retry is not None
    return {
        "retried": dg.MetadataValue.int(retry.retried),
        "recovered": dg.MetadataValue.int(retry.recovered),
        **({"rebuilt_in_full": dg.MetadataValue.text(retry.rebuilt)} if retry.rebuilt else {}),
    }
