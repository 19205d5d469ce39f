"""Aspect-ratio buckets for ``resize_mode="bucket"``: the SDXL proto set, scaled to a base size.

The proto set is the 41 sizes of SDXL's multi-aspect training (Podell et al. 2023, appendix), all
about 1024 x 1024 pixels, from 2048 x 512 to 512 x 2048. A bucket keeps its proto size as its id
(``p1152x832``: 1152 wide, 832 high) and its target is that size scaled by ``base / 1024`` and
rounded to a multiple of ``divisible`` (at the default 512 and 32: ``p1152x832`` is 576 x 416).
Two proto sizes that round to the same target keep the first id, in the order of ``PROTO_SIZES``.

An image goes to the bucket whose aspect ratio is nearest its own, compared as the distance of
``log(width / height)`` (so 2:1 and 1:2 are as far from 1:1), the first in that order on a tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

PROTO_BASE = 1024
# (width, height), widest first: SDXL's list, landscape then square then portrait.
PROTO_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 512), (1984, 512), (1920, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576),
    (1600, 640), (1536, 640), (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768),
    (1216, 832), (1152, 832), (1152, 896), (1088, 896), (1088, 960), (1024, 960), (1024, 1024),
    (960, 1024), (960, 1088), (896, 1088), (896, 1152), (832, 1152), (832, 1216), (768, 1280),
    (768, 1344), (704, 1344), (704, 1408), (704, 1472), (640, 1536), (640, 1600), (576, 1664),
    (576, 1728), (576, 1792), (512, 1856), (512, 1920), (512, 1984), (512, 2048),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Bucket:
    id: str  # the proto size, p<width>x<height>
    width: int  # the target size at the base
    height: int

    @property
    def log_ratio(self) -> float:
        return math.log(self.width / self.height)


@lru_cache(maxsize=16)
def buckets(base: int, divisible: int) -> tuple[Bucket, ...]:
    """The buckets at this base size, in the order of ``PROTO_SIZES``, one per distinct target."""
    found: dict[tuple[int, int], Bucket] = {}
    for proto_w, proto_h in PROTO_SIZES:
        size = (_scaled(proto_w, base, divisible), _scaled(proto_h, base, divisible))
        found.setdefault(size, Bucket(f"p{proto_w}x{proto_h}", *size))
    return tuple(found.values())


def _scaled(side: int, base: int, divisible: int) -> int:
    return max(divisible, round(side * base / PROTO_BASE / divisible) * divisible)


def nearest_bucket(width: int, height: int, base: int, divisible: int) -> Bucket:
    """The bucket whose aspect ratio is nearest that of a ``width`` x ``height`` image."""
    ratio = math.log(width / height)
    return min(buckets(base, divisible), key=lambda b: abs(b.log_ratio - ratio))


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The smallest size of the image's aspect ratio that covers the bucket: one side is the
    bucket's, the other at least the bucket's."""
    scale = cover_scale(width, height, bucket)
    return max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))


def cover_scale(width: int, height: int, bucket: Bucket) -> float:
    """The scale factor of the cover resize; above 1 the image would need upsampling."""
    return max(bucket.width / width, bucket.height / height)


# The corners bucket_crop="corner" may keep, as numbered in bucket_corners.
CORNERS = {0: "top-left", 1: "top-right", 2: "bottom-left", 3: "bottom-right"}


def crop_origin(size: tuple[int, int], bucket: Bucket, mode: str, corner: int) -> tuple[int, int]:
    """Where the bucket's window starts in the cover-resized image of ``size``: centred, or at
    ``corner`` (a key of CORNERS)."""
    spare_x, spare_y = size[0] - bucket.width, size[1] - bucket.height
    if mode == "center":
        return spare_x // 2, spare_y // 2
    return (spare_x if corner in (1, 3) else 0), (spare_y if corner in (2, 3) else 0)
