"""The downloader itself: read URL tables, fetch, process images, write shards, compute stats.

Nothing in this package imports Dagster; ``img2ds_dagster.defs`` adapts it to assets. Process-wide
settings are made by ``runtime.prepare_process()``, which the entry points call, with one exception
here: OpenCV reads its decode limit only when the library loads, so it must be in the environment
before anything imports ``cv2``, and importing this package is the one moment that is sure to come
first. Images are checked against the configured ``max_decoded_pixels`` from their header before
decoding; this limit is the backstop for formats whose header we do not parse.
"""

import os

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 27))
