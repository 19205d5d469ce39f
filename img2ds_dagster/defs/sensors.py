"""Sensors: new URL files in the inbox become ``url_tables`` partitions and runs; newly staged tables
get their shards built, several shards per run.

Shards are requested by a sensor reading new ``url_tables`` materializations (cost grows with new
events), not by an automation condition on ``shards`` (each tick costs ~7.5 s of CPU at 100k shard
partitions, see the design findings).
"""

# No `from __future__ import annotations` here: Dagster reads the parameter annotations of the
# decorated functions (context, config, resources) at definition time and needs real types.

import time
import tomllib

import dagster as dg

from ..config import UrlTableConfig
from ..engine.sources import table_key
from .inbox import DropCursor, inbox_settings
from .partitions import SHARDS, contiguous_ranges, url_tables_partitions
from .resources import StorageResource
from .shards import MAX_SHARDS_PER_RUN, shards
from .url_tables import url_tables

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


@dg.sensor(
    target=[url_tables],
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new URL file in the inbox as a url_tables partition and stages it.",
)
def url_drop_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    cursor = DropCursor.parse(context.cursor)
    settled_before = time.time() - storage.inbox_settle_seconds
    requests: list[dg.RunRequest] = []
    new_keys: list[str] = []
    for path, mtime in storage.inbox_files():
        # A file still being copied in is left for a later tick.
        if mtime > settled_before or not cursor.is_new(path, mtime):
            continue
        cursor.advance(path, mtime)
        key = table_key(path)
        if key in new_keys:
            context.log.error(f"{path}: another new file also gives the table name {key!r}; skipped")
            continue
        try:
            config = UrlTableConfig(**{**inbox_settings(path), "source": path})
        except (ValueError, TypeError, tomllib.TOMLDecodeError) as err:
            context.log.error(f"{path}: bad settings file, skipped (fix it, then touch the URL file): {err}")
            continue
        new_keys.append(key)
        requests.append(
            dg.RunRequest(
                partition_key=key,
                run_key=f"{path}@{mtime}",
                run_config={"ops": {"url_tables": {"config": config.model_dump(exclude_defaults=True)}}},
                tags={"img2ds/table": key},
            )
        )
    if not requests:
        return dg.SkipReason(f"no new settled URL file in {storage.inbox}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[url_tables_partitions.build_add_request(new_keys)],
        cursor=cursor.dump(),
    )


@dg.sensor(
    target=[shards],
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Builds the shards of each newly staged table, up to {MAX_SHARDS_PER_RUN} shards per run.",
)
def new_shards_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    after = int(context.cursor) if context.cursor else None
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=url_tables.key, after_storage_id=after), limit=100, ascending=True
    )
    if not result.records:
        return dg.SkipReason("no newly staged table")
    # A run covers a range of keys in the order they were registered, which is not sorted order
    # when tables interleave: ranges are cut from that order.
    ordered = context.instance.get_dynamic_partitions(SHARDS)
    requests = []
    for record in result.records:
        table = record.partition_key or ""
        wanted = [k for k in ordered if k.startswith(table + "/")]
        for first, last in contiguous_ranges(ordered, wanted, MAX_SHARDS_PER_RUN):
            requests.append(
                dg.RunRequest(
                    run_key=f"{table}@{record.storage_id}:{first}",
                    tags={RANGE_START_TAG: first, RANGE_END_TAG: last, "img2ds/table": table},
                )
            )
    return dg.SensorResult(run_requests=requests, cursor=str(result.records[-1].storage_id))
