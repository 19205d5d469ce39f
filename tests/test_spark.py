"""distributor="pyspark" on a real Spark cluster on 127.0.0.1: ``local-cluster[2,1,1024]``, a master
and a worker with two executor JVMs of one core each (Debian's OpenJDK), writing to the S3 test
server: every shard built once, on both executors, byte for byte what the in-process distributor
writes; an executor killed mid-run loses nothing; download() runs its shards there."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusters import (
    BUCKET,
    assert_every_row_once,
    build_all,
    in_process_tars,
    s3_for_clusters,
    shard_files,
    stage_table,
    started_shards,
    workers_seen,
)
from conftest import write_url_file
from imageserver import ImageServer
from pyspark.sql import SparkSession

from img2ds_dagster import download
from img2ds_dagster.engine.on_spark import task_workers
from img2ds_dagster.engine.shard import ShardResult, Workers
from img2ds_dagster.errors import ConfigError

SPARK = Workers(distributor="pyspark", thread_count=4)
SLOW = "/retry-after/1/1/gen/64x48.jpg"  # a 429 with Retry-After: 1 first: each shard takes > 1 s


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    """The session, built once the S3 variables are set (the executors inherit them)."""
    with s3_for_clusters(), pytest.MonkeyPatch.context() as env:
        env.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # the master, the worker and the executors on loopback
        env.setenv("SPARK_WORKER_DIR", str(tmp_path_factory.mktemp("spark-work")))
        # The executors' Python: this one, which has the package (python3 on the PATH may not).
        # PySpark reads it when the context starts; spark.pyspark.python is spark-submit's.
        env.setenv("PYSPARK_PYTHON", sys.executable)
        session = (
            SparkSession.builder.master("local-cluster[2,1,1024]")
            .appName("img2ds-tests")
            .config("spark.ui.enabled", "false")
            .config("spark.task.maxFailures", "4")
            .getOrCreate()
        )
        try:
            yield session
        finally:
            session.stop()


def executors() -> dict[str, int]:
    """The executor JVMs running now: their pid by executor id."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"org.apache.spark.executor.CoarseGrainedExecutorBackend" in args:
            found[args[args.index(b"--executor-id") + 1].decode()] = int(pid)
    return found


def executor_ids(seen: set[str]) -> set[str]:
    """'executor 1 on host' -> '1'."""
    return {w.split()[2] for w in seen}


def test_every_shard_once_on_both_executors_and_byte_identical(
    spark: SparkSession, server: ImageServer, tmp_path: Path
) -> None:
    staging, manifest = stage_table(server, tmp_path, f"s3://{BUCKET}/spark", "t", shards=6, path=SLOW)
    results = build_all(staging, manifest, SPARK)
    assert all(isinstance(r, ShardResult) for r in results.values()), results
    assert_every_row_once(manifest)
    assert len(executor_ids(workers_seen(manifest))) == 2, workers_seen(manifest)
    assert shard_files(manifest) == in_process_tars(server, tmp_path, "t", shards=6, path=SLOW)


def test_a_task_uses_as_many_cpu_threads_as_it_holds_cores(spark: SparkSession) -> None:
    # Two executors of one core each: a task holds one core (spark.task.cpus), so its CPU pool has
    # one thread, not one per core of the machine; a number given in the settings is kept.
    def threads(given: int) -> list[int]:
        settings = Workers(cpu_threads=given)
        rdd = spark.sparkContext.parallelize([settings, settings], 2)
        return rdd.map(lambda w: task_workers(w).cpu_threads).collect()

    assert threads(0) == [1, 1]
    assert threads(3) == [3, 3]


def test_local_paths_are_refused_on_a_cluster(
    spark: SparkSession, server: ImageServer, tmp_path: Path
) -> None:
    staging, manifest = stage_table(server, tmp_path, str(tmp_path / "data"), "t", shards=1)
    with pytest.raises(ConfigError, match=r"distributor='pyspark': .* is a local path that the other nodes"):
        build_all(staging, manifest, SPARK)


def test_download_with_the_pyspark_distributor_to_s3(
    spark: SparkSession, server: ImageServer, tmp_path: Path
) -> None:
    urls = [server.url(f"/gen/64x48.jpg?spark-download={i}") for i in range(8)]
    source = write_url_file(tmp_path / "urls.txt", urls)
    report = download(
        str(source),
        output_folder=f"s3://{BUCKET}/spark-download",
        distributor="pyspark",
        number_sample_per_shard=4,
        thread_count=4,
    )
    assert report.shards_built == ["urls/00000", "urls/00001"]
    assert report.totals["successes"] == 8


def test_an_executor_killed_mid_run_loses_nothing(
    spark: SparkSession, server: ImageServer, tmp_path: Path
) -> None:
    staging, manifest = stage_table(server, tmp_path, f"s3://{BUCKET}/killed", "k", shards=6, path=SLOW)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(results=build_all(staging, manifest, SPARK)))
    thread.start()
    # Both executors (one core each) are building a shard once two shards' URLs have been asked for.
    started = started_shards(server, "k", 6)
    while len(started()) < 2 and thread.is_alive():
        time.sleep(0.05)
    victim, pid = sorted(executors().items())[0]
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish"
    assert all(isinstance(r, ShardResult) for r in out["results"].values()), out["results"]
    assert_every_row_once(manifest)
    # The killed executor's shard was under way: Spark ran it again elsewhere.
    assert victim not in executor_ids(workers_seen(manifest))
    assert shard_files(manifest) == in_process_tars(server, tmp_path, "k", shards=6, path=SLOW)
