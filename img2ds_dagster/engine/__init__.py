"""The downloader itself: read URL tables, fetch, process images, write shards, compute stats.

Nothing in this package imports Dagster; ``img2ds_dagster.defs`` adapts it to assets.
"""

import os

# OpenCV reads its decode limit once, when the library loads. Images are checked against the
# configured max_decoded_pixels from their header before decoding; this is the backstop for formats
# whose header we do not parse.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 27))
