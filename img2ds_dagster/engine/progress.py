"""Progress of the shards being built in this process: a running tally (shards done of how many,
images, success rate, images/s, time left) that the shards asset writes to the run log as each shard
finishes, and that the ``img2ds download`` command shows as a live bar.

The shards asset runs inside a Dagster run, which ``download()`` starts in this process: listeners
subscribed here hear of every shard built by any run of the process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Protocol

from tqdm import tqdm

from .shard import ShardResult


class Listener(Protocol):
    def expect(self, shards: int) -> None:
        """``shards`` more shards are about to be built."""

    def shard_done(self, result: ShardResult) -> None: ...


_listeners: list[Listener] = []
_lock = threading.Lock()


@dataclass
class Tally:
    """What has been built so far, of ``total`` shards when known."""

    total: int | None = None
    shards: int = 0
    images: int = 0
    successes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, result: ShardResult) -> None:
        self.shards += 1
        self.images += result.stats.count
        self.successes += result.stats.successes

    @property
    def images_per_second(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.images / elapsed if elapsed > 0 else 0.0

    @property
    def seconds_left(self) -> float | None:
        if not self.total or not self.shards:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.shards * max(0, self.total - self.shards)

    def line(self) -> str:
        """``12 of 40 shards, 120,000 images (87.5% ok), 410 images/s, about 11 min left``"""
        of = f" of {self.total}" if self.total else ""
        rate = f"{100 * self.successes / self.images:.1f}% ok" if self.images else "none yet"
        left = self.seconds_left
        eta = f", about {_duration(left)} left" if left is not None and self.shards != self.total else ""
        speed = f"{self.images_per_second:,.0f} images/s"
        return f"{self.shards}{of} shards, {self.images:,} images ({rate}), {speed}{eta}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Tell ``listener`` of the shards planned and built in this process, while inside."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def expect(shards: int) -> None:
    for listener in _current():
        listener.expect(shards)


def shard_done(result: ShardResult) -> None:
    for listener in _current():
        listener.shard_done(result)


def _current() -> list[Listener]:
    with _lock:
        return list(_listeners)


class Bar:
    """``img2ds download``'s progress: a live bar on a terminal (tqdm), else a line per shard."""

    def __init__(self, stream: IO[str], live: bool) -> None:
        self.stream = stream
        self.tally = Tally(total=0)
        self.bar = tqdm(total=0, unit="shard", file=stream, dynamic_ncols=True) if live else None

    def expect(self, shards: int) -> None:
        self.tally.total = (self.tally.total or 0) + shards
        if self.bar is not None:
            self.bar.total = self.tally.total
            self.bar.refresh()

    def shard_done(self, result: ShardResult) -> None:
        self.tally.add(result)
        if self.bar is None:
            print(f"{result.table}/{result.name}: {self.tally.line()}", file=self.stream, flush=True)
            return
        self.bar.update(1)
        t = self.tally
        ok = f"{100 * t.successes / t.images:.1f}% ok" if t.images else ""
        self.bar.set_postfix_str(f"{t.images:,} images, {ok}, {t.images_per_second:,.0f} images/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
