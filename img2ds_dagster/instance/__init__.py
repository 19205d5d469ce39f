"""Dagster instance storage for many shards per run: Dagster's sqlite and Postgres storages, with the
"materialization planned" events of a new run written in one statement per table.

Dagster writes one such event per partition of every run it creates (the partition bar reads them
to show a shard of a failed run as failed), and its storages write each event on its own: several
connections, SQL compilations and commits per shard. That was nearly all the time it took to queue
a backfill of 100,000 shards (benchmarks/orchestration.py; README, "How many shards per run").
``BulkPlannedEvents`` writes a run's planned events together, the same rows Dagster writes one by
one, so what the UI and the daemons read is unchanged. Then the next cost: planning each run
reads every key of the dynamic partitions (once for the asset, once per check), 100,000 rows three
times per run; ``CachedDynamicPartitions`` keeps them in memory while a cheap query says that they
have not changed.

Dagster hands a storage events together only when ``DAGSTER_EVENT_BATCH_SIZE`` is set: these
storages set it (unless the deployment did) when the instance loads them, in every process that
creates runs (daemon, webserver, ``download()``), which no code location can do. Use them in
``dagster.yaml``::

    storage:
      custom:
        module: img2ds_dagster.instance.sqlite       # or img2ds_dagster.instance.postgres
        class: SqliteStorage                          # or PostgresStorage
        config: {base_dir: ...}                       # the config of storage: sqlite (or postgres)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import sqlalchemy as db
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationPlanned
from dagster._core.events import DagsterEventType
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import (
    AssetCheckExecutionsTable,
    DynamicPartitionsTable,
    SqlEventLogStorageTable,
)
from dagster._serdes import serialize_value
from sqlalchemy.engine import Connection

# Events Dagster may buffer before handing them to the storage at once. A run's planned events are
# one batch: they end with an explicit last event, so this only bounds the buffer.
EVENT_BATCH_SIZE = "10000"
# Rows per INSERT: sqlite allows 32,766 bound values per statement; an event row binds fewer than 10.
ROWS_PER_STATEMENT = 1000


def enable_event_batches() -> None:
    os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", EVENT_BATCH_SIZE)


def _is_planned(event: EventLogEntry) -> bool:
    return event.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION_PLANNED


class BulkPlannedEvents:
    """Mixin for a Dagster SQL event log storage: ``store_event_batch`` writes a run's planned
    materializations with one INSERT per table (per ``ROWS_PER_STATEMENT``); the rest of the batch
    (the run's planned asset checks, one event per check) goes to the storage's own."""

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        planned = [e for e in events if _is_planned(e)]
        if len({e.run_id for e in planned}) != 1:
            super().store_event_batch(events)  # type: ignore[misc]
            return
        for first in range(0, len(planned), ROWS_PER_STATEMENT):
            self._store_planned(planned[first : first + ROWS_PER_STATEMENT])
        rest = [e for e in events if not _is_planned(e)]
        if rest:
            super().store_event_batch(rest)  # type: ignore[misc]

    def _store_planned(self, events: Sequence[EventLogEntry]) -> None:
        raise NotImplementedError

    def _store_asset_check_evaluation_planned(self, event: EventLogEntry, event_id: int | None) -> None:
        """Dagster's, with the event serialized once: Dagster serializes it (and the run's whole
        partition subset in it) again for each partition's row, quadratic in the run's shards."""
        storage: Any = self
        planned = event.get_dagster_event().event_specific_data
        assert isinstance(planned, AssetCheckEvaluationPlanned)
        keys = planned.partitions_subset.get_partition_keys() if planned.partitions_subset else [None]
        row = {
            "asset_key": planned.asset_key.to_string(),
            "check_name": planned.check_name,
            "run_id": event.run_id,
            "execution_status": AssetCheckExecutionRecordStatus.PLANNED.value,
            "evaluation_event": serialize_value(event),
            "evaluation_event_timestamp": storage._event_insert_timestamp(event),
            "evaluation_event_storage_id": event_id,
        }
        with storage.index_connection() as conn:
            conn.execute(AssetCheckExecutionsTable.insert(), [{**row, "partition": key} for key in keys])

    def _index_planned(self, conn: Connection, events: Sequence[EventLogEntry], ids: Sequence[int]) -> None:
        """What Dagster's ``store_event`` does in the index for each asset event: its tags, and the
        asset's row (last run, last event time), which only the last event of each asset sets."""
        storage: Any = self
        storage._store_asset_event_tags(conn, events, ids)
        last = {}
        for event, event_id in zip(events, ids, strict=True):
            last[event.get_dagster_event().asset_key] = (event, event_id)
        for event, event_id in last.values():
            storage._store_asset_event(conn, event, event_id)

    def _insert_returning_ids(self, conn: Connection, statement: Any) -> list[int]:
        statement = statement.returning(SqlEventLogStorageTable.c.id)
        # Ids are given in insertion order; RETURNING's row order is not promised, so they are sorted.
        return sorted(int(row[0]) for row in conn.execute(statement).fetchall())


class CachedDynamicPartitions:
    """Mixin for a Dagster SQL event log storage: ``get_dynamic_partitions`` answered from memory
    while the partitions' count, highest id and newest creation time are what they were when they
    were read. Other processes add and delete partitions (a url_tables run registers its shards), so
    each call checks, in one aggregate query on the table's index.

    What the check cannot see: on sqlite, which reuses the highest id once its row is deleted, the
    newest partition deleted and another added in the same second (creation times are to the
    second) by another process after this one read them. The project deletes shard partitions only
    when a table is staged again with fewer shards, and that run adds none; two tables staged at
    once in the same second, one shrinking by as many shards as the other adds, would be missed."""

    def get_dynamic_partitions(self, partitions_def_name: str) -> Sequence[str]:
        storage: Any = self
        storage._check_partitions_table()
        cache: dict[str, tuple[tuple[Any, ...], list[str]]]
        cache = self.__dict__.setdefault("_partitions_cache", {})
        # Read before the keys: a change in between shows at the next call, never the other way.
        stamp = self._partitions_stamp(partitions_def_name)
        cached = cache.get(partitions_def_name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, list(super().get_dynamic_partitions(partitions_def_name)))  # type: ignore[misc]
            cache[partitions_def_name] = cached
        return list(cached[1])  # a copy: callers may change theirs

    def add_dynamic_partitions(self, partitions_def_name: str, partition_keys: Sequence[str]) -> None:
        self.__dict__.get("_partitions_cache", {}).pop(partitions_def_name, None)
        super().add_dynamic_partitions(partitions_def_name, partition_keys)  # type: ignore[misc]

    def delete_dynamic_partition(self, partitions_def_name: str, partition_key: str) -> None:
        self.__dict__.get("_partitions_cache", {}).pop(partitions_def_name, None)
        super().delete_dynamic_partition(partitions_def_name, partition_key)  # type: ignore[misc]

    def _partitions_stamp(self, partitions_def_name: str) -> tuple[Any, ...]:
        storage: Any = self
        table = DynamicPartitionsTable
        query = db.select(
            db.func.count(table.c.id), db.func.max(table.c.id), db.func.max(table.c.create_timestamp)
        ).where(table.c.partitions_def_name == partitions_def_name)
        with storage.index_connection() as conn:
            return tuple(conn.execute(query).one())
