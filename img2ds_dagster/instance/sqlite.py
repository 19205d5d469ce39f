"""Dagster's sqlite storage, with a run's planned events written together (see the package)."""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as db
from alembic.script import ScriptDirectory
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log import SqliteEventLogStorage as DagsterSqliteEventLogStorage
from dagster._core.storage.event_log.schema import SqlEventLogStorageMetadata
from dagster._core.storage.event_log.sqlite import sqlite_event_log
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from dagster._core.storage.sql import get_alembic_config
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from dagster._utils import mkdir_p
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from . import BulkPlannedEvents, CachedDynamicPartitions, enable_event_batches

# Engines kept, one per database file (the index and the latest runs' files); see _connect.
ENGINES_KEPT = 32
# The table alembic stamps a database's schema revision in, as alembic creates it.
ALEMBIC_VERSION = db.Table(
    "alembic_version",
    db.MetaData(),
    db.Column("version_num", db.String(32), nullable=False),
    db.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


class SqliteEventLogStorage(CachedDynamicPartitions, BulkPlannedEvents, DagsterSqliteEventLogStorage):
    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        enable_event_batches()
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        super().__init__(base_dir, inst_data=inst_data)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        """Dagster's, with the engine of each database file kept rather than created for every
        statement: creating one was 2-3 ms of each event written, 0.6 s of a 20-URL download()'s 43
        events under cProfile. With NullPool an engine holds no connection, so a kept one holds no
        file open; each use still opens and closes its own connection, as Dagster's does."""
        with self._db_lock:
            engine = self._engines.get(shard)
            if engine is None:
                engine = db.create_engine(
                    self.conn_string_for_shard(shard),
                    poolclass=NullPool,
                    connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
                )
                self._engines[shard] = engine
                if len(self._engines) > ENGINES_KEPT:
                    self._engines.popitem(last=False)
            self._engines.move_to_end(shard)
            if shard not in self._initialized_dbs:
                if shard == sqlite_event_log.INDEX_SHARD_NAME or not self._create_run_database(engine):
                    self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def _create_run_database(self, engine: Engine) -> bool:
        """A new run's database file, made as Dagster's _initdb makes it (WAL, the event log's tables,
        stamped with alembic's head revision), without asking alembic for the head each time: it
        reads all its migration scripts to answer, twice for each run created. False, for Dagster's
        _initdb to do it, when the file already has tables (a run from before, or another process
        making it now) or making it failed."""
        try:
            with engine.connect() as conn:
                tables = db.inspect(conn).get_table_names()
                conn.rollback()  # the pragma has no effect inside the transaction that began
                if tables:
                    return False
                conn.exec_driver_sql("PRAGMA journal_mode=WAL;")
                conn.commit()
                with conn.begin():
                    SqlEventLogStorageMetadata.create_all(conn)
                    ALEMBIC_VERSION.create(conn)
                    conn.execute(ALEMBIC_VERSION.insert().values(version_num=_head_revision()))
        except db.exc.DatabaseError:
            return False
        return True

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


@functools.cache
def _head_revision() -> str:
    """alembic's head revision of Dagster's event log schema, read once per process."""
    config = get_alembic_config(sqlite_event_log.__file__)
    return str(ScriptDirectory.from_config(config).as_revision_number("head"))
