"""Build shards: download every input row, process the images on every core, write the shard.

Within a shard, ``thread_count`` downloads are in flight at once on the fetcher's event loop (one
thread for all of them); ``cpu_threads`` threads (one per core) hash, decode, resize and encode what
arrives, in calls that release the GIL, so one process keeps every core busy. Encoded images go to a
spool file as they complete, so memory stays flat however slow the slowest URL is; the writer then
emits the samples in key order, which makes shards reproducible. ``parallel_shards`` shards are built
at once, sharing the CPU slots, the first-queued shard first, so that the end of one shard (its
slowest downloads, its writing) never leaves the cores idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import pyarrow as pa

from ..errors import ConfigError, ShardError
from .fetch import Fetcher
from .images import ImageError, ImageProcessor, digest, exif_json, parse_boxes
from .probe import probe
from .settings import DownloadSettings, sample_key
from .sources import Staging
from .stats import ShardStats
from .storage import remove, write_json_atomic
from .writers import Sample, ShardTarget, metadata_schema, open_writer

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def default_cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Workers:
    """How much parallelism to use; changes speed, never the output."""

    thread_count: int = 256  # downloads in flight per shard (img2dataset's download threads)
    parallel_shards: int = 2
    cpu_threads: int = 0  # 0: one per core
    # where encoded images wait for their turn, and shard files for their upload to an object store;
    # default: the system's temporary folder
    spool_dir: str | None = None

    def __post_init__(self) -> None:
        # Checked where the shards are built: the folder may exist only on the machines that run them.
        if self.spool_dir is not None and not os.path.isdir(self.spool_dir):
            raise ConfigError(f"workers.spool_dir: {self.spool_dir!r} is not a folder on this machine")

    @property
    def cpu_slots(self) -> int:
        return self.cpu_threads or default_cpu_threads()


@dataclass(frozen=True, slots=True)
class ShardResult:
    table: str
    shard_id: int
    name: str
    output_folder: str
    stats: ShardStats
    bytes_written: int
    input_fingerprint: str | None = None  # of the staged rows it was built from (sources.py)

    @property
    def images_per_second(self) -> float:
        return self.stats.count / self.stats.duration if self.stats.duration > 0 else 0.0


class Spool:
    """An append-only temporary file of encoded images; threads append, the writer reads back."""

    def __init__(self, folder: str | None = None) -> None:
        # Open for the spool's lifetime; close() closes it (the shard loop calls it in a finally).
        self._file = tempfile.TemporaryFile(prefix="img2ds-spool-", dir=folder)  # noqa: SIM115
        self._fd = self._file.fileno()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> tuple[int, int]:
        with self._lock:
            offset = self._size
            self._size += len(data)
        os.pwrite(self._fd, data, offset)
        return offset, len(data)

    def get(self, ref: tuple[int, int]) -> bytes:
        offset, length = ref
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        self._file.close()


class CpuPool:
    """One thread per core doing the image work for every shard being built.

    Each shard has a lane, numbered in the order the shards were queued, and the pool serves the
    oldest lane first: the first shard gets all the CPU it can use, the next one what is left. So
    the shards finish one after another, and the next shard's images keep the cores busy through the
    previous one's last downloads and its writing. Served fairly, shards built together went at the
    same pace and ended together, and the cores idled at each such end (CPU use fell to 70-85% for
    about a second per pair of 1000-sample shards); in a paired comparison on the jpeg-heavy
    benchmark corpus (10 shards, 4 rounds) lanes took the Dagster path from 281 to 298 images/s
    (median; faster in every pair) and its CPU per image from 6.0 to 5.7 ms. On the mixed corpus
    (7 pairs) the median went from 282 to 287 images/s, within this VM's run-to-run noise.

    Within a lane, work is taken newest first: the bytes a download thread has just received are
    still in the CPU cache, while the oldest waiting ones are not (against first-in-first-out, this
    cut the CPU per image from 7.1 to 6.3 ms on the benchmark corpus). Each caller waits for its own
    result, so nothing is left queued when the pool is closed.
    """

    def __init__(self, threads: int) -> None:
        # (lane, -arrival, task, future); the unique arrival number keeps tasks out of comparisons.
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None, Future[Any] | None]]
        self._queue = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._lanes = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"img2ds-cpu-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def lane(self) -> int:
        """A new lane, served after every lane taken before it."""
        return next(self._lanes)

    def run(self, task: Callable[[], _T], lane: int = 0) -> _T:
        return self.submit(task, lane).result()

    def submit(self, task: Callable[[], _T], lane: int = 0) -> Future[_T]:
        future: Future[_T] = Future()
        self._queue.put((lane, -next(self._arrivals), task, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, task, future = self._queue.get()
            if task is None or future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue  # its caller went away (a shard's downloads were cancelled)
            try:
                future.set_result(task())
            except BaseException as err:  # handed to the caller, who re-raises it
                future.set_exception(err)

    def close(self) -> None:
        for _ in self._threads:  # after every queued task: no lane is that late
            self._queue.put((sys.maxsize, -next(self._arrivals), None, None))
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> CpuPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Outcome:
    status: str
    error: str | None = None
    image: tuple[int, int] | None = None  # spool reference
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    exif: str | None = None
    hash: str | None = None


class _SampleWorker:
    """What happens to one URL: the fetcher's event loop downloads it, then hands the bytes to the CPU
    pool and awaits the outcome. The CPU pool has one thread per core, shared by the shards being
    built: the same few threads do all the hashing and image work."""

    def __init__(
        self, settings: DownloadSettings, fetcher: Fetcher, spool: Spool, cpu: CpuPool, lane: int
    ) -> None:
        self.fetcher = fetcher
        self.processor = ImageProcessor(settings.image)
        self.spool = spool
        self.cpu = cpu
        self.lane = lane  # this shard's place in the CPU pool's order
        self.extract_exif = settings.output.extract_exif
        self.hash_type = settings.output.compute_hash
        self.verify = settings.source.verify_hash_type is not None
        self.keep_bytes = settings.image.disable_all_reencoding

    async def run(self, task: _Task) -> _Outcome:
        if not task.url:
            return _Outcome("failed_to_download", "empty URL")
        fetched = await self.fetcher.fetch_async(task.url)
        if fetched.data is None:
            return _Outcome("failed_to_download", fetched.error)
        raw = fetched.data
        return await asyncio.wrap_future(self.cpu.submit(lambda: self._process(raw, task), self.lane))

    def _process(self, raw: bytes, task: _Task) -> _Outcome:
        hash_ = digest(raw, self.hash_type) if self.hash_type else None
        if self.verify and hash_ != task.expected_hash:
            return _Outcome("failed_to_download", "hash mismatch")
        if self.keep_bytes:
            # disable_all_reencoding: the bytes as downloaded, not even decoded (img2dataset's rule).
            exif = exif_json(raw, probe(raw)) if self.extract_exif else None
            return _Outcome("success", image=self.spool.put(raw), exif=exif, hash=hash_)
        header = probe(raw)
        try:
            image = self.processor.process(raw, header, parse_boxes(task.boxes))
        except ImageError as err:
            return _Outcome("failed_to_resize", str(err))
        return _Outcome(
            "success",
            image=self.spool.put(image.data),
            width=image.width,
            height=image.height,
            original_width=image.original_width,
            original_height=image.original_height,
            exif=exif_json(raw, header) if self.extract_exif else None,
            hash=hash_,
        )


async def _download(worker: _SampleWorker, tasks: Sequence[_Task], in_flight: int) -> list[_Outcome]:
    """Every task's outcome, in order, with at most ``in_flight`` of them under way at once.

    An unexpected error (a bug, not a failed download or image: those are outcomes) cancels the
    other downloads and is raised as it is, which fails the shard."""
    outcomes: list[_Outcome | None] = [None] * len(tasks)
    indexes = iter(range(len(tasks)))  # shared: each index is taken by one of the downloaders

    async def downloader() -> None:
        for index in indexes:
            outcomes[index] = await worker.run(tasks[index])

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(in_flight, len(tasks)))):
                group.create_task(downloader())
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0]  # noqa: B904 - its own traceback is the useful one
    done = [o for o in outcomes if o is not None]
    assert len(done) == len(tasks), "every task has an outcome once the downloaders are done"
    return done


@dataclass(frozen=True, slots=True)
class _Task:
    """What downloading and processing one input row needs."""

    url: str | None
    expected_hash: str | None = None  # verify_hash's column
    boxes: Any = None  # bbox_col's value: the boxes to blur


def _tasks(rows: pa.Table, settings: DownloadSettings) -> list[_Task]:
    source = settings.source
    urls = rows.column("url").to_pylist()
    hashes = (
        rows.column(source.verify_hash_type).to_pylist()
        if source.verify_hash_type is not None
        else [None] * len(urls)
    )
    boxes = rows.column(source.bbox_col).to_pylist() if source.bbox_col is not None else [None] * len(urls)
    return [_Task(u, h, b) for u, h, b in zip(urls, hashes, boxes, strict=True)]


def build_shard(
    staging: Staging,
    table: str,
    shard_id: int,
    workers: Workers,
    cpu: CpuPool | None = None,
    *,
    lane: int | None = None,
) -> ShardResult:
    """Download and write one shard of a staged table; its stats file is written last.

    ``cpu`` is the pool that processes the images (shards built together share one); without it the
    shard makes its own, of ``workers.cpu_slots`` threads. ``lane`` is the shard's place in that
    pool's order (``CpuPool.lane()``; by default a new lane, after every shard queued before).
    """
    if cpu is None:
        with CpuPool(workers.cpu_slots) as own:
            return build_shard(staging, table, shard_id, workers, own)
    cv2.setNumThreads(1)  # parallelism comes from our threads; OpenCV's own pool would oversubscribe
    manifest = staging.manifest(table)
    if shard_id not in manifest.shard_ids:
        raise ShardError(f"shard {table}/{shard_id}: table {table!r} has shards {manifest.shard_ids}")
    name = manifest.shard_name(shard_id)
    rows = staging.shard_rows(table, name)
    settings = manifest.settings
    target = ShardTarget(
        folder=manifest.output_folder,
        name=name,
        schema=metadata_schema(rows.schema, settings.output),
        encode_format=settings.image.encode_format,
        save_caption=settings.source.caption_col is not None,
        spool_dir=workers.spool_dir,
    )
    stats = ShardStats(start_time=time.time())
    spool = Spool(workers.spool_dir)
    fetcher = Fetcher(settings.fetch)
    try:
        worker = _SampleWorker(settings, fetcher, spool, cpu, cpu.lane() if lane is None else lane)
        tasks = _tasks(rows, settings)
        outcomes = fetcher.run(_download(worker, tasks, workers.thread_count))
        # A stale stats file would make a half-rewritten shard look complete: it goes first.
        remove(target.stats_path)
        with open_writer(settings.output.output_format, target) as writer:
            for index, (row, outcome) in enumerate(zip(rows.to_pylist(), outcomes, strict=True)):
                key = sample_key(shard_id, index, settings.key_digits, settings.output.oom_shard_count)
                stats.add(outcome.status, outcome.error)
                writer.write(
                    Sample(
                        key=key,
                        meta=_meta(row, key, outcome, settings),
                        image=spool.get(outcome.image) if outcome.image else None,
                        caption=row.get("caption"),
                    )
                )
            bytes_written = writer.commit()
    finally:
        fetcher.close()
        spool.close()
    stats.end_time = time.time()
    write_json_atomic(target.stats_path, stats.to_json(), target.spool_dir)
    log.info(
        "shard %s/%s: %d samples, %d successes in %.1fs",
        table,
        name,
        stats.count,
        stats.successes,
        stats.duration,
    )
    return ShardResult(
        table, shard_id, name, manifest.output_folder, stats, bytes_written, manifest.fingerprint(shard_id)
    )


def _meta(row: dict[str, Any], key: str, o: _Outcome, settings: DownloadSettings) -> dict[str, Any]:
    meta = {
        **row,
        "key": key,
        "status": o.status,
        "error_message": o.error,
        "width": o.width,
        "height": o.height,
        "original_width": o.original_width,
        "original_height": o.original_height,
    }
    if settings.output.extract_exif:
        meta["exif"] = o.exif
    hash_type = settings.output.compute_hash
    if hash_type is not None:
        # Also replaces verify_hash's column (staged under the hash type's name), as img2dataset does.
        meta[hash_type] = o.hash
    return meta


@dataclass(frozen=True, slots=True)
class ShardJob:
    table: str
    shard_id: int
    name: str = ""  # the zero-padded shard name, when known (for messages)

    def __str__(self) -> str:
        return f"{self.table}/{self.name or self.shard_id}"


def build_shards(
    staging_root: str, jobs: Sequence[ShardJob], workers: Workers
) -> Iterator[tuple[ShardJob, ShardResult | ShardError]]:
    """Build several shards, ``parallel_shards`` at a time; yields each as it finishes.

    A shard that fails is yielded as a ShardError naming it, and the others go on.
    """
    staging = Staging(staging_root)
    with (
        _earlier_objects_spared_by_gc(),
        CpuPool(workers.cpu_slots) as cpu,
        ThreadPoolExecutor(max(1, min(workers.parallel_shards, len(jobs))), "img2ds-shard") as pool,
    ):
        # Lanes in job order: the shards finish one after another, in the order they were asked for.
        futures = {pool.submit(_guarded, staging, job, workers, cpu, cpu.lane()): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


@contextlib.contextmanager
def _earlier_objects_spared_by_gc() -> Iterator[None]:
    """Leave the objects that exist before the shards are built out of garbage collections until
    they are built.

    A full collection walks every tracked object with every Python thread stopped. In a process that
    has imported Dagster there are about 230,000 of them before the first image, so each of the three
    full collections a 10,000-image build triggers took 0.13-0.15 s; frozen (``gc.freeze``), 0.002-0.02 s
    (0.85 to 0.36 s of collecting per benchmark run). They are handed back (``gc.unfreeze``) when the
    build ends, so nothing stays out of collections for good. A process that already froze objects
    of its own, or turned the collector off, is left as it is.
    """
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _guarded(
    staging: Staging, job: ShardJob, workers: Workers, cpu: CpuPool, lane: int
) -> ShardResult | ShardError:
    try:
        return build_shard(staging, job.table, job.shard_id, workers, cpu, lane=lane)
    # A shard's failure is reported against that shard; the run's other shards carry on.
    except Exception as err:
        return _shard_error(job, err)


def _shard_error(job: ShardJob, err: BaseException) -> ShardError:
    if isinstance(err, ShardError):
        return err
    wrapped = ShardError(f"shard {job}: {type(err).__name__}: {err}")
    wrapped.__cause__ = err
    return wrapped
