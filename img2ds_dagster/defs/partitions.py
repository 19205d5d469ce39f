"""What a partition key is: the two dynamic partition sets (one key per URL file, one key per shard,
``<table>/<shard>``), a table's shard keys, and the tags that make a run cover a range of shards.

Everything that makes or reads a key (assets, sensors, ``download()``, the demo) goes through here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import dagster as dg

from ..engine.shard import ShardJob
from ..engine.sources import TableManifest

URL_TABLES = "url_tables"
SHARDS = "shards"
url_tables_partitions = dg.DynamicPartitionsDefinition(name=URL_TABLES)
shards_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)

# A run tagged with both covers the shards from the first key to the last, in registration order.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def shard_key(table: str, shard_name: str) -> str:
    return f"{table}/{shard_name}"


def shard_keys(manifest: TableManifest) -> list[str]:
    """A staged table's shard keys, in shard order."""
    return [shard_key(manifest.table, manifest.shard_name(i)) for i in manifest.shard_ids]


def shard_job(key: str) -> ShardJob:
    """The shard a partition key names: ``laion_part1/00012`` -> table laion_part1, shard 12."""
    table, _, name = key.rpartition("/")
    if not table or not name.isdigit():
        raise ValueError(f"shard partition key {key!r} is not of the form <table>/<zero-padded shard id>")
    return ShardJob(table, int(name), name)


def range_tags(first: str, last: str) -> dict[str, str]:
    """The tags of a run over the shards ``first`` to ``last``."""
    return {RANGE_START_TAG: first, RANGE_END_TAG: last}


def chunked(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def contiguous_ranges(ordered: Sequence[str], wanted: Iterable[str], max_size: int) -> list[tuple[str, str]]:
    """(first, last) key ranges covering ``wanted``, each at most ``max_size`` keys long and made of
    keys adjacent in ``ordered`` (the partition set's own order, which Dagster ranges follow)."""
    wanted = set(wanted)
    ranges: list[tuple[str, str]] = []
    run: list[str] = []
    for key in ordered:
        if key in wanted and len(run) < max_size:
            run.append(key)
            continue
        if run:
            ranges.append((run[0], run[-1]))
        run = [key] if key in wanted else []
    if run:
        ranges.append((run[0], run[-1]))
    return ranges
