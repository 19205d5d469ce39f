"""The CPU side of building shards: one thread per core doing the image work of every shard being
built, and the spool file where encoded images wait until their shard is written.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

_T = TypeVar("_T")


def default_cpu_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CpuPool:
    """One thread per core doing the image work for every shard being built.

    Each shard has a lane, numbered in the order the shards were queued, and the pool serves the
    oldest lane first: the first shard gets all the CPU it can use, the next one what is left. So
    the shards finish one after another, and the next shard's images keep the cores busy through the
    previous one's last downloads and its writing. Served fairly, shards built together went at the
    same pace and ended together, and the cores idled at each such end (the README's "How it is
    built" has the measurement).

    Within a lane, work is taken newest first: the bytes a download has just delivered are still in
    the CPU cache, while the oldest waiting ones are not. Each caller waits for its own result, so
    nothing is left queued when the pool is closed.
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


SpoolRef = tuple[int, int]  # offset and length of one image in the spool


class Spool:
    """An append-only temporary file of encoded images; threads append, the writer reads back.

    The file has no name (``tempfile.TemporaryFile``), so a killed process leaves nothing behind."""

    def __init__(self, folder: str | None = None) -> None:
        # Open for the spool's lifetime; close() closes it (the shard loop calls it in a finally).
        self._file = tempfile.TemporaryFile(prefix="img2ds-spool-", dir=folder)  # noqa: SIM115
        self._fd = self._file.fileno()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> SpoolRef:
        with self._lock:
            offset = self._size
            self._size += len(data)
        os.pwrite(self._fd, data, offset)
        return offset, len(data)

    def get(self, ref: SpoolRef) -> bytes:
        offset, length = ref
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        self._file.close()
