"""What a partition key is: the two dynamic partition sets (one key per URL file, one key per shard,
``<table>/<shard>``), a table's shard keys, and the tags that make a run cover a range of shards.

Everything that makes or reads a key (assets, sensors, ``download()``, the demo) goes through here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import dagster as dg

from ..engine.shard import ShardJob
from ..engine.sources import TableManifest
from ..errors import ConfigError

URL_TABLES = "url_tables"
SHARDS = "shards"
url_tables_partitions = dg.DynamicPartitionsDefinition(name=URL_TABLES)
shards_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)

# A run tagged with both covers the shards from the first key to the last, in registration order.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


SHARDS_PER_RUN_VARIABLE = "IMG2DS_SHARDS_PER_RUN"
# Creating a run costs Dagster about 0.2 s plus 4.4 us per registered shard partition (planning it
# reads every key), and launching one a process start and a load of the code location (2 to 5 s);
# on top, Dagster writes one "materialization planned" event per shard of the run (5-12 ms each
# here, sqlite or Postgres), whatever the run size. At 32 per run, the 3,125 runs of a 100,000-shard
# table cost about 35 min of run creation beyond those events; at 512, 196 runs cost about 2 min
# (benchmarks/orchestration.py). A run builds its shards two at a time on one machine (more on a
# cluster), each recorded as it finishes, so a big run loses nothing in progress or failure
# reporting: a failed shard shows as failed in its partition status either way.
DEFAULT_SHARDS_PER_RUN = 512


def shards_per_run() -> int:
    """How many shards a backfill run or a sensor's run covers at most: IMG2DS_SHARDS_PER_RUN, read
    where the code location loads (the backfill policy is fixed there) and at each sensor tick."""
    raw = os.environ.get(SHARDS_PER_RUN_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_SHARDS_PER_RUN
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{SHARDS_PER_RUN_VARIABLE}={raw!r}: expected a whole number of shards, 1 or more")
    return int(raw)


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
