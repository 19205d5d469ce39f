"""Dagster's Postgres storage (``pip install img2ds_dagster[deploy]``), with a run's planned events
written together (see the package)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as db
from dagster._core.events.log import EventLogEntry
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres import PostgresEventLogStorage as DagsterPostgresEventLogStorage
from dagster_postgres.event_log.event_log import CHANNEL_NAME
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

from . import BulkPlannedEvents, CachedDynamicPartitions, enable_event_batches


def _storage_args(config_value: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "postgres_url": pg_url_from_config(config_value),
        "should_autocreate_tables": config_value.get("should_autocreate_tables", True),
        "token_provider": get_token_provider_from_config(config_value),
    }


class PostgresEventLogStorage(CachedDynamicPartitions, BulkPlannedEvents, DagsterPostgresEventLogStorage):
    def __init__(self, postgres_url: str, *args: Any, **kwargs: Any) -> None:
        enable_event_batches()
        super().__init__(postgres_url, *args, **kwargs)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PostgresEventLogStorage:
        return cls(inst_data=inst_data, **_storage_args(config_value))

    def _store_planned(self, events: Sequence[EventLogEntry]) -> None:
        with self._connect() as conn:
            ids = self._insert_returning_ids(conn, self.prepare_insert_event_batch(events))
            # Dagster notifies each event for watchers of older versions; one for the last will do.
            conn.execute(
                db.text(f"NOTIFY {CHANNEL_NAME}, :notify_id;"), {"notify_id": f"{events[0].run_id}_{ids[-1]}"}
            )
        with self.index_transaction() as conn:
            self._index_planned(conn, events, ids)


class PostgresStorage(DagsterPostgresStorage):
    """``storage: postgres`` (same config) with ``PostgresEventLogStorage`` above."""

    def __init__(self, postgres_url: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(postgres_url, *args, **kwargs)
        # The stock event log storage made by super() holds an engine with no pooled connections
        # (NullPool): replacing it leaves nothing open; it cost one table-list query at load.
        self._event_log_storage = PostgresEventLogStorage(
            postgres_url, self.should_autocreate_tables, token_provider=kwargs.get("token_provider")
        )

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PostgresStorage:
        return cls(inst_data=inst_data, **_storage_args(config_value))

    @property
    def event_storage_data(self) -> ConfigurableClassData | None:
        return (
            ConfigurableClassData(__name__, PostgresEventLogStorage.__name__, self.inst_data.config_yaml)
            if self.inst_data
            else None
        )
