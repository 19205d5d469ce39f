"""``distributor="ray"``: one Ray task per shard, spread over the cluster's nodes.

Each task builds its shard with ``build_on_worker`` (with its worker process's CPU pool of
``num_cpus`` threads and HTTP client, kept for the process's next tasks) and returns the result,
or the ShardError naming it. Ray retries a task whose worker process or node died (``task_retries``
times); what fails after that comes back as a ShardError, which Dagster's retry of the shard takes
over. Importing this module imports ray.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator, Sequence

import ray

from ..errors import ShardError
from .distribute import Built, build_on_worker, require_shared_storage
from .shard import ShardJob, ShardResult, Workers


class RayDistributor:
    """Shards as Ray tasks. ``address``: a cluster's address (``ray://...`` or ``host:port``),
    ``"local"`` for a Ray started here for the run, None for ``RAY_ADDRESS`` (or a local Ray when it
    is unset). An already connected driver (``ray.init`` called by the caller) is used as it is."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def build(self, staging_root: str, jobs: Sequence[ShardJob], workers: Workers) -> Iterator[Built]:
        started = _connect(self.address)
        try:
            alive = [node for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
            require_shared_storage(staging_root, jobs, workers, len(alive))
            # A task reserves as many of a node's CPUs as its CPU pool has threads (cpu_threads; 1 when
            # it is "one per core", which only the node knows): Ray then runs as many shards on a node
            # at once as it has cores, each downloading thread_count URLs at a time.
            cpus = max(1, workers.cpu_threads)
            task = _build.options(
                num_cpus=cpus,
                max_retries=workers.task_retries,
                retry_exceptions=False,  # a failed shard is returned, not raised: not Ray's to retry
                scheduling_strategy="SPREAD",
            )
            on_worker = dataclasses.replace(workers, cpu_threads=cpus)
            refs = {task.remote(staging_root, job, on_worker): job for job in jobs}
            yield from _as_finished(refs, workers.task_retries)
        finally:
            if started:
                ray.shutdown()


def _connect(address: str | None) -> bool:
    """Connect this process to Ray unless it is connected; whether it started (and so must end) it."""
    if ray.is_initialized():
        return False
    # The driver's log lines are its own: the workers' logs stay in Ray's session folder.
    ray.init(address=address, log_to_driver=False, include_dashboard=False if address == "local" else None)
    return True


def _as_finished(
    refs: dict[ray.ObjectRef[ShardResult | ShardError], ShardJob], retries: int
) -> Iterator[Built]:
    """Each task's result as it finishes; the unfinished ones are cancelled if the caller stops."""
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                job = refs[ref]
                try:
                    result: ShardResult | ShardError = ray.get(ref)
                except ray.exceptions.RayError as err:  # its worker or node died, retries included
                    result = ShardError(
                        f"shard {job}: lost on the Ray cluster after {retries} retries: {err}"
                    )
                yield job, result
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


@ray.remote
def _build(staging_root: str, job: ShardJob, workers: Workers) -> ShardResult | ShardError:
    node = ray.get_runtime_context().get_node_id()[:12]
    return build_on_worker(
        staging_root, job, workers, f"ray node {node} ({socket.gethostname()} pid {os.getpid()})"
    )
