"""The two dynamic partition sets: one key per URL file, one key per shard (``<table>/<shard>``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import dagster as dg

from ..engine.shard import ShardJob

URL_TABLES = "url_tables"
SHARDS = "shards"
url_tables_partitions = dg.DynamicPartitionsDefinition(name=URL_TABLES)
shards_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)


def shard_key(table: str, shard_name: str) -> str:
    return f"{table}/{shard_name}"


def shard_job(key: str) -> ShardJob:
    """The shard a partition key names: ``laion_part1/00012`` -> table laion_part1, shard 12."""
    table, _, name = key.rpartition("/")
    if not table or not name.isdigit():
        raise ValueError(f"shard partition key {key!r} is not of the form <table>/<zero-padded shard id>")
    return ShardJob(table, int(name), name)


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
