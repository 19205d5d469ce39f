"""``url_tables``: one partition per URL file. Materializing one reads and validates the file, stages
its shards' input rows with the table's settings, and registers the table's shard partitions."""

# No `from __future__ import annotations` here: Dagster reads the parameter annotations of the
# decorated functions (context, config, resources) at definition time and needs real types.

import dagster as dg

from ..config import UrlTableConfig
from ..engine.sources import TableManifest
from ..engine.storage import absolute
from ..errors import ConfigError, InputTableError, StagingMissingError
from .inbox import drop_config
from .partitions import SHARDS, chunked, shard_keys, url_tables_partitions
from .resources import StorageResource

_NO_OPTIONS = UrlTableConfig().model_dump(exclude={"source"})


@dg.asset(
    partitions_def=url_tables_partitions,
    group_name="img2ds",
    kinds={"parquet"},
    description="A URL file, validated and cut into shards; registers the `shards` partitions.",
)
def url_tables(
    context: dg.AssetExecutionContext, config: UrlTableConfig, storage: StorageResource
) -> dg.MaterializeResult:
    table = context.partition_key
    if config.refused:  # the inbox sensor could not use the file's settings (sensors.py)
        raise dg.Failure(description=config.refused, allow_retries=False)
    try:
        return _stage(context, config, storage, table)
    except (InputTableError, ConfigError) as err:
        # The user's data or options: the message says it all, and a retry would fail the same.
        raise user_failure(err) from None


def user_failure(err: InputTableError | ConfigError) -> dg.Failure:
    """A failure whose message is the error's, marked with its kind (see ``raise_user_error``)."""
    return dg.Failure(
        description=str(err), allow_retries=False, metadata={_KIND: dg.MetadataValue.text(type(err).__name__)}
    )


def raise_user_error(result_or_failure: dg.Failure) -> None:
    """Raise again, as InputTableError or ConfigError, a failure made by ``user_failure``: for the
    in-process callers (download(), img2ds stage), whose users expect those exceptions."""
    kind = result_or_failure.metadata.get(_KIND)
    if kind is not None:
        error = {"InputTableError": InputTableError, "ConfigError": ConfigError}[str(kind.value)]
        raise error(result_or_failure.description) from None


_KIND = "user_error"


def _stage(
    context: dg.AssetExecutionContext, config: UrlTableConfig, storage: StorageResource, table: str
) -> dg.MaterializeResult:
    staging = storage.staging_area()
    try:
        previous: TableManifest | None = staging.manifest(table)
    except StagingMissingError:
        previous = None
    source = config.source or storage.inbox_file(table)
    if config.model_dump(exclude={"source"}) == _NO_OPTIONS:
        # A run given no options (the shell's `dagster asset materialize`, a backfill) takes them
        # from the settings files beside the URL file, as the inbox sensor does.
        config = drop_config(source)
    manifest = staging.stage(
        table,
        source=source,
        settings=config.to_settings(),
        output_folder=absolute(config.output_folder or storage.dataset_folder(table)),
        first_shard_id=config.first_shard_id,
    )
    keys = shard_keys(manifest)
    for chunk in chunked(keys, 1000):  # the findings: ~1 ms per 100 keys in batches of 1000
        context.instance.add_dynamic_partitions(SHARDS, list(chunk))
    if previous is not None:
        # A file that shrank leaves shard keys behind; they would show as missing forever.
        for stale in sorted(set(shard_keys(previous)) - set(keys)):
            context.instance.delete_dynamic_partition(SHARDS, stale)
            context.log.info(f"removed shard partition {stale}: the table no longer has that shard")
    context.log.info(
        f"{table}: {manifest.row_count} rows in {manifest.shard_count} shards from {manifest.source}"
    )
    return dg.MaterializeResult(
        metadata={
            "row_count": dg.MetadataValue.int(manifest.row_count),
            "shard_count": dg.MetadataValue.int(manifest.shard_count),
            "columns": dg.MetadataValue.text(", ".join(manifest.columns)),
            "source": dg.MetadataValue.path(manifest.source),
            "output_folder": dg.MetadataValue.path(manifest.output_folder),
            "shards": dg.MetadataValue.text(f"{keys[0]} .. {keys[-1]}" if keys else "none"),
            "settings": dg.MetadataValue.json(manifest.settings.flat()),
        }
    )
