"""Backfills of ``shards`` through the backfill daemon, as the UI launches them: missing shards, then
a failed shard retried with a "failed only" backfill.

A table is staged with an in-process ``url_tables`` run, using the same folders as the code location
(``data/...`` under the test's folder, which is the working directory), then the daemon runs the
backfill's runs inline (synchronous run launcher).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from conftest import write_url_file
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster_support import add_asset_backfill, daemon_workspace, run_backfill_to_end, statuses
from imageserver import ImageServer

from img2ds_dagster.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, SHARDS, URL_TABLES
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.defs.stats import download_stats
from img2ds_dagster.defs.url_tables import url_tables

pytestmark = pytest.mark.slow

ROWS_PER_SHARD = 2
SHARDS_PER_RUN = 4


@pytest.fixture
def daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dg.DagsterInstance, WorkspaceProcessContext]]:
    """An instance whose runs execute inline, and the code location served from the test's folder,
    with backfill runs of up to SHARDS_PER_RUN shards."""
    # Before the code server starts: it and the runs resolve the location's data/ paths from here,
    # and its backfill policy reads the runs' size when it loads the code location.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMG2DS_SHARDS_PER_RUN", str(SHARDS_PER_RUN))
    with (
        dg.instance_for_test(synchronous_run_launcher=True, synchronous_run_coordinator=True) as instance,
        daemon_workspace(instance) as ctx,
    ):
        yield instance, ctx


def storage(root: Path) -> StorageResource:
    """The code location's folders, as absolute paths."""
    data = root / "data"
    return StorageResource(
        inbox=str(data / "inbox"), staging=str(data / "staging"), datasets=str(data / "datasets")
    )


def stage(
    instance: dg.DagsterInstance, root: Path, server: ImageServer, table: str, shard_count: int
) -> list[str]:
    """Stage a table of small images, ROWS_PER_SHARD per shard; returns its shard keys."""
    urls = [server.url(f"/gen/64x48.jpg?t={table}&i={i}") for i in range(shard_count * ROWS_PER_SHARD)]
    source = write_url_file(root / "sources" / f"{table}.csv", urls)
    instance.add_dynamic_partitions(URL_TABLES, [table])
    config = {"source": str(source), "number_sample_per_shard": ROWS_PER_SHARD, "output_format": "webdataset"}
    result = dg.materialize(
        [url_tables, shards, download_stats],
        selection=[url_tables],
        partition_key=table,
        instance=instance,
        resources={"storage": storage(root), "workers": WorkersResource()},
        run_config={"ops": {"url_tables": {"config": config}}},
    )
    assert result.success
    keys = [f"{table}/{i:05d}" for i in range(shard_count)]
    assert [k for k in instance.get_dynamic_partitions(SHARDS) if k.startswith(f"{table}/")] == keys
    return keys


def backfill_runs(instance: dg.DagsterInstance, backfill_id: str) -> list[dg.DagsterRun]:
    records = instance.get_run_records(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
    return [record.dagster_run for record in records]


def run_keys(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    """The shard keys a run covered: its single partition, or its range over the registration order."""
    if "dagster/partition" in run.tags:
        return [run.tags["dagster/partition"]]
    ordered = list(instance.get_dynamic_partitions(SHARDS))
    first, last = run.tags[RANGE_START_TAG], run.tags[RANGE_END_TAG]
    return ordered[ordered.index(first) : ordered.index(last) + 1]


def assert_outputs(root: Path, table: str, keys: list[str]) -> None:
    folder = root / "data" / "datasets" / table
    for key in keys:
        name = key.rsplit("/", 1)[1]
        for suffix in (".tar", ".parquet", "_stats.json"):
            assert (folder / f"{name}{suffix}").stat().st_size > 0, f"{name}{suffix}"


def test_backfill_of_missing_shards_groups_them_into_runs(
    tmp_path: Path, server: ImageServer, daemon: tuple[dg.DagsterInstance, WorkspaceProcessContext]
) -> None:
    instance, ctx = daemon
    keys = stage(instance, tmp_path, server, "t", shard_count=10)
    assert set(statuses(instance, keys).values()) == {None}

    backfill_id = add_asset_backfill(ctx, shards.key, keys)
    assert run_backfill_to_end(ctx, backfill_id) == BulkActionStatus.COMPLETED_SUCCESS

    assert statuses(instance, keys) == dict.fromkeys(keys, dg.AssetPartitionStatus.MATERIALIZED)
    runs = backfill_runs(instance, backfill_id)
    # The BackfillPolicy: runs of at most IMG2DS_SHARDS_PER_RUN contiguous keys, as few as fit.
    covered = [run_keys(instance, run) for run in runs]
    assert sorted(len(c) for c in covered) == [2, 4, 4]
    assert sorted(k for c in covered for k in c) == keys
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    assert_outputs(tmp_path, "t", keys)


def test_failed_shard_then_backfill_of_the_failed_ones(
    tmp_path: Path, server: ImageServer, daemon: tuple[dg.DagsterInstance, WorkspaceProcessContext]
) -> None:
    instance, ctx = daemon
    keys = stage(instance, tmp_path, server, "t", shard_count=4)
    broken = "t/00002"
    staging = storage(tmp_path).staging_area()
    Path(staging.shard_path("t", "00002")).unlink()  # its input is gone: every attempt fails

    first = add_asset_backfill(ctx, shards.key, keys)
    assert run_backfill_to_end(ctx, first) == BulkActionStatus.COMPLETED_FAILED
    status = statuses(instance, keys)
    assert status == {
        **dict.fromkeys(keys, dg.AssetPartitionStatus.MATERIALIZED),
        broken: dg.AssetPartitionStatus.FAILED,
    }
    (failed_run,) = backfill_runs(instance, first)
    assert failed_run.status == dg.DagsterRunStatus.FAILURE
    # The step was retried (RetryPolicy) but skipped the shards finished before: one event per shard.
    events = instance.get_records_for_run(
        run_id=failed_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    assert Counter(e.partition_key for e in events) == Counter(k for k in keys if k != broken)
    retries = instance.get_records_for_run(
        run_id=failed_run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY
    ).records
    assert len(retries) == 2

    # Fix the cause (stage the table again), then backfill only what failed, as the UI offers.
    stage(instance, tmp_path, server, "t", shard_count=4)
    failed = [key for key, s in status.items() if s == dg.AssetPartitionStatus.FAILED]
    assert failed == [broken]
    retry = add_asset_backfill(ctx, shards.key, failed)
    assert run_backfill_to_end(ctx, retry) == BulkActionStatus.COMPLETED_SUCCESS
    assert [run_keys(instance, run) for run in backfill_runs(instance, retry)] == [[broken]]
    assert statuses(instance, keys) == dict.fromkeys(keys, dg.AssetPartitionStatus.MATERIALIZED)
    assert_outputs(tmp_path, "t", keys)
