"""``distributor="pyspark"``: one Spark job of one partition per shard, as img2dataset does.

The driver submits each shard as its own job, from as many threads as the cluster has task slots,
so that a shard's result comes back as soon as it is written (one job over every shard would return
them all at the end). Spark retries a task whose executor was lost (``spark.task.maxFailures``, set
from ``task_retries`` on a session built here); a shard that still fails comes back as a ShardError.
Importing this module imports pyspark.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

from pyspark import SparkContext, TaskContext
from pyspark.sql import SparkSession

from ..errors import ShardError
from .distribute import Built, build_on_worker, require_shared_storage
from .shard import ShardJob, ShardResult, Workers


class SparkDistributor:
    """Shards as Spark tasks, on the active SparkSession, or on one built for ``master`` (a Spark
    master URL: ``spark://host:7077``, ``local-cluster[2,1,1024]``, ``local[4]``...) and stopped
    after the shards."""

    def __init__(self, master: str | None = None) -> None:
        self.master = master

    def build(self, staging_root: str, jobs: Sequence[ShardJob], workers: Workers) -> Iterator[Built]:
        session = SparkSession.getActiveSession()
        started = session is None
        if session is None:
            session = _session(self.master, workers.task_retries)
        try:
            context = session.sparkContext
            require_shared_storage(staging_root, jobs, workers, _nodes(context))
            yield from _as_finished(context, staging_root, jobs, workers)
        finally:
            if started:
                session.stop()


def _session(master: str | None, task_retries: int) -> SparkSession:
    builder = SparkSession.builder.appName("img2ds_dagster").config(
        "spark.task.maxFailures", str(task_retries + 1)
    )
    if master:
        builder = builder.master(master)
    # The executors run this Python, which has this package. PySpark takes the executors' Python
    # from this variable when the context starts (spark.pyspark.python is read by spark-submit only);
    # a cluster whose machines have it elsewhere sets PYSPARK_PYTHON itself.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return builder.getOrCreate()


def _nodes(context: SparkContext) -> int:
    """1 for Spark in this process (``local``, ``local[n]``); otherwise the tasks may run on any
    machine of the cluster, whichever have registered yet: counted as 2."""
    master = context.master or ""
    return 1 if master == "local" or master.startswith("local[") else 2


def _as_finished(
    context: SparkContext, staging_root: str, jobs: Sequence[ShardJob], workers: Workers
) -> Iterator[Built]:
    group = f"img2ds-{uuid.uuid4().hex[:12]}"

    def run(job: ShardJob) -> ShardResult | ShardError:
        # Local properties are per thread (PySpark's pinned threads): this thread's job is in the group.
        context.setJobGroup(group, f"img2ds_dagster shard {job}", interruptOnCancel=True)
        rdd = context.parallelize([(staging_root, job, workers)], 1)
        return rdd.map(_build).collect()[0]

    slots = max(1, min(len(jobs), context.defaultParallelism))
    with ThreadPoolExecutor(slots, "img2ds-spark") as pool:
        futures: dict[Future[ShardResult | ShardError], ShardJob] = {pool.submit(run, j): j for j in jobs}
        try:
            for future in as_completed(futures):
                job = futures[future]
                try:
                    result = future.result()
                except Exception as err:
                    result = ShardError(f"shard {job}: failed on the Spark cluster: {_first_line(err)}")
                yield job, result
        finally:
            for future in futures:
                future.cancel()
            context.cancelJobGroup(group)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _build(payload: tuple[str, ShardJob, Workers]) -> ShardResult | ShardError:
    staging_root, job, workers = payload
    return build_on_worker(staging_root, job, task_workers(workers), f"spark {_executor()}")


def task_workers(workers: Workers) -> Workers:
    """The settings a task builds its shard with: with ``cpu_threads`` at 0 ("one per core"), as
    many CPU threads as the task holds cores (``spark.task.cpus``, 1 by default), since an executor
    runs as many tasks at once as it has cores, each in a Python worker of its own: one thread per
    core in each would be cores x cores threads (4 on 2 cores, 256 on 16). Runs on an executor."""
    if workers.cpu_threads:
        return workers
    context = TaskContext.get()
    return dataclasses.replace(workers, cpu_threads=context.cpus() if context is not None else 1)


def _executor() -> str:
    """Where this Python worker runs: its executor's id where the cluster names its folder after it
    (standalone and local-cluster masters run each executor in ``work/app-.../<executor id>``), and
    the host and the executor's Python daemon otherwise."""
    here = os.getcwd()
    if os.path.basename(os.path.dirname(here)).startswith("app-"):
        return f"executor {os.path.basename(here)} on {socket.gethostname()}"
    return f"executor on {socket.gethostname()} (python daemon pid {os.getppid()})"
