"""Dagster's sqlite storage, with a run's planned events written together (see the package)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from dagster._core.events.log import EventLogEntry
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log import SqliteEventLogStorage as DagsterSqliteEventLogStorage
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from dagster._utils import mkdir_p

from . import BulkPlannedEvents, CachedDynamicPartitions, enable_event_batches


class SqliteEventLogStorage(CachedDynamicPartitions, BulkPlannedEvents, DagsterSqliteEventLogStorage):
    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        enable_event_batches()
        super().__init__(base_dir, inst_data=inst_data)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> SqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _store_planned(self, events: Sequence[EventLogEntry]) -> None:
        # As Dagster's store_event: the run's own database, then the cross-run index (whose ids are
        # the storage ids the asset queries use).
        insert = self.prepare_insert_event_batch(events)
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(insert)
        with self.index_transaction() as conn:
            self._index_planned(conn, events, self._insert_returning_ids(conn, insert))


class SqliteStorage(DagsterSqliteStorage):
    """``storage: sqlite`` (same folders, same config) with ``SqliteEventLogStorage`` above."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        # DagsterSqliteStorage.__init__ would open its own event log storage first, only for it to
        # be replaced: the same three storages, with ours for the event log.
        self.base_dir = base_dir
        self._run_storage = SqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = SqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        DagsterStorage.__init__(self)  # type: ignore[arg-type,no-untyped-call]

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> SqliteStorage:
        mkdir_p(config_value["base_dir"])
        return cls(config_value["base_dir"], inst_data=inst_data)

    @property
    def event_storage_data(self) -> ConfigurableClassData | None:
        return ConfigurableClassData(
            __name__,
            SqliteEventLogStorage.__name__,
            json.dumps({"base_dir": _event_logs_directory(self.base_dir)}),  # YAML, as JSON is
        )
