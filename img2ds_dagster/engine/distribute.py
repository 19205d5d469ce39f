"""Where a run's shards are built: in this process (``multiprocessing``, the default), or on a Ray
(``ray``) or Spark (``pyspark``) cluster.

A distributor maps shard jobs to ``build_shard`` calls, wherever those run, and yields each job with
its ``ShardResult`` (or the ``ShardError`` naming it) as it finishes; closing the iterator early (the
caller failed, or its run was stopped) cancels the shards not finished. A worker needs only the
staging area, the table's settings and the output folder, all fsspec URLs: it never touches the
Dagster instance, which stays with the caller (the ``download()`` process, or the Dagster run's).

Ray and pyspark are imported only by their distributor (``pip install 'img2ds_dagster[ray]'`` or
``[spark]``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Protocol

from ..errors import ConfigError, ShardError
from .cpu import CpuPool
from .fetch import HttpClient
from .runtime import objects_spared_by_gc, prepare_process
from .shard import ShardJob, ShardResult, Shared, Turn, Workers, build_shard
from .sources import Staging
from .storage import local_path

Built = tuple[ShardJob, ShardResult | ShardError]


class Distributor(Protocol):
    """Builds shards somewhere; yields each as it finishes. Closing the iterator cancels the rest."""

    def build(self, staging_root: str, jobs: Sequence[ShardJob], workers: Workers) -> Iterator[Built]: ...


def distributor(workers: Workers) -> Distributor:
    """The distributor ``workers.distributor`` names, connected to ``workers.cluster``."""
    if workers.distributor == "ray":
        from .on_ray import RayDistributor  # noqa: PLC0415 - ray is an optional extra

        return RayDistributor(workers.cluster)
    if workers.distributor == "pyspark":
        from .on_spark import SparkDistributor  # noqa: PLC0415 - pyspark is an optional extra

        return SparkDistributor(workers.cluster)
    return InProcess()


def build_shards(staging_root: str, jobs: Sequence[ShardJob], workers: Workers) -> Iterator[Built]:
    """Build these shards with the distributor ``workers`` names; yields each as it finishes."""
    return distributor(workers).build(staging_root, jobs, workers)


class InProcess:
    """Every shard in this process, ``parallel_shards`` taking downloads at once, sharing one CPU
    pool and one HTTP client (so the per-host limits hold across them)."""

    def build(self, staging_root: str, jobs: Sequence[ShardJob], workers: Workers) -> Iterator[Built]:
        prepare_process()
        staging = Staging(staging_root)
        # parallel_shards shards take new downloads at once; a shard whose downloads are all taken
        # (its last, slowest ones under way: a host that makes it wait) lets the next one start, in a
        # thread of its own, so that a slow host at the end of a shard does not leave the cores idle.
        taking = threading.Semaphore(max(1, workers.parallel_shards))
        threads = max(1, min(len(jobs), 4 * workers.parallel_shards))
        with (
            objects_spared_by_gc(),
            CpuPool(workers.cpu_slots) as cpu,
            HttpClient(workers.politeness()) as client,
            ThreadPoolExecutor(threads, "img2ds-shard") as pool,
        ):
            # Lanes in job order: the shards finish one after another, in the order they were asked for.
            shared = Shared(cpu, client, taking)
            futures = {
                pool.submit(_taking_turns, staging, job, workers, shared, cpu.lane()): job for job in jobs
            }
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:  # closed early: the shards not started are not started
                    future.cancel()


def _taking_turns(
    staging: Staging, job: ShardJob, workers: Workers, shared: Shared, lane: int
) -> ShardResult | ShardError:
    if shared.taking is not None:
        shared.taking.acquire()
    done_taking = _Once(shared.taking.release if shared.taking is not None else lambda: None)
    try:
        return build_shard(staging, job, workers, shared=shared, turn=Turn(lane, done_taking))
    # A shard's failure is reported against that shard; the run's other shards carry on.
    except Exception as err:
        return shard_error(job, err)
    finally:
        done_taking()


class _Once:
    """A callable that calls ``action`` the first time only."""

    def __init__(self, action: Callable[[], object]) -> None:
        self._action: Callable[[], object] | None = action

    def __call__(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()


def build_on_worker(
    staging_root: str, job: ShardJob, workers: Workers, worker: str
) -> ShardResult | ShardError:
    """What a cluster task runs: one shard, with the CPU pool and HTTP client of its worker process
    (``worker_shared``), its failure returned rather than raised (the engine retries lost tasks; a
    failed shard is Dagster's to retry). ``worker`` names where it ran, for the shard's stats."""
    try:
        shared = worker_shared(workers)
        result = build_shard(Staging(staging_root), job, workers, shared=shared, where=worker)
    except ShardError as err:
        return err
    except Exception as err:  # the pool or the client may be what broke: the next shard gets new ones
        drop_worker_shared(workers)
        return shard_error(job, err)
    return result


# A worker process's CPU pool and HTTP client, by the settings they were made for.
_WORKER_SHARED: dict[tuple[int, int, float, int], Shared] = {}
_WORKER_SHARED_LOCK = threading.Lock()


def _shared_key(workers: Workers) -> tuple[int, int, float, int]:
    return (
        workers.cpu_slots,
        workers.max_connections_per_host,
        workers.min_request_interval,
        workers.host_failure_limit,
    )


def worker_shared(workers: Workers) -> Shared:
    """The CPU pool and HTTP client of this worker process, made by its first shard and kept for
    the next: Ray and Spark run a process's tasks one after another in the same process, so its
    shards share one pool of threads and one client, as the shards of an in-process run do (each
    host's robots.txt fetched once per process, not once per shard; the per-host limits held across
    the process's shards). Their threads are daemons: nothing keeps the process from ending."""
    key = _shared_key(workers)
    with _WORKER_SHARED_LOCK:
        shared = _WORKER_SHARED.get(key)
        if shared is None:
            cpu = CpuPool(workers.cpu_slots)
            try:
                client = HttpClient(workers.politeness())
            except BaseException:
                cpu.close()
                raise
            shared = _WORKER_SHARED[key] = Shared(cpu, client)
        return shared


def drop_worker_shared(workers: Workers) -> None:
    with _WORKER_SHARED_LOCK:
        shared = _WORKER_SHARED.pop(_shared_key(workers), None)
    if shared is not None:
        shared.client.close()
        shared.cpu.close()


def shard_error(job: ShardJob, err: BaseException) -> ShardError:
    if isinstance(err, ShardError):
        return err
    wrapped = ShardError(f"shard {job}: {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped


def require_shared_storage(staging_root: str, jobs: Sequence[ShardJob], workers: Workers, nodes: int) -> None:
    """On a cluster of several nodes, the staging area and every output folder must be storage that
    every node sees (s3://, gs://...): a worker's local /data is not the driver's. A local path on a
    mount every node shares is accepted when ``workers.shared_filesystem`` says so."""
    if nodes < 2 or workers.shared_filesystem:
        return
    staging = Staging(staging_root)
    folders = {"the staging area": staging.root}
    for table in sorted({job.table for job in jobs}):
        folders[f"table {table}'s output folder"] = staging.manifest(table).output_folder
    local = [f"{what} {path}" for what, path in folders.items() if local_path(path) is not None]
    if local:
        raise ConfigError(
            f"distributor={workers.distributor!r}: the cluster has {nodes} nodes, and "
            + "; ".join(local)
            + " is a local path that the other nodes do not see: use shared storage (s3://, gs://...), "
            "or set shared_filesystem=True if it is a mount every node shares at the same path"
        )
