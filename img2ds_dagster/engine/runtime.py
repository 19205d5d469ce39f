"""Process-wide settings the engine needs, made in one place: ``prepare_process()``, called by every
entry point that builds shards or reads storage (``build_shards``, ``download()``, the Dagster code
location). Nothing here happens at import, but OpenCV's pixel limit (``engine/__init__.py`` says why).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import gc
import logging
import os
import sys
from collections.abc import Iterator

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


@functools.cache
def prepare_process() -> None:
    """Once per process; later calls do nothing."""
    _limit_malloc_arenas()
    import cv2  # noqa: PLC0415 - the engine imports it anyway; here it is configured, once

    # Parallelism comes from our CPU threads; OpenCV's own pool would oversubscribe the cores.
    cv2.setNumThreads(1)
    # exifread logs a warning for every file without EXIF; img2dataset silences it the same way.
    logging.getLogger("exifread").setLevel(logging.CRITICAL)
    _uncached_s3_listings()
    _no_collections_at_exit()


def _no_collections_at_exit() -> None:
    """Leave the heap out of the interpreter's last garbage collections.

    At exit, Python collects garbage several times while it tears the modules down, each time
    walking every object Dagster and its libraries made: measured on a 10,000-URL Dagster-path run
    (benchmarks/polite.py's corpus), the process took 1.03 s from the run's end to its exit, and
    0.06 s with the heap frozen (``gc.freeze``) first. Frozen at exit only: while the process lives
    nothing is taken out of collections for good. The objects are still freed as the modules go;
    what is skipped is finding cycles in them, whose finalizers Python does not promise to run at
    exit anyway. Registered once per process, early, so it runs after the handlers registered later.
    """
    atexit.register(gc.freeze)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (one per thread by default, up to 8 per core).

    With dozens of download threads each holding image-sized buffers, every arena keeps its own free
    memory, and peak memory doubles at the same speed (README, "Speed"). The cap counts the arenas
    made so far, so it only has to come before the engine starts its own threads. Respects
    MALLOC_ARENA_MAX when set; does nothing off glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)


def _uncached_s3_listings() -> None:
    """s3fs keeps every listing for the life of the process and then answers "no such file" for an
    object another process wrote since: a sensor in a long-lived code server would never see a new
    drop, nor a stats refresh a newly staged table. The pipeline lists rarely, so every listing asks
    the store. (Read when a filesystem is first made: this runs before any s3:// path is opened.)"""
    import fsspec  # noqa: PLC0415

    fsspec.config.conf.setdefault("s3", {}).setdefault("use_listings_cache", False)


@contextlib.contextmanager
def objects_spared_by_gc() -> Iterator[None]:
    """Leave the objects that exist now out of garbage collections until the block ends.

    A full collection walks every tracked object with every Python thread stopped. A process that
    has imported Dagster holds a few hundred thousand objects before the first image, and each full
    collection during a build then stops the downloads and the image work for a noticeable time
    (README, "Speed"). Frozen (``gc.freeze``), they are skipped; they are handed back
    (``gc.unfreeze``) when the block ends, so nothing stays out of collections for good. A process
    that already froze objects of its own, or turned the collector off, is left as it is.
    """
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
