"""The downloader itself: read URL tables, fetch, process images, write shards, compute stats.

Nothing in this package imports Dagster; ``img2ds_dagster.defs`` adapts it to assets.
"""

import contextlib
import ctypes
import os
import sys

# OpenCV reads its decode limit once, when the library loads. Images are checked against the
# configured max_decoded_pixels from their header before decoding; this is the backstop for formats
# whose header we do not parse.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 27))

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (one per thread by default, up to 8 per core).

    With dozens of download threads each holding image-sized buffers, every arena keeps its own free
    memory: on a 5000-image download, peak RSS fell from 1.14 GB to 0.57 GB with 2 arenas, at the
    same speed. It must run before threads allocate, hence at import. Respects MALLOC_ARENA_MAX
    when set; does nothing off glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)


limit_malloc_arenas()
