"""Drive Dagster's sensor and backfill daemons from a test, one synchronous iteration at a time.

The code location ``img2ds_dagster.definitions`` is loaded the way ``dagster dev`` loads it (a gRPC
code server subprocess), and each call runs one daemon iteration in the test process. With an
instance made by ``dg.instance_for_test(synchronous_run_launcher=True,
synchronous_run_coordinator=True)``, the runs a daemon launches execute inline before the call
returns, so a test can assert on their outcome right after.

These use Dagster internals (daemon iterations, ``PartitionBackfill``, ``freeze_time``), which is why
pyproject.toml pins the Dagster version.

Paths: the code location's resources use relative paths (``data/inbox``, ``data/staging``,
``data/datasets``), so a test must ``chdir`` to its temporary folder before :func:`daemon_workspace`
(the code server inherits the working directory) and before any run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.scheduler.instigation import InstigatorType, SensorInstigatorData
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.utils import make_new_backfill_id
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster._daemon.sensor import execute_sensor_iteration
from dagster_shared.error import SerializableErrorInfo

from img2ds_dagster.defs.shards import shards

MODULE = "img2ds_dagster.definitions"
LOGGER = logging.getLogger("img2ds-tests.daemon")
# How far past the latest sensor tick the next one is pretended to happen: more than any sensor's
# minimum_interval_seconds, so every running sensor is evaluated on every call.
SENSOR_TICK_STEP = 3600.0
# A backfill's status only ends after its runs have ended; each iteration launches (and, with the
# synchronous launcher, runs) what it can, so a few iterations are enough for a small backfill.
MAX_BACKFILL_ITERATIONS = 20
UNFINISHED_BACKFILL = (BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING, BulkActionStatus.FAILING)


@contextmanager
def daemon_workspace(instance: dg.DagsterInstance) -> Iterator[WorkspaceProcessContext]:
    """The project's code location, served by a code server subprocess started in the current folder."""
    target = ModuleTarget(
        module_name=MODULE, attribute="defs", working_directory=None, location_name="img2ds_dagster"
    )
    with create_test_daemon_workspace_context(target, instance) as ctx:
        yield ctx


def _raise_errors(errors: Iterable[SerializableErrorInfo | None], what: str) -> None:
    # The daemons store an error on the tick or backfill and carry on; a test wants to see it.
    found = [error for error in errors if error is not None]
    if found:
        raise AssertionError(f"{what} failed:\n" + "\n".join(e.to_string() for e in found))


def tick_sensors(ctx: WorkspaceProcessContext) -> float:
    """One sensor-daemon iteration over every running sensor; returns the Unix time it pretended.

    Dagster's clock is frozen at :data:`SENSOR_TICK_STEP` after the latest tick, so the sensors'
    ``minimum_interval_seconds`` never holds a tick back and no test sleeps. Only Dagster's clock is
    frozen: the sensor functions run in the code server and see the real time (the inbox's settle
    delay is real), and runs launched by the tick record that frozen time on their events.
    """
    last_tick = 0.0
    for state in ctx.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        data = state.instigator_data
        if isinstance(data, SensorInstigatorData):
            last_tick = max(last_tick, data.last_tick_start_timestamp or 0.0, data.last_tick_timestamp or 0.0)
    now = max(time.time(), last_tick + SENSOR_TICK_STEP)
    with freeze_time(now):
        errors = list(
            execute_sensor_iteration(ctx, LOGGER, threadpool_executor=None, submit_threadpool_executor=None)
        )
    _raise_errors(errors, "sensor tick")
    return now


def sensor_cursors(instance: dg.DagsterInstance) -> dict[str, str | None]:
    """The cursor each sensor has stored in the instance, by sensor name."""
    return {
        state.instigator_name: state.instigator_data.cursor
        for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        if isinstance(state.instigator_data, SensorInstigatorData)
    }


def add_asset_backfill(ctx: WorkspaceProcessContext, asset_key: dg.AssetKey, keys: Sequence[str]) -> str:
    """Request a backfill of these partitions of one asset, as the UI does; returns the backfill id."""
    backfill_id = make_new_backfill_id()
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id,
        asset_graph=ctx.create_request_context().asset_graph,
        partition_names=list(keys),
        asset_selection=[asset_key],
        backfill_timestamp=time.time(),
        tags={},
        dynamic_partitions_store=ctx.instance,
        all_partitions=False,
        title=None,
        description=None,
        run_config=None,
    )
    ctx.instance.add_backfill(backfill)
    return backfill_id


def run_backfill_to_end(ctx: WorkspaceProcessContext, backfill_id: str) -> BulkActionStatus:
    """Iterate the backfill daemon until the backfill has ended; returns its final status."""
    status = None
    for _ in range(MAX_BACKFILL_ITERATIONS):
        _raise_errors(execute_backfill_iteration(ctx, LOGGER), f"backfill {backfill_id}")
        backfill = ctx.instance.get_backfill(backfill_id)
        assert backfill is not None, f"backfill {backfill_id} is gone"
        status = backfill.status
        if status not in UNFINISHED_BACKFILL:
            return status
    raise AssertionError(f"backfill {backfill_id} still {status} after {MAX_BACKFILL_ITERATIONS} iterations")


def statuses(
    instance: dg.DagsterInstance, keys: Sequence[str], asset: dg.AssetsDefinition = shards
) -> dict[str, dg.AssetPartitionStatus | None]:
    """Status of each partition key of ``asset`` (None: never materialized nor failed)."""
    partitions_def = asset.partitions_def
    assert partitions_def is not None, f"{asset.key} is not partitioned"
    # Dagster answers None, not {}, for an asset without any event yet.
    found = instance.get_status_by_partition(asset.key, keys, partitions_def) or {}
    return {key: found.get(key) for key in keys}
