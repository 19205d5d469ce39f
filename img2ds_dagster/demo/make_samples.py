"""Regenerate the sample photos in ``demo/samples/`` from scikit-image's bundled data.

The samples give the offline demo and the test server real photographs with a web-like spread of
formats, sizes, aspect ratios and channel layouts. They are committed, so this script only needs to
run when the set changes. scikit-image is *not* a project dependency: install it somewhere else and
run, for example::

    python3 -m venv /tmp/skvenv
    /tmp/skvenv/bin/pip install scikit-image opencv-python-headless
    /tmp/skvenv/bin/python img2ds_dagster/demo/make_samples.py

Only photos whose scikit-image docstring states a public-domain, CC0 or "no known copyright
restrictions" status are used; ``samples/SOURCES.md`` records each one. skimage is imported inside
:func:`main` so that importing this module (e.g. by package discovery) never needs it.
"""

from __future__ import annotations

import argparse
import importlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

# Quality 85 is what most CMSes and image pipelines default to, so the files look like web JPEGs.
JPEG_QUALITY = 85
WEBP_QUALITY = 80

# cv2's stubs type results as integer-or-float arrays; the uint8 is a runtime fact, not a static one.
Image = npt.NDArray[Any]


def cover_resize(img: Image, width: int, height: int) -> Image:
    """Scale ``img`` to cover ``width`` x ``height`` exactly, then centre-crop the overflow.

    Area interpolation when shrinking (no aliasing), cubic when enlarging (no blockiness).
    """
    src_h, src_w = img.shape[:2]
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized: Image = cv2.resize(img, (new_w, new_h), interpolation=interp)
    x0, y0 = (new_w - width) // 2, (new_h - height) // 2
    return resized[y0 : y0 + height, x0 : x0 + width]


def soft_circle_alpha(height: int, width: int) -> Image:
    """An alpha plane: opaque disc in the middle, smooth ramp to fully transparent corners.

    Every value from 0 to 255 occurs, so a client that drops or mishandles alpha is visible.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    radius = min(height, width) / 2
    dist = np.hypot((yy - cy) / radius, (xx - cx) / radius)
    # Opaque inside 60% of the radius, transparent from the inscribed circle's edge outwards.
    alpha = np.clip((1.0 - dist) / 0.4, 0.0, 1.0)
    out: Image = np.round(alpha * 255).astype(np.uint8)
    return out


def encode(ext: str, img: Image, params: list[int] | None = None) -> bytes:
    """Encode with OpenCV, failing loudly (imencode returns ok=False instead of raising)."""
    ok, buf = cv2.imencode(ext, img, params or [])
    if not ok:
        raise RuntimeError(f"cv2.imencode({ext!r}) failed for shape {img.shape}")
    return bytes(buf.tobytes())


def jpeg(img: Image) -> bytes:
    return encode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])


def exif_app1(make: str, model: str, software: str, datetime: str) -> bytes:
    """Build a minimal big-endian EXIF APP1 segment by hand.

    IFD0 holds Make, Model, Orientation=1 (so no viewer rotates the image), Software and DateTime,
    plus a pointer to an Exif sub-IFD with DateTimeOriginal, which is enough to exercise a reader
    that follows the sub-IFD link. Writing it by hand avoids a Pillow/piexif dependency.
    """
    ascii_t, short_t, long_t = 2, 3, 4

    def ascii_value(text: str) -> bytes:
        return text.encode("ascii") + b"\x00"

    # (tag, type, count, payload) per IFD; payloads longer than 4 bytes go to a data area.
    ifd0: list[tuple[int, int, int, bytes]] = [
        (0x010F, ascii_t, len(make) + 1, ascii_value(make)),
        (0x0110, ascii_t, len(model) + 1, ascii_value(model)),
        (0x0112, short_t, 1, struct.pack(">H", 1)),
        (0x0131, ascii_t, len(software) + 1, ascii_value(software)),
        (0x0132, ascii_t, len(datetime) + 1, ascii_value(datetime)),
        (0x8769, long_t, 1, b""),  # Exif sub-IFD offset, filled in below
    ]
    exif_ifd: list[tuple[int, int, int, bytes]] = [
        (0x9003, ascii_t, len(datetime) + 1, ascii_value(datetime)),
    ]

    def ifd_size(entries: list[tuple[int, int, int, bytes]]) -> int:
        data = sum(len(p) + (len(p) & 1) for _, _, _, p in entries if len(p) > 4)
        return 2 + 12 * len(entries) + 4 + data

    ifd0_offset = 8  # straight after the TIFF header
    exif_offset = ifd0_offset + ifd_size(ifd0)
    ifd0[-1] = (0x8769, long_t, 1, struct.pack(">I", exif_offset))

    def pack_ifd(entries: list[tuple[int, int, int, bytes]], offset: int) -> bytes:
        entries = sorted(entries)  # TIFF requires ascending tag order
        data_offset = offset + 2 + 12 * len(entries) + 4
        head = struct.pack(">H", len(entries))
        data = b""
        for tag, typ, count, payload in entries:
            if len(payload) <= 4:
                value = payload.ljust(4, b"\x00")  # small values are stored left-justified inline
            else:
                value = struct.pack(">I", data_offset + len(data))
                data += payload + b"\x00" * (len(payload) & 1)  # keep offsets word-aligned
            head += struct.pack(">HHI", tag, typ, count) + value
        return head + struct.pack(">I", 0) + data  # next-IFD offset 0: no IFD1 thumbnail

    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0_offset)
    tiff += pack_ifd(ifd0, ifd0_offset) + pack_ifd(exif_ifd, exif_offset)
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def insert_after_app0(jpeg_bytes: bytes, segment: bytes) -> bytes:
    """Insert ``segment`` after SOI and the JFIF APP0 that OpenCV writes (editor-style layout)."""
    if jpeg_bytes[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    pos = 2
    if jpeg_bytes[2:4] == b"\xff\xe0":
        (length,) = struct.unpack(">H", jpeg_bytes[4:6])
        pos = 4 + length
    return jpeg_bytes[:pos] + segment + jpeg_bytes[pos:]


def build_samples(data: Any) -> dict[str, bytes]:
    """Return file name -> encoded bytes. ``data`` is the ``skimage.data`` module."""

    def bgr(loader: Callable[[], Image]) -> Image:
        # skimage returns RGB; OpenCV encoders expect BGR.
        out: Image = cv2.cvtColor(loader(), cv2.COLOR_RGB2BGR)
        return out

    rocket, astronaut, coffee = bgr(data.rocket), bgr(data.astronaut), bgr(data.coffee)
    chelsea, hubble, retina = bgr(data.chelsea), bgr(data.hubble_deep_field), bgr(data.retina)
    ihc = bgr(data.immunohistochemistry)
    camera: Image = data.camera()  # natively single-channel

    coffee_square = cover_resize(coffee, 240, 240)
    coffee_rgba = np.dstack([coffee_square, soft_circle_alpha(240, 240)])
    exif = exif_app1("img2ds_dagster", "make_samples.py", "OpenCV", "2015:02:11 23:03:00")

    return {
        # Landscape, the usual "hero image" size; also the source the test server resizes from.
        "rocket_1200x800.jpg": jpeg(cover_resize(rocket, 1200, 800)),
        "astronaut_600x900.jpg": jpeg(cover_resize(astronaut, 600, 900)),
        "chelsea_320x320.jpg": jpeg(cover_resize(chelsea, 320, 320)),
        # 4:1 banner cut at native resolution.
        "hubble_1000x250.jpg": jpeg(cover_resize(hubble, 1000, 250)),
        # Thumbnail smaller than any sensible min_image_size.
        "coffee_40x30.jpg": jpeg(cover_resize(coffee, 40, 30)),
        "camera_384x384_gray.jpg": jpeg(cover_resize(camera, 384, 384)),
        "coffee_240x240_alpha.png": encode(".png", coffee_rgba, [cv2.IMWRITE_PNG_COMPRESSION, 9]),
        "immunohistochemistry_200x200.png": encode(
            ".png", cover_resize(ihc, 200, 200), [cv2.IMWRITE_PNG_COMPRESSION, 9]
        ),
        "retina_480x480.webp": encode(
            ".webp", cover_resize(retina, 480, 480), [cv2.IMWRITE_WEBP_QUALITY, WEBP_QUALITY]
        ),
        "chelsea_451x300_exif.jpg": insert_after_app0(jpeg(chelsea), exif),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR, help="output folder")
    args = parser.parse_args(argv)

    # Imported here, by name, because scikit-image is an optional tool dependency (see above).
    skimage_data = importlib.import_module("skimage.data")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, blob in build_samples(skimage_data).items():
        (out / name).write_bytes(blob)
        total += len(blob)
        print(f"{name:40s} {len(blob):>8,d} bytes")
    print(f"{'total':40s} {total:>8,d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
