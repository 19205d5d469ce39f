"""How soon the first shard of a big table runs, with runs launched for real: the Dagster daemon
(``dagster-daemon run``, as ``make dev`` starts it) on a fresh sqlite instance with the project's
dagster.yaml and code location, and a parquet of ``--rows`` URLs (10 per shard by default: 100,000
shards for 1M rows) dropped into the inbox. The inbox sensor's run stages it, ``new_shards_sensor``
enqueues its shard runs, the run queue launches them (two at a time) and each run's process plans
its shards and starts building the first.

    python -m benchmarks.first_shard --rows 1000000 --json benchmarks/results/first_shard_100k.json
    python -m benchmarks.first_shard --rows 1000000 --postgres   # the instance on a throwaway PostgreSQL

Reported, in seconds: the drop to the table's partition registered and to its staging done (the
``url_tables`` run), then from the staging done to the first shard run queued, to that run's start,
to its first shard step starting (the shard is being built) and to the first shard materialized.
Nothing listens on the URLs' port, so each download fails at once: the shards are built quickly and
the run never reaches beyond this machine. The daemon is stopped after the first shard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from dagster._core.storage.dagster_run import RunsFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway PostgreSQL the tests use

from realservers import postgres_server  # noqa: E402

from benchmarks.inbox_latency import project_daemon  # noqa: E402
from img2ds_dagster.defs.jobs import build_shards  # noqa: E402

TABLE = "big"


def instance_yaml(postgres_url: str | None) -> str:
    """The project's dagster.yaml; with ``postgres_url``, its storage on that PostgreSQL instead
    (the project's Postgres storage, as deploy/ uses it)."""
    text = (ROOT / "dagster.yaml").read_text()
    if postgres_url is None:
        return text
    head, rest = text.split("storage:\n", 1)
    rest = rest[rest.index("local_artifact_storage:") :]
    storage = "storage:\n  custom:\n    module: img2ds_dagster.instance.postgres\n"
    storage += f"    class: PostgresStorage\n    config:\n      postgres_url: {postgres_url}\n"
    return head + storage + rest


def wait_for(what: str, check: Callable[[], Any], deadline: float) -> Any:
    """Polls ``check`` every 0.2 s until it returns something truthy; that value."""
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def url_file(path: Path, rows: int) -> None:
    # Nothing listens on port 9: every download fails at once, and nothing leaves the machine.
    pq.write_table(pa.table({"url": pa.array([f"http://127.0.0.1:9/{i}.jpg" for i in range(rows)])}), path)


def shard_runs(instance: dg.DagsterInstance) -> list[Any]:
    """The table's runs of the build_shards job, oldest first."""
    runs = RunsFilter(job_name=build_shards.name, tags={"img2ds/table": TABLE})
    return list(instance.get_run_records(runs, ascending=True))


def first_event(instance: dg.DagsterInstance, run_ids: list[str], kind: dg.DagsterEventType) -> float | None:
    """The earliest timestamp of an event of this kind in these runs."""
    times = [
        record.timestamp
        for run_id in run_ids
        for record in instance.get_records_for_run(run_id, of_type=kind).records
    ]
    return min(times) if times else None


def measure(work: Path, rows: int, rows_per_shard: int, timeout: float) -> dict[str, Any]:
    source = work / f"{TABLE}.parquet"  # beside the inbox, on the same file system
    url_file(source, rows)
    with dg.DagsterInstance.from_config(str(work / "home")) as instance:
        start = time.time()
        deadline = start + timeout
        # The inbox's settings file gives the shard size; the URL file lands whole (a rename).
        (work / "inbox" / "img2ds.toml").write_text(f"number_sample_per_shard = {rows_per_shard}\n")
        os.replace(source, work / "inbox" / source.name)
        registered = wait_for(
            "the partition",
            lambda: TABLE in instance.get_dynamic_partitions("url_tables") and time.time(),
            deadline,
        )

        def staged() -> float | None:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("url_tables"), asset_partitions=[TABLE]), limit=1
            ).records
            return records[0].timestamp if records else None

        staged_at = wait_for("the staging", staged, deadline)
        first_run = wait_for("a shard run", lambda: shard_runs(instance), deadline)[0]
        queued = first_run.create_timestamp.timestamp()
        run_ids = lambda: [r.dagster_run.run_id for r in shard_runs(instance)[:4]]  # noqa: E731
        run_start = wait_for(
            "a shard run's start",
            lambda: first_event(instance, run_ids(), dg.DagsterEventType.RUN_START),
            deadline,
        )
        step_start = wait_for(
            "a shard step's start",
            lambda: first_event(instance, run_ids(), dg.DagsterEventType.STEP_START),
            deadline,
        )
        built = wait_for(
            "a shard built",
            lambda: first_event(instance, run_ids(), dg.DagsterEventType.ASSET_MATERIALIZATION),
            deadline,
        )
        shards = len(instance.get_dynamic_partitions("shards"))
        enqueued_so_far = len(shard_runs(instance))
    return {
        "rows": rows,
        "shards": shards,
        "registered_after_drop": round(registered - start, 2),
        "staged_after_drop": round(staged_at - start, 2),
        "after_staged": {
            "first_run_queued": round(queued - staged_at, 2),
            "first_run_started": round(run_start - staged_at, 2),
            "first_shard_started": round(step_start - staged_at, 2),
            "first_shard_built": round(built - staged_at, 2),
        },
        "shard_runs_queued_by_then": enqueued_so_far,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rows-per-shard", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL, not sqlite")
    parser.add_argument("--json")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_server()).url if args.postgres else None
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="img2ds-first-shard-"))
        work = Path(tmp)
        stack.enter_context(project_daemon(work, instance_yaml(url)))
        report = {
            "storage": "postgres" if args.postgres else "sqlite",
            **measure(work, args.rows, args.rows_per_shard, args.timeout),
        }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
