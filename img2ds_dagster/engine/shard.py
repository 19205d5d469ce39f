"""One shard: download its rows, ``thread_count`` at a time, process what arrives on the CPU pool,
then write the samples in key order through one writer, in the commit order that keeps a half-written
shard from ever looking complete. ``distribute.py`` builds several, here or on a cluster.

Within a shard the downloads share the fetcher's event loop (one thread for all of them) and the
image work runs on ``cpu.CpuPool``, in calls that release the GIL, so one process keeps every core
busy. Encoded images wait in a spool file, so memory stays flat however slow the slowest URL is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa

from ..errors import ConfigError, ShardError
from .cpu import CpuPool, Spool, default_cpu_threads
from .fetch import Fetcher, HttpClient, host_of
from .polite import DEFAULT_CONNECTIONS_PER_HOST, DEFAULT_HOST_FAILURE_LIMIT, Claim, Deferred, Politeness
from .retry import Previous, Retried, read_previous
from .runtime import prepare_process
from .sample import Outcome, SampleTask, SampleWorker, metadata_row, sample_tasks
from .settings import DISTRIBUTORS, DistributorName, DownloadSettings, OutputFormat, sample_key
from .sources import Staging
from .stats import ShardStats, stats_path
from .storage import remove, remove_leftovers, write_json_atomic
from .writers import Sample, ShardTarget, metadata_schema, open_writer

log = logging.getLogger(__name__)
# How far past the first task not taken a downloader looks for one whose host need not wait.
_LOOKAHEAD = 256


@dataclass(frozen=True, slots=True)
class Workers:
    """How much parallelism to use; changes speed, never the output."""

    thread_count: int = 256  # downloads in flight per shard (img2dataset's download threads)
    parallel_shards: int = 2
    cpu_threads: int = 0  # 0: one per core
    # where encoded images wait for their turn, and shard files for their upload to an object store;
    # default: the system's temporary folder
    spool_dir: str | None = None
    # Per-host politeness for every shard built at once (polite.py): requests in flight to one host,
    # seconds between two request starts to one host (robots.txt's Crawl-delay raises it), and the
    # timeouts or failed connections in a row after which a host is given up for the run (0: never).
    max_connections_per_host: int = DEFAULT_CONNECTIONS_PER_HOST
    min_request_interval: float = 0.0
    host_failure_limit: int = DEFAULT_HOST_FAILURE_LIMIT
    # Where the shards are built (distribute.py): "multiprocessing" is this process; "ray" and
    # "pyspark" send each shard to a cluster, at ``cluster`` (a Ray address, "local" for a Ray of
    # this machine, or a Spark master URL; unset: RAY_ADDRESS, or the active SparkSession), with
    # ``task_retries`` more tries of a shard whose worker or node died. Local paths are refused on a
    # cluster of several nodes unless ``shared_filesystem`` says every node mounts them.
    distributor: DistributorName = "multiprocessing"
    cluster: str | None = None
    task_retries: int = 3
    shared_filesystem: bool = False
    # Download again only the rows of a complete shard whose last try failed transiently, keeping
    # its other rows as written (retry.py): the same shard as a full build in which those downloads
    # succeeded, from fewer requests. A shard not complete yet is built in full.
    retry_failed: bool = False

    def __post_init__(self) -> None:
        if self.distributor not in DISTRIBUTORS:
            raise ConfigError(f"distributor: {self.distributor!r} is not one of {list(DISTRIBUTORS)}")
        if self.task_retries < 0:
            raise ConfigError("task_retries: must be 0 or more")
        # Checked here when the shards are built in this process; a cluster's machines may have
        # folders this one has not.
        local = self.distributor == "multiprocessing"
        if local and self.spool_dir is not None and not os.path.isdir(self.spool_dir):
            raise ConfigError(f"workers.spool_dir: {self.spool_dir!r} is not a folder on this machine")
        if self.max_connections_per_host < 1:
            raise ConfigError("max_connections_per_host: must be at least 1")
        if self.min_request_interval < 0 or self.host_failure_limit < 0:
            raise ConfigError("min_request_interval and host_failure_limit: must be 0 or more")

    def politeness(self) -> Politeness:
        return Politeness(self.max_connections_per_host, self.min_request_interval, self.host_failure_limit)

    @property
    def cpu_slots(self) -> int:
        return self.cpu_threads or default_cpu_threads()


@dataclass(frozen=True, slots=True)
class ShardJob:
    table: str
    shard_id: int
    name: str = ""  # the zero-padded shard name, when known (for messages)

    def __str__(self) -> str:
        return f"{self.table}/{self.name or self.shard_id}"


@dataclass(frozen=True, slots=True)
class ShardResult:
    table: str
    shard_id: int
    name: str
    output_folder: str
    output_format: OutputFormat
    stats: ShardStats
    bytes_written: int
    input_fingerprint: str | None = None  # of the staged rows it was built from (sources.py)
    retry: Retried | None = None  # what a retry_failed build retried; None: not one

    @property
    def images_per_second(self) -> float:
        return self.stats.count / self.stats.duration if self.stats.duration > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Shared:
    """What the shards built at once share: the pool that processes the images, the HTTP client with
    its connections and per-host politeness, and the slots of the shards taking new downloads."""

    cpu: CpuPool
    client: HttpClient
    taking: threading.Semaphore | None = None  # parallel_shards of them; None: no limit


@dataclass(frozen=True, slots=True)
class Turn:
    """A shard's place among the shards built at once: its lane in the CPU pool's order
    (``CpuPool.lane()``), and what to call once all its downloads are taken (its last ones may still
    be under way: the next shard can start)."""

    lane: int
    all_taken: Callable[[], object] | None = None


def build_shard(  # noqa: PLR0913 - the last three are keyword-only, each with its default
    staging: Staging,
    job: ShardJob,
    workers: Workers,
    *,
    shared: Shared | None = None,
    turn: Turn | None = None,
    where: str | None = None,
) -> ShardResult:
    """Download and write one shard of a staged table; its stats file is written last.

    Without ``shared`` the shard has a CPU pool and an HTTP client of its own; without ``turn``, a
    new lane, after every shard queued before. ``where`` names where it is built, for its stats
    (default: this host and process).
    """
    prepare_process()
    table, shard_id = job.table, job.shard_id
    manifest = staging.manifest(table)
    if shard_id not in manifest.shard_ids:
        raise ShardError(f"shard {table}/{shard_id}: table {table!r} has shards {manifest.shard_ids}")
    name = manifest.shard_name(shard_id)
    rows = staging.shard_rows(table, name)
    settings = manifest.settings
    target = ShardTarget(
        folder=manifest.output_folder,
        name=name,
        schema=metadata_schema(rows.schema, settings.output, settings.image.resize_mode == "bucket"),
        encode_format=settings.image.encode_format,
        save_caption=settings.source.caption_col is not None,
        spool_dir=workers.spool_dir,
    )
    # What a process killed while writing this shard left behind (its temporary files).
    remove_leftovers(target.folder, name)
    stats = ShardStats(start_time=time.time(), worker=where or this_process())
    with contextlib.ExitStack() as stack:
        if shared is None:
            cpu = stack.enter_context(CpuPool(workers.cpu_slots))
            shared = Shared(cpu, stack.enter_context(HttpClient(workers.politeness())))
        cpu, client = shared.cpu, shared.client
        spool = stack.enter_context(contextlib.closing(Spool(workers.spool_dir)))
        fetcher = Fetcher(settings.fetch, client)
        turn = turn or Turn(cpu.lane())
        worker = SampleWorker(settings, fetcher, spool, cpu, turn.lane)
        tasks = sample_tasks(rows, settings)
        keys = [
            sample_key(shard_id, i, settings.key_digits, settings.output.oom_shard_count)
            for i in range(rows.num_rows)
        ]
        previous: Previous | None = None
        retry: Retried | None = None
        if workers.retry_failed:
            output_format = settings.output.output_format
            found = read_previous(target, output_format, rows, keys=keys, settings=settings, spool=spool)
            if isinstance(found, str):
                log.info("shard %s/%s: built in full, not retried: %s", table, name, found)
                retry = Retried(rebuilt=found)
            elif not found.retry:
                log.info("shard %s/%s: no transient failures to retry, left as it is", table, name)
                return ShardResult(
                    table,
                    shard_id,
                    name,
                    manifest.output_folder,
                    settings.output.output_format,
                    ShardStats.from_json(found.stats),
                    0,
                    manifest.fingerprint(shard_id),
                    Retried(),
                )
            else:
                previous = found
        if previous is None:
            outcomes = fetcher.run(_download(worker, tasks, workers.thread_count, turn.all_taken))
            for outcome in outcomes:
                stats.add(outcome.status, outcome.error, outcome.waits, outcome.waited, outcome.opt_out)
            samples = _samples(keys, rows, outcomes, spool, settings)
        else:
            todo = [tasks[i] for i in previous.retry]
            retried = fetcher.run(_download(worker, todo, workers.thread_count, turn.all_taken))
            fresh = dict(zip(previous.retry, retried, strict=True))
            _count_kept_and_retried(stats, previous, fresh)
            retry = Retried(len(fresh), sum(o.status == "success" for o in retried))
            samples = _samples_keeping(previous, keys, rows, fresh=fresh, spool=spool, settings=settings)
        bytes_written = _write(target, settings.output.output_format, samples, stats)
    log.info(
        "shard %s/%s: %d samples, %d successes in %.1fs",
        table,
        name,
        stats.count,
        stats.successes,
        stats.duration,
    )
    if retry is not None and retry.rebuilt is None:
        log.info("shard %s/%s: %d rows retried, %d recovered", table, name, retry.retried, retry.recovered)
    return ShardResult(
        table,
        shard_id,
        name,
        manifest.output_folder,
        settings.output.output_format,
        stats,
        bytes_written,
        manifest.fingerprint(shard_id),
        retry,
    )


def this_process() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


async def _download(
    worker: SampleWorker,
    tasks: Sequence[SampleTask],
    in_flight: int,
    all_taken: Callable[[], object] | None = None,
) -> list[Outcome]:
    """Every task's outcome, in order, with at most ``in_flight`` of them under way at once.

    Each downloader takes the first task not taken yet, unless its host would make it wait (as many
    of its downloads taken as it has connection slots, paused after a 429, its next start not due):
    then it looks a little further for a task of another host, so that one busy host does not hold
    downloaders idle while other hosts could be served. The outcomes are placed by row whatever the
    order they came in, so the shard is the same.

    An unexpected error (a bug, not a failed download or image: those are outcomes) cancels the
    other downloads and is raised as it is, which fails the shard."""
    outcomes: list[Outcome | None] = [None] * len(tasks)
    gates = [worker.fetcher.gate(host_of(task.url)) for task in tasks]
    taken = bytearray(len(tasks))
    first = 0  # every task before it is taken

    def take() -> tuple[int, Claim, bool] | None:
        """The next task, its claim on its host, and whether it may be put off (only when it was
        chosen over others: one that is all there is waits for its host)."""
        nonlocal first
        while first < len(tasks) and taken[first]:
            first += 1
        if first == len(tasks):
            if all_taken is not None:
                all_taken()
            return None
        chosen, looked, index, free = first, 0, first, False
        while index < len(tasks) and looked < _LOOKAHEAD:
            if not taken[index]:
                if not gates[index].busy():
                    chosen, free = index, True
                    break
                looked += 1
            index += 1
        taken[chosen] = 1
        return chosen, gates[chosen].claim(), free

    async def downloader() -> None:
        nonlocal first
        while (next_task := take()) is not None:
            index, claim, may_defer = next_task
            try:
                outcomes[index] = await worker.run(tasks[index], claim.release, may_defer)
            except Deferred:  # its host became busy meanwhile: back in the queue, another one now
                taken[index] = 0
                first = min(first, index)
                await asyncio.sleep(0)  # and let the others run before choosing again
            finally:
                claim.release()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(in_flight, len(tasks)))):
                group.create_task(downloader())
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0]  # noqa: B904 - its own traceback is the useful one
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(tasks), "every task has an outcome once the downloaders are done"
    return done


def _samples(
    keys: Sequence[str], rows: pa.Table, outcomes: Sequence[Outcome], spool: Spool, settings: DownloadSettings
) -> Iterator[Sample]:
    """The shard's samples in key order, as the writer takes them."""
    for key, row, outcome in zip(keys, rows.to_pylist(), outcomes, strict=True):
        yield Sample(
            key=key,
            meta=metadata_row(row, key, outcome, settings),
            image=spool.get(outcome.image) if outcome.image else None,
            caption=row.get("caption"),
        )


def _samples_keeping(  # noqa: PLR0913 - the shard as it was, and what changed
    previous: Previous,
    keys: Sequence[str],
    rows: pa.Table,
    *,
    fresh: dict[int, Outcome],
    spool: Spool,
    settings: DownloadSettings,
) -> Iterator[Sample]:
    """The shard's samples in key order: the rows downloaded again as a first build writes them,
    the others as the shard had them (their metadata row, and their image read back)."""
    for index, (key, row) in enumerate(zip(keys, rows.to_pylist(), strict=True)):
        outcome = fresh.get(index)
        if outcome is not None:
            meta = metadata_row(row, key, outcome, settings)
            image = spool.get(outcome.image) if outcome.image else None
        else:
            meta = previous.meta[index]
            ref = previous.images.get(index)
            image = spool.get(ref) if ref is not None else None
        yield Sample(key=key, meta=meta, image=image, caption=row.get("caption"))


def _count_kept_and_retried(stats: ShardStats, previous: Previous, fresh: dict[int, Outcome]) -> None:
    """The stats of a shard rewritten with some rows retried: every row's last status; the waits
    are this build's; the opt-outs those of the rows kept (as last counted) and of the retried."""
    for index, meta in enumerate(previous.meta):
        outcome = fresh.get(index)
        if outcome is None:
            stats.add(meta["status"], meta["error_message"])
        else:
            stats.add(outcome.status, outcome.error, outcome.waits, outcome.waited, outcome.opt_out)
    stats.opt_outs.update(previous.opt_outs)


def _write(
    target: ShardTarget, output_format: OutputFormat, samples: Iterable[Sample], stats: ShardStats
) -> int:
    """Write the shard's files in their commit order; returns the bytes written.

    1. The old stats file goes first: a stale one would make a half-rewritten shard look complete.
    2. The writer's files appear, each atomically, once all are written (a failure leaves the old ones).
    3. The new stats file comes last: a shard whose stats file exists is complete.
    """
    stats_file = stats_path(target.folder, target.name)
    remove(stats_file)
    with open_writer(output_format, target) as writer:
        for sample in samples:
            writer.write(sample)
        bytes_written = writer.commit()
    stats.end_time = time.time()
    write_json_atomic(stats_file, stats.to_json(), target.spool_dir)
    return bytes_written
