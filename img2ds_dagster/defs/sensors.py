"""Sensors: new URL files in the inbox (a folder, or an S3 prefix listed incrementally) become
``url_tables`` partitions and runs; newly staged tables get their shards built, several shards per run.

Shards are requested by a sensor reading new ``url_tables`` materializations (cost grows with new
events), not by an automation condition on ``shards`` (each tick costs ~7.5 s of CPU at 100k shard
partitions, see the design findings).
"""

# No `from __future__ import annotations` here: Dagster reads the parameter annotations of the
# decorated functions (context, config, resources) at definition time and needs real types.

import time
from collections.abc import Sequence

import dagster as dg
from dagster_aws.s3 import S3Resource

from ..config import UrlTableConfig
from ..engine.sources import Staging, table_key
from ..errors import ConfigError, Img2dsError, InputTableError, StagingMissingError
from .inbox import DropCursor, S3DropCursor, drop_config, list_s3_inbox
from .jobs import build_shards, stage_table
from .partitions import SHARDS, contiguous_ranges, range_tags, shards_per_run, url_tables_partitions
from .resources import S3InboxResource, StorageResource
from .shards import built_from_staging
from .url_tables import url_tables

# Dagster's sensor daemon looks at its sensors every 5 s at most, so a shorter interval would not
# tick sooner; a tick lists the inbox or reads the newest url_tables events, cheap at that rate.
# (benchmarks/inbox_latency.py: a 10-row file dropped to its shard built in 20 s, median of 5, with
# the queue read every second; 26 s at 10 s and Dagster's 5 s queue interval.)
_TICK_SECONDS = 5


@dg.sensor(
    target=stage_table,
    minimum_interval_seconds=_TICK_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new URL file in the inbox as a url_tables partition and stages it.",
)
def url_drop_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    cursor = DropCursor.parse(context.cursor)
    settled_before = time.time() - storage.inbox_settle_seconds
    drops: list[tuple[str, float]] = []
    # Oldest first: the cursor is a high-water mark, so a younger file must not pass an older one.
    for path, arrival in storage.inbox_files():
        if arrival > settled_before:
            break  # still being copied in, and so may be everything younger: next tick
        if cursor.is_new(path, arrival):
            cursor.advance(path, arrival)
            drops.append((path, arrival))
    if not drops:
        return dg.SkipReason(f"no new settled URL file in {storage.inbox}")
    return _drop_result(context, drops, storage.staging_area(), cursor.dump(), "")


@dg.sensor(
    target=stage_table,
    minimum_interval_seconds=_TICK_SECONDS,
    # Only in the code location when IMG2DS_S3_INBOX is set (definitions.py); running from then on.
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers each new URL file under the S3 inbox prefix as a url_tables partition and "
    "stages it; lists only the keys after the last one seen, and the whole prefix every few ticks.",
)
def s3_url_drop_sensor(
    context: dg.SensorEvaluationContext,
    storage: StorageResource,
    s3: S3Resource,
    s3_inbox: S3InboxResource,
) -> dg.SensorResult:
    # The cursor is saved on every tick, new files or not: it counts the ticks to the next full listing.
    cursor = S3DropCursor.parse(context.cursor, s3_inbox.url)
    bucket, prefix = s3_inbox.bucket_and_prefix()
    full = cursor.full_listing_due(s3_inbox.full_listing_every)
    start_after = "" if full else cursor.after
    listing = "full listing" if full else f"keys after {start_after}"
    objects, last_key = list_s3_inbox(s3.get_client(), bucket, prefix, start_after)
    window = s3_inbox.late_upload_window_seconds
    # Judged against the cursor as it was before this tick, then taken oldest first.
    new = sorted((o for o in objects if cursor.is_new(o, window)), key=lambda o: (o.last_modified, o.key))
    for obj in new:
        cursor.advance(obj)
    cursor.listed(last_key, full, window)
    if not new:
        return dg.SensorResult(
            skip_reason=f"no new URL file under {s3_inbox.url} ({listing})", cursor=cursor.dump()
        )
    drops = [(f"s3://{bucket}/{obj.key}", obj.last_modified) for obj in new]
    return _drop_result(context, drops, storage.staging_area(), cursor.dump(), f" ({listing})")


def _drop_result(
    context: dg.SensorEvaluationContext,
    drops: Sequence[tuple[str, float]],
    staging: Staging,
    cursor: str,
    note: str,
) -> dg.SensorResult:
    """A url_tables partition and run for each new file (path, arrival time); a file that cannot be
    staged is reported in the log and passed over, the cursor moving past it all the same."""
    requests: list[dg.RunRequest] = []
    new_keys: list[str] = []
    skipped: list[str] = []
    for path, arrival in drops:
        try:
            key, config = _drop_request(path, new_keys, staging)
        except SettingsRefused as refused:
            # A run that fails at once with the reason: the table shows as failed in the UI, named
            # with the settings file and the option. Fix the settings, then touch the file.
            key, config = refused.key, UrlTableConfig(source=path, refused=f"{path}: skipped: {refused}")
            context.log.error(config.refused)
        except Img2dsError as err:
            # Reported once and left behind: rename the file, then touch it.
            context.log.error(f"{path}: skipped: {err}")
            skipped.append(f"{path}: {err}")
            continue
        new_keys.append(key)
        requests.append(
            dg.RunRequest(
                partition_key=key,
                run_key=f"{path}@{arrival}",
                run_config={"ops": {"url_tables": {"config": config.model_dump(exclude_defaults=True)}}},
                tags={"img2ds/table": key},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="skipped " + "; ".join(skipped) + note, cursor=cursor)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[url_tables_partitions.build_add_request(new_keys)],
        cursor=cursor,
    )


def _drop_request(path: str, taken: list[str], staging: Staging) -> tuple[str, UrlTableConfig]:
    """The table key and run config for a dropped file, or an error saying why it cannot be staged."""
    key = table_key(path)
    if key in taken:
        raise InputTableError(f"another new file also gives the table name {key!r}; rename one of them")
    try:
        staged_from = staging.manifest(key).source
    except StagingMissingError:
        staged_from = path
    if staged_from != path:
        raise InputTableError(f"table {key!r} was staged from {staged_from}; rename this file")
    try:
        return key, drop_config(path)
    except ConfigError as err:
        raise SettingsRefused(key, str(err)) from err


class SettingsRefused(ConfigError):
    """A dropped file's settings files cannot be used; ``key`` is the table it would be."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dg.sensor(
    target=build_shards,
    minimum_interval_seconds=_TICK_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Builds the shards of each newly staged table, up to IMG2DS_SHARDS_PER_RUN shards per run "
    f"(here {shards_per_run()}); "
    "for a table staged again, only the shards whose rows changed.",
)
def new_shards_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    after = int(context.cursor) if context.cursor else None
    result = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=url_tables.key, after_storage_id=after), limit=100, ascending=True
    )
    if not result.records:
        return dg.SkipReason("no newly staged table")
    # A run covers a range of keys in the order they were registered, which is not sorted order
    # when tables interleave: ranges are cut from that order.
    ordered = context.instance.get_dynamic_partitions(SHARDS)
    # A table staged twice since the last tick gets its shards once, for its latest staging.
    latest = {record.partition_key or "": record for record in result.records}
    requests = []
    per_run = shards_per_run()
    staging = storage.staging_area()
    for table, record in latest.items():
        # A table staged again (a new version of its file) rebuilds only the shards whose rows changed.
        try:
            unchanged = built_from_staging(context.instance, staging.manifest(table))
        except StagingMissingError:
            unchanged = set()  # its shard runs will say what is missing
        wanted = [k for k in ordered if k.startswith(table + "/") and k not in unchanged]
        if unchanged:
            context.log.info(f"{table}: {len(unchanged)} shards have the same rows as before and are kept")
        for first, last in contiguous_ranges(ordered, wanted, per_run):
            requests.append(
                dg.RunRequest(
                    run_key=f"{table}@{record.storage_id}:{first}",
                    tags={**range_tags(first, last), "img2ds/table": table},
                )
            )
    return dg.SensorResult(run_requests=requests, cursor=str(result.records[-1].storage_id))
