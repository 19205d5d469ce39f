"""Whether orchestration keeps up with many shards: a table of ``--shards`` shards staged, its runs
enqueued by ``new_shards_sensor`` and by a UI backfill of every shard, and the sensor's tick for the
same table staged again once its shards are built. Runs are created and queued, never launched (the
instance's run queue admits none), as the issue measured them.

::

    python -m benchmarks.orchestration --shards 100000 --json benchmarks/results/orchestration_100k.json
    python -m benchmarks.orchestration --shards 100000 --postgres    # on a throwaway PostgreSQL

The code location is loaded as ``dagster dev`` loads it (a code server subprocess), and the sensor
and backfill daemons are driven one iteration at a time from here (tests/dagster_support.py), on an
instance of the given storage. "Built" shards are materializations recorded as the shards asset
records them (input fingerprint in the metadata and as data version), written straight to the event
log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.dagster_run import RunsFilter

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # the daemon drivers the tests use

from dagster_support import add_asset_backfill, daemon_workspace, tick_sensors  # noqa: E402
from realservers import postgres_server  # noqa: E402

from img2ds_dagster.defs.partitions import SHARDS, URL_TABLES  # noqa: E402
from img2ds_dagster.defs.resources import StorageResource, WorkersResource  # noqa: E402
from img2ds_dagster.defs.shards import INPUT_FINGERPRINT, shards  # noqa: E402
from img2ds_dagster.defs.stats import download_stats  # noqa: E402
from img2ds_dagster.defs.url_tables import url_tables  # noqa: E402
from img2ds_dagster.engine.sources import Staging  # noqa: E402

TABLE = "big"
RUN_QUEUE = "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: QueuedRunCoordinator\n"
RUN_QUEUE += "  config:\n    max_concurrent_runs: 0\n"  # runs wait in the queue: none is launched
EVENT_BATCH = 1000


def instance_yaml(home: Path, postgres_url: str | None, stock: bool) -> None:
    kind = "postgres" if postgres_url else "sqlite"
    config = f"postgres_url: {postgres_url}" if postgres_url else f"base_dir: {home / 'storage'}"
    if stock:  # Dagster's own storage
        storage = f"storage:\n  {kind}:\n    {config}\n"
    else:  # the project's (img2ds_dagster/instance), as dagster.yaml and deploy/ use it
        module = f"img2ds_dagster.instance.{kind}"
        storage = f"storage:\n  custom:\n    module: {module}\n    class: {kind.capitalize()}Storage\n"
        storage += f"    config:\n      {config}\n"
    (home / "dagster.yaml").write_text(storage + RUN_QUEUE + "telemetry:\n  enabled: false\n")


def url_file(path: Path, rows: int) -> Path:
    # Nothing listens on port 9: the URLs are never fetched here.
    urls = pa.array([f"http://127.0.0.1:9/{i}.jpg" for i in range(rows)])
    pq.write_table(pa.table({"url": urls}), path)
    return path


def stage(instance: dg.DagsterInstance, root: Path, source: Path, rows_per_shard: int) -> float:
    """One url_tables run, as the inbox sensor's run would do it; its duration."""
    data = root / "data"
    resources = {
        "storage": StorageResource(
            inbox=str(data / "inbox"), staging=str(data / "staging"), datasets=str(data / "datasets")
        ),
        "workers": WorkersResource(),
    }
    config = {"source": str(source), "number_sample_per_shard": rows_per_shard, "input_format": "parquet"}
    start = time.perf_counter()
    result = dg.materialize(
        [url_tables, shards, download_stats],
        selection=[url_tables],
        partition_key=TABLE,
        instance=instance,
        resources=resources,
        run_config={"ops": {"url_tables": {"config": config}}},
    )
    assert result.success
    return time.perf_counter() - start


def record_built(instance: dg.DagsterInstance, root: Path) -> float:
    """A materialization of every shard of the table, with the fingerprint of its staged rows, as if
    each had been built; the time it took to write them."""
    manifest = Staging(str(root / "data" / "staging")).manifest(TABLE)
    keys = [f"{TABLE}/{manifest.shard_name(i)}" for i in manifest.shard_ids]
    start = time.perf_counter()
    for first in range(0, len(keys), EVENT_BATCH):
        entries = []
        for offset, key in enumerate(keys[first : first + EVENT_BATCH]):
            fingerprint = manifest.fingerprint(manifest.shard_ids[first + offset])
            materialization = dg.AssetMaterialization(
                asset_key=shards.key,
                partition=key,
                metadata={"count": 10, INPUT_FINGERPRINT: dg.MetadataValue.text(fingerprint)},
                tags={DATA_VERSION_TAG: fingerprint},
            )
            event = DagsterEvent(
                event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
                job_name="__ephemeral_asset_job__",
                event_specific_data=StepMaterializationData(materialization),
            )
            entries.append(
                EventLogEntry(
                    error_info=None,
                    level="INFO",
                    user_message="",
                    run_id="built-before",
                    timestamp=time.time(),
                    dagster_event=event,
                )
            )
        instance.event_log_storage.store_event_batch(entries)
    return time.perf_counter() - start


def queued_runs(instance: dg.DagsterInstance, tags: dict[str, str] | None = None) -> list[Any]:
    return list(instance.get_run_records(RunsFilter(tags=tags or {}), ascending=True))


def enqueue_by_sensor(ctx: Any) -> dict[str, Any]:
    """One sensor-daemon iteration: new_shards_sensor's requests for the staged table, submitted."""
    instance = ctx.instance
    before = len(queued_runs(instance, {"img2ds/table": TABLE}))
    start = time.time()
    tick_sensors(ctx)
    seconds = time.time() - start
    runs = queued_runs(instance, {"img2ds/table": TABLE})[before:]
    first = runs[0].create_timestamp.timestamp() - start if runs else None
    return {"seconds": round(seconds, 1), "runs": len(runs), "first_run_queued_after": first}


def enqueue_by_backfill(ctx: Any, keys: list[str]) -> dict[str, Any]:
    """A UI backfill of every shard, driven until the backfill daemon has created all its runs."""
    from dagster._core.storage.tags import BACKFILL_ID_TAG
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster_support import LOGGER

    instance = ctx.instance
    start = time.time()
    backfill_id = add_asset_backfill(ctx, shards.key, keys)
    covered, iterations, first = 0, 0, None
    while covered < len(keys):
        list(execute_backfill_iteration(ctx, LOGGER))
        iterations += 1
        runs = queued_runs(instance, {BACKFILL_ID_TAG: backfill_id})
        if runs and first is None:
            first = runs[0].create_timestamp.timestamp() - start
        covered = sum(_run_size(r.dagster_run.tags, keys) for r in runs)
        if iterations > 10_000:
            raise SystemExit(f"backfill {backfill_id}: {covered} of {len(keys)} shards after {iterations}")
    return {
        "seconds": round(time.time() - start, 1),
        "runs": len(runs),
        "iterations": iterations,
        "first_run_queued_after": first,
    }


def _run_size(tags: dict[str, str], keys: list[str]) -> int:
    from img2ds_dagster.defs.partitions import RANGE_END_TAG, RANGE_START_TAG

    if RANGE_START_TAG in tags:
        return keys.index(tags[RANGE_END_TAG]) - keys.index(tags[RANGE_START_TAG]) + 1
    return 1


@contextlib.contextmanager
def instance_at(home: Path, postgres: bool, stock: bool) -> Iterator[dg.DagsterInstance]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_server()).url if postgres else None
        home.mkdir(parents=True, exist_ok=True)
        instance_yaml(home, url, stock)
        os.environ["DAGSTER_HOME"] = str(home)
        instance = stack.enter_context(dg.DagsterInstance.from_config(str(home)))
        yield instance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--rows-per-shard", type=int, default=10)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL, not sqlite")
    parser.add_argument("--stock-storage", action="store_true", help="Dagster's storage, not the project's")
    parser.add_argument("--skip", default="", help="steps to leave out: sensor, backfill, restage")
    parser.add_argument("--json")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    report_path = Path(args.json).resolve() if args.json else None  # before the chdir below
    report: dict[str, Any] = {
        "shards": args.shards,
        "rows_per_shard": args.rows_per_shard,
        "storage": "postgres" if args.postgres else "sqlite",
        "shards_per_run": os.environ.get("IMG2DS_SHARDS_PER_RUN", "default"),
        # Dagster writes one "materialization planned" event per shard of each run it creates: the
        # project's storage writes a run's together, Dagster's one by one.
        "storage_class": "dagster" if args.stock_storage else "img2ds_dagster.instance",
    }
    with tempfile.TemporaryDirectory(prefix="img2ds-orchestration-") as tmp:
        root = Path(tmp)
        os.chdir(root)  # the code location's data/ folders, for the code server and the runs
        source = url_file(root / f"{TABLE}.parquet", args.shards * args.rows_per_shard)
        at = instance_at(root / "home", args.postgres, args.stock_storage)
        with at as instance, daemon_workspace(instance) as ctx:
            instance.add_dynamic_partitions(URL_TABLES, [TABLE])
            report["stage_seconds"] = round(stage(instance, root, source, args.rows_per_shard), 1)
            keys = [k for k in instance.get_dynamic_partitions(SHARDS) if k.startswith(TABLE + "/")]
            assert len(keys) == args.shards, len(keys)
            print(f"staged {len(keys)} shards in {report['stage_seconds']} s", flush=True)
            if "sensor" not in skip:
                report["sensor"] = enqueue_by_sensor(ctx)
                print(f"sensor: {report['sensor']}", flush=True)
            if "backfill" not in skip:
                report["backfill"] = enqueue_by_backfill(ctx, keys)
                print(f"backfill: {report['backfill']}", flush=True)
            if "restage" not in skip:
                report["record_built_seconds"] = round(record_built(instance, root), 1)
                report["restage_seconds"] = round(stage(instance, root, source, args.rows_per_shard), 1)
                report["restage_tick"] = enqueue_by_sensor(ctx)
                print(f"re-stage tick at {len(keys)} built shards: {report['restage_tick']}", flush=True)
    print(json.dumps(report, indent=1))
    if report_path:
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
