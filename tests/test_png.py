"""PNG decoding through libdeflate (engine/png.py) gives libpng's pixels and libpng's verdicts.

Every PNG layout libpng reads (colour types, bit depths, palettes with transparency, several IDAT
chunks, rows longer than a stored block) decodes to the same array; files the fast path does not
handle (interlaced, corrupt, truncated, oddly laid out) fall back to libpng on the original bytes,
so a broken file gets exactly the verdict it had before.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import imagecodecs
import numpy as np
import pytest

from img2ds_dagster.engine import png
from img2ds_dagster.engine.images import ImageProcessor
from img2ds_dagster.engine.probe import probe
from img2ds_dagster.engine.settings import ImageSettings

SAMPLES = Path(__file__).resolve().parent.parent / "img2ds_dagster" / "demo" / "samples"
PHOTO = imagecodecs.png_decode((SAMPLES / "coffee_240x240_alpha.png").read_bytes())  # RGBA, 8 bits


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def build_png(
    rows: bytes,
    width: int,
    height: int,
    depth: int,
    color: int,
    *,
    extra: Sequence[bytes] = (),
    interlace: int = 0,
    idat_size: int = 1 << 30,
    after_stream: bytes = b"",
) -> bytes:
    """A PNG from filtered rows (each with its filter byte), split into IDATs of ``idat_size``."""
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    stream = zlib.compress(rows, 9) + after_stream
    idats = [chunk(b"IDAT", stream[i : i + idat_size]) for i in range(0, len(stream), idat_size)]
    return png.SIGNATURE + chunk(b"IHDR", header) + b"".join(extra) + b"".join(idats) + chunk(b"IEND", b"")


def unfiltered_rows(packed: np.ndarray) -> bytes:
    """Rows of packed samples, each behind filter byte 0 (None)."""
    return np.concatenate([np.zeros((packed.shape[0], 1), np.uint8), packed], axis=1).tobytes()


def palette_png(depth: int) -> bytes:
    """An indexed-colour PNG with a tRNS chunk (some palette entries transparent)."""
    colors = 1 << depth
    rng = np.random.default_rng(depth)
    indices = rng.integers(0, colors, size=(37, 53), dtype=np.uint8)
    per_byte = 8 // depth
    padded = np.pad(indices, ((0, 0), (0, -indices.shape[1] % per_byte)))
    groups = padded.reshape(padded.shape[0], -1, per_byte).astype(np.uint16)
    packed = np.zeros(groups.shape[:2], np.uint16)
    for i in range(per_byte):
        packed |= groups[..., i] << (8 - depth * (i + 1))
    palette = rng.integers(0, 256, size=(colors, 3), dtype=np.uint8).tobytes()
    alpha = bytes(rng.integers(0, 256, size=colors, dtype=np.uint8))
    extra = [chunk(b"PLTE", palette), chunk(b"tRNS", alpha)]
    return build_png(unfiltered_rows(packed.astype(np.uint8)), 53, 37, depth, 3, extra=extra)


def wide_rgba() -> bytes:
    """Rows of 20,001 pixels x 4 bytes: each row spans two stored blocks."""
    rng = np.random.default_rng(7)
    return imagecodecs.png_encode(rng.integers(0, 256, size=(3, 20001, 4), dtype=np.uint8))


VARIANTS: dict[str, Callable[[], bytes]] = {
    "rgba 8": lambda: imagecodecs.png_encode(PHOTO),
    "rgb 8": lambda: imagecodecs.png_encode(np.ascontiguousarray(PHOTO[..., :3])),
    "gray 8": lambda: imagecodecs.png_encode(np.ascontiguousarray(PHOTO[..., 0])),
    "gray+alpha 8": lambda: imagecodecs.png_encode(np.ascontiguousarray(PHOTO[..., 2:])),
    "rgb 16": lambda: imagecodecs.png_encode(PHOTO[..., :3].astype(np.uint16) * 257),
    "rgba 16": lambda: imagecodecs.png_encode(PHOTO.astype(np.uint16) * 251),
    "gray 16": lambda: imagecodecs.png_encode(PHOTO[..., 1].astype(np.uint16) * 257),
    "fast filters (sub, rle)": lambda: imagecodecs.png_encode(PHOTO, level=1, strategy=3, filter=16),
    "1x1": lambda: imagecodecs.png_encode(PHOTO[:1, :1]),
    "opencv's own encoder": lambda: bytes(cv2.imencode(".png", PHOTO)[1]),
    "palette 8 with tRNS": lambda: palette_png(8),
    "palette 4 with tRNS": lambda: palette_png(4),
    "palette 2 with tRNS": lambda: palette_png(2),
    "gray 1 bit": lambda: build_png(
        unfiltered_rows(np.packbits(PHOTO[..., 0] > 127, axis=1)), 240, 240, 1, 0
    ),
    "many small IDATs": lambda: build_png(
        unfiltered_rows(PHOTO.reshape(240, -1)), 240, 240, 8, 6, idat_size=999
    ),
    "rows longer than a stored block": wide_rgba,
    "the bundled sample": (SAMPLES / "coffee_240x240_alpha.png").read_bytes,
    "the bundled gray sample": (SAMPLES / "immunohistochemistry_200x200.png").read_bytes,
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_layout_decodes_to_libpngs_pixels(name: str) -> None:
    raw = VARIANTS[name]()
    fast = png.restored(raw)
    assert fast is not None, "the fast path should take this file"
    assert len(fast) > len(raw) // 2
    expected, got = imagecodecs.png_decode(raw), imagecodecs.png_decode(fast)
    assert (got.dtype, got.shape) == (expected.dtype, expected.shape)
    assert np.array_equal(got, expected)


def adam7(img: np.ndarray) -> bytes:
    """An interlaced (Adam7) RGBA PNG of ``img``, built by hand: Pillow and OpenCV only write plain ones."""
    passes = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ]
    rows = b"".join(
        unfiltered_rows(sub.reshape(sub.shape[0], -1))
        for x0, y0, dx, dy in passes
        if (sub := img[y0::dy, x0::dx]).size
    )
    return build_png(rows, img.shape[1], img.shape[0], 8, 6, interlace=1)


def test_interlaced_files_are_left_to_libpng() -> None:
    raw = adam7(PHOTO[:45, :61])
    assert png.restored(raw) is None
    assert np.array_equal(imagecodecs.png_decode(raw), PHOTO[:45, :61])


def outcome(decode: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "pixels", decode().tobytes()
    except Exception as err:
        return "error", type(err).__name__


def broken_files() -> dict[str, bytes]:
    raw = imagecodecs.png_encode(PHOTO[:40, :50], level=9)
    first_idat = raw.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", raw, first_idat)
    data_start, data_end = first_idat + 8, first_idat + 8 + length
    broken: dict[str, bytes] = {}
    for i, offset in enumerate(range(data_start, data_end, max(1, length // 40))):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x5A
        broken[f"flipped byte {i}, bad CRC"] = bytes(flipped)
        # The same damage with a CRC that matches: only the zlib stream can tell.
        body = bytes(flipped[first_idat + 4 : data_end])
        flipped[data_end : data_end + 4] = struct.pack(">I", zlib.crc32(body))
        broken[f"flipped byte {i}, good CRC"] = bytes(flipped)
    bad_crc = bytearray(raw)
    bad_crc[data_end + 1] ^= 0x01
    broken["intact data, bad IDAT CRC"] = bytes(bad_crc)
    for cut in (len(raw) - 6, data_end + 2, data_end - 1, (data_start + data_end) // 2, data_start + 3, 40):
        broken[f"truncated at {cut}"] = raw[:cut]
    rows = unfiltered_rows(PHOTO[:40, :50].reshape(40, -1))
    broken["a row too many"] = build_png(rows + rows[: len(rows) // 40], 50, 40, 8, 6)
    broken["a row too few"] = build_png(rows[: -len(rows) // 40], 50, 40, 8, 6)
    broken["bytes after the zlib stream"] = build_png(rows, 50, 40, 8, 6, after_stream=b"\x00junk")
    idats = build_png(rows, 50, 40, 8, 6, idat_size=500)
    second = idats.index(b"IDAT", idats.index(b"IDAT") + 4) - 4
    broken["IDATs apart"] = idats[:second] + chunk(b"tEXt", b"Comment\x00split") + idats[second:]
    broken["bad filter byte"] = build_png(b"\x07" + rows[1:], 50, 40, 8, 6)
    broken["zero width"] = build_png(b"", 0, 40, 8, 6)
    broken["unknown colour type"] = build_png(rows, 50, 40, 8, 5)
    broken["not a PNG"] = b"GIF89a" + raw[6:]
    return broken


@pytest.mark.parametrize("name", sorted(broken_files()))
def test_a_broken_file_gets_libpngs_verdict(name: str) -> None:
    raw = broken_files()[name]
    direct = outcome(lambda: imagecodecs.png_decode(raw))
    via_fast_path = outcome(lambda: imagecodecs.png_decode(png.restored(raw) or raw))
    assert via_fast_path == direct


def test_images_from_the_fast_path_are_the_same_through_the_processor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end: resize and encode give the same bytes as decoding the original with libpng."""
    raw = imagecodecs.png_encode(PHOTO)
    processor = ImageProcessor(ImageSettings(image_size=64, resize_mode="border"))
    fast = processor.process(raw, probe(raw), None)
    monkeypatch.setattr(png, "restored", lambda raw: None)  # the libpng-only path
    slow = processor.process(raw, probe(raw), None)
    assert (fast.width, fast.height, fast.data) == (slow.width, slow.height, slow.data)
