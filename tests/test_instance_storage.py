"""img2ds_dagster/instance: Dagster's sqlite and Postgres storages with a new run's "materialization
planned" events written together. The same runs on Dagster's own storage and on ours leave the same
rows (planned events, planned checks, the asset's last run), the shards of a failed ranged run show
as failed and the others as materialized, and ours writes a run's planned events in a few
statements where Dagster's writes them one by one (counted at the database driver).
"""

import contextlib
import dataclasses
import os
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2
import pytest
import sqlalchemy as db
from dagster._core.events import DagsterEventType
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value
from realservers import PostgresServer, postgres_server

PARTS = dg.DynamicPartitionsDefinition(name="parts")
# Partitioned checks, as the shards asset has (a preview in Dagster 1.13, as defs/checks.py says).
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec")
KEYS = [f"t/{i:05d}" for i in range(40)]
GOOD, BAD = KEYS[:25], KEYS[25:]
RANGE = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")
PLANNED = DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value


@dg.asset(
    partitions_def=PARTS,
    check_specs=[dg.AssetCheckSpec(n, asset="thing", partitions_def=PARTS) for n in ("complete", "rate")],
)
def thing(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    if BAD[0] in context.partition_keys:
        raise RuntimeError("this range fails")
    checks = [dg.AssetCheckResult(check_name=name, passed=True) for name in ("complete", "rate")]
    return dg.MaterializeResult(check_results=checks)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        with contextlib.closing(psycopg2.connect(server.url.replace("+psycopg2", ""))) as conn:
            conn.autocommit = True
            conn.cursor().execute("CREATE DATABASE stock")
        yield server


def storage_yaml(kind: str, ours: bool, where: str) -> str:
    config = f"postgres_url: {where}" if kind == "postgres" else f"base_dir: {where}"
    if not ours:
        return f"storage:\n  {kind}:\n    {config}\n"
    module, klass = f"img2ds_dagster.instance.{kind}", f"{kind.capitalize()}Storage"
    return f"storage:\n  custom:\n    module: {module}\n    class: {klass}\n    config:\n      {config}\n"


@dataclasses.dataclass
class Outcome:
    planned: list[tuple[Any, ...]]
    planned_checks: list[tuple[Any, ...]]
    materialized: set[str]
    failed: set[str]
    last_run_is_the_failed_one: bool
    event_log_inserts_of_the_failed_run: int


def range_tags(keys: list[str]) -> dict[str, str]:
    return dict(zip(RANGE, (keys[0], keys[-1]), strict=True))


def run_both_ranges(home: Path, instance_yaml: str) -> Outcome:
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml + "telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(PARTS.name, KEYS)
        good = dg.materialize([thing], instance=instance, tags=range_tags(GOOD))
        assert good.success
        with statements_sent() as sent:
            bad = dg.materialize([thing], instance=instance, tags=range_tags(BAD), raise_on_error=False)
        assert not bad.success
        runs = {good.run_id: "good", bad.run_id: "bad"}
        storage: Any = instance.event_log_storage
        with storage.index_connection() as conn:
            planned = conn.execute(
                db.text(
                    "SELECT run_id, dagster_event_type, asset_key, partition, step_key FROM event_logs"
                    " WHERE dagster_event_type = :planned ORDER BY id"
                ),
                {"planned": PLANNED},
            ).fetchall()
            checks = conn.execute(
                db.text(
                    "SELECT run_id, asset_key, check_name, partition, execution_status"
                    " FROM asset_check_executions WHERE partition IS NOT NULL ORDER BY id"
                )
            ).fetchall()
        status = get_and_update_asset_status_cache_value(instance, thing.key, PARTS)
        assert status is not None
        (record,) = instance.get_asset_records([thing.key])
        return Outcome(
            planned=[(runs[r[0]], *r[1:]) for r in planned],
            planned_checks=[(runs[r[0]], *r[1:]) for r in checks],
            materialized=set(status.deserialize_materialized_partition_subsets(PARTS).get_partition_keys()),
            failed=set(status.deserialize_failed_partition_subsets(PARTS).get_partition_keys()),
            last_run_is_the_failed_one=record.asset_entry.last_run_id == bad.run_id,
            event_log_inserts_of_the_failed_run=len(
                [s for s in sent if s.lstrip().upper().startswith("INSERT INTO EVENT_LOGS")]
            ),
        )


def where(kind: str, home: Path, request: pytest.FixtureRequest, ours: bool) -> str:
    if kind == "sqlite":
        return str(home / "storage")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.url if ours else server.url.rsplit("/", 1)[0] + "/stock"


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def test_ours_writes_what_dagsters_writes_in_fewer_statements(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    stock_home, ours_home = tmp_path / "stock", tmp_path / "ours"
    stock = run_both_ranges(stock_home, storage_yaml(kind, False, where(kind, stock_home, request, False)))
    ours = run_both_ranges(ours_home, storage_yaml(kind, True, where(kind, ours_home, request, True)))

    assert ours.planned == stock.planned
    # One per shard of each run, in Dagster's order (which is not the keys' order).
    expected = [("good", k) for k in GOOD] + [("bad", k) for k in BAD]
    assert sorted((r[0], r[3]) for r in ours.planned) == sorted(expected)
    assert ours.planned_checks == stock.planned_checks
    assert len(ours.planned_checks) == 2 * len(KEYS)
    assert (ours.materialized, ours.failed) == (stock.materialized, stock.failed) == (set(GOOD), set(BAD))
    assert ours.last_run_is_the_failed_one
    assert stock.last_run_is_the_failed_one
    # Dagster's writes an insert per planned shard (sqlite: two, the run's file and the index), ours
    # one for all of them (two on sqlite); the run's other events are the same on both.
    saved = stock.event_log_inserts_of_the_failed_run - ours.event_log_inserts_of_the_failed_run
    assert saved >= len(BAD) - 2


def test_a_batch_size_the_deployment_set_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "7")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(storage_yaml("sqlite", True, str(tmp_path / "storage")))
    with dg.DagsterInstance.from_config(str(home)):
        assert os.environ["DAGSTER_EVENT_BATCH_SIZE"] == "7"


@contextlib.contextmanager
def statements_sent() -> Iterator[list[str]]:
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    db.event.listen(db.engine.Engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        db.event.remove(db.engine.Engine, "before_cursor_execute", seen)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def test_partition_keys_are_read_again_only_when_another_instance_changed_them(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    home, other_home = tmp_path / "home", tmp_path / "other"
    for folder in (home, other_home):  # two instances on one storage, as the daemon and a run
        folder.mkdir()
        (folder / "dagster.yaml").write_text(storage_yaml(kind, True, where(kind, home, request, True)))
    with (
        dg.DagsterInstance.from_config(str(home)) as ours,
        dg.DagsterInstance.from_config(str(other_home)) as other,
    ):
        name = f"cache-{kind}"
        other.add_dynamic_partitions(name, ["a", "b", "c"])
        assert ours.get_dynamic_partitions(name) == ["a", "b", "c"]
        with statements_sent() as unchanged:
            assert ours.get_dynamic_partitions(name) == ["a", "b", "c"]
        reads = [s.split()[1] for s in unchanged if "FROM dynamic_partitions" in s]
        assert reads == ["count(dynamic_partitions.id)"]  # the check only, not the keys

        other.add_dynamic_partitions(name, ["d"])
        assert ours.get_dynamic_partitions(name) == ["a", "b", "c", "d"]
        other.delete_dynamic_partition(name, "b")
        assert ours.get_dynamic_partitions(name) == ["a", "c", "d"]
        other.delete_dynamic_partition(name, "a")
        other.add_dynamic_partitions(name, ["e"])  # the same count, a new highest id
        assert ours.get_dynamic_partitions(name) == ["c", "d", "e"]
        ours.add_dynamic_partitions(name, ["f"])
        assert ours.get_dynamic_partitions(name) == ["c", "d", "e", "f"]
        keys = ours.get_dynamic_partitions(name)
        keys.append("not stored")
        assert ours.get_dynamic_partitions(name) == ["c", "d", "e", "f"]


def test_sqlite_keeps_a_bounded_number_of_engines(tmp_path: Path) -> None:
    from img2ds_dagster.instance.sqlite import ENGINES_KEPT

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(storage_yaml("sqlite", True, str(tmp_path / "storage")))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = [f"run{i:03d}" for i in range(ENGINES_KEPT + 8)]
        for run_id in runs:  # each run's events go to a database file of its own
            instance.report_engine_event(f"hello from {run_id}", job_name="test", run_id=run_id)
        storage: Any = instance.event_log_storage
        assert len(storage._engines) == ENGINES_KEPT
        assert runs[0] not in storage._engines
        for run_id in (runs[0], runs[-1]):  # an engine let go is made again when needed
            (record,) = instance.all_logs(run_id)
            assert record.get_dagster_event().message == f"hello from {run_id}"


def test_a_new_run_database_is_made_as_dagster_makes_it(tmp_path: Path) -> None:
    def run_database(ours: bool) -> dict[str, Any]:
        home = tmp_path / ("ours" if ours else "stock")
        home.mkdir()
        storage = home / "storage"
        (home / "dagster.yaml").write_text(storage_yaml("sqlite", ours, str(storage)))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.report_engine_event("hello", job_name="test", run_id="run1")
        with contextlib.closing(sqlite3.connect(storage / "history" / "runs" / "run1.db")) as conn:
            return {
                "schema": conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall(),
                "revision": conn.execute("SELECT version_num FROM alembic_version").fetchall(),
                "journal": conn.execute("PRAGMA journal_mode").fetchall(),
                "events": conn.execute("SELECT COUNT(*) FROM event_logs").fetchall(),
            }

    ours, stock = run_database(True), run_database(False)
    assert ours == stock
    assert stock["journal"] == [("wal",)]
    assert stock["events"] == [(1,)]
