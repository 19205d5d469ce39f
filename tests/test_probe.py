"""Tests for engine/probe.py: header parsing of real and hostile images, checked against OpenCV.

Several tests pin down how OpenCV itself reports these files (channel counts under IMREAD_UNCHANGED,
EXIF orientation), because the decoder that uses probe() relies on those facts.
"""

from __future__ import annotations

import functools
import math
import struct
import time
import zlib
from collections.abc import Sequence

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from img2ds_dagster.engine.probe import ImageHeader, probe

# ---------------------------------------------------------------------------------------------------
# builders


def _pattern(height: int, width: int, channels: int = 3, dtype: type = np.uint8) -> np.ndarray:
    """A gradient with some texture, so encoders do not collapse it to a trivial bitstream."""
    y, x = np.mgrid[0:height, 0:width]
    planes = [(x * 7 + y * 3) % 256, (x * 2 + y * 11) % 256, ((x ^ y) * 5) % 256, (x + y) % 256]
    arr = np.dstack(planes[:channels]).astype(np.float64)
    if dtype == np.uint16:
        arr = arr * 257
    out: np.ndarray = arr.astype(dtype)
    return out[:, :, 0] if channels == 1 else out


def _encode(ext: str, arr: np.ndarray, params: Sequence[int] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, arr, list(params))
    assert ok
    return bytes(buf.tobytes())


def _decode(data: bytes, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    assert img is not None
    return img


def _channels_of(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else int(img.shape[2])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, color_type: int, depth: int, rows: bytes, *, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _palette_png(with_trns: bool) -> bytes:
    width, height = 5, 4
    rows = b"".join(b"\x00" + bytes((x + y) % 4 for x in range(width)) for y in range(height))
    extra = _png_chunk(b"PLTE", bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]))
    if with_trns:
        extra += _png_chunk(b"tRNS", bytes([0, 128]))  # entries 0 and 1 get alpha; the rest stay opaque
    return _png(width, height, 3, 8, rows, extra=extra)


def _exif_tiff(orientation: int) -> bytes:
    """A minimal big-endian TIFF structure holding one IFD entry: Orientation (SHORT)."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)


def _jpeg_with_exif(jpeg: bytes, orientation: int = 1) -> bytes:
    body = b"Exif\x00\x00" + _exif_tiff(orientation)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def _jpeg_segment_offset(jpeg: bytes, markers: set[int]) -> int:
    """Offset of the first segment whose marker is in `markers` (cv2's JPEGs are well formed)."""
    pos = 2
    while jpeg[pos + 1] not in markers:
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]
    return pos


def _png_insert_after_ihdr(png: bytes, chunk: bytes) -> bytes:
    return png[:33] + chunk + png[33:]


def _png_insert_before_iend(png: bytes, chunk: bytes) -> bytes:
    return png[:-12] + chunk + png[-12:]


def _lzw_fixed_width(pixels: bytes, min_code_size: int) -> bytes:
    """GIF LZW data that emits a clear code before every pixel, so the code width never grows."""
    clear = 1 << min_code_size
    codes = [c for p in pixels for c in (clear, p)] + [clear + 1]
    width = min_code_size + 1
    acc = nbits = 0
    out = bytearray()
    for code in codes:
        acc |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def _gif(width: int, height: int, transparent: bool | None) -> bytes:
    """GIF89a with a 2-colour global table, an optional graphic control extension, and one frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes([0, 0, 0, 255, 255, 255])
    gce = b""
    if transparent is not None:
        gce = b"\x21\xf9\x04" + bytes([1 if transparent else 0]) + b"\x00\x00\x00\x00"
    data = _lzw_fixed_width(bytes((x + y) % 2 for y in range(height) for x in range(width)), 2)
    blocks = b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255))
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02" + blocks + b"\x00"
    return screen + gce + frame + b"\x3b"


def _bmp32(width: int, height: int, dib_size: int, compression: int, alpha_mask: int) -> bytes:
    dib = struct.pack(
        "<IiiHHIIiiII", dib_size, width, height, 1, 32, compression, width * height * 4, 0, 0, 0, 0
    )
    dib += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, alpha_mask) + b"\x00" * (dib_size - 56)
    pixels = np.full((height, width, 4), (40, 80, 120, 77), np.uint8).tobytes()
    offset = 14 + dib_size
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + dib + pixels


def _bmp_os2(width: int, height: int) -> bytes:
    """OS/2 1.x BMP: 12-byte core header with 16-bit dimensions, 24-bit pixels."""
    stride = (width * 3 + 3) & ~3
    rows = b"".join(
        bytes((x * 9 + y) % 256 for x in range(width * 3)).ljust(stride, b"\0") for y in range(height)
    )
    dib = struct.pack("<IHHHH", 12, width, height, 1, 24)
    offset = 14 + 12
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + dib + rows


def _riff(chunks: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + (b"\0" if len(data) & 1 else b"")


def _webp_vp8x(simple_webp: bytes, flags: int, width: int, height: int, extra: bytes = b"") -> bytes:
    """Rewrap a simple (VP8 or VP8L) WebP as an extended one, appending `extra` chunks."""
    vp8x = bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return _riff(_riff_chunk(b"VP8X", vp8x) + simple_webp[12:] + extra)


def _tiff_be(width: int, height: int, entries: Sequence[tuple[int, int, int, int]] = ()) -> bytes:
    """Big-endian TIFF header and one IFD: width/height as LONG, plus (tag, type, count, value) SHORTs."""
    tags = [(256, 4, 1, width), (257, 4, 1, height), *entries]
    ifd = struct.pack(">H", len(tags))
    for tag, kind, count, value in sorted(tags):
        field = struct.pack(">I", value) if kind == 4 else struct.pack(">HH", value, 0)
        ifd += struct.pack(">HHI", tag, kind, count) + field
    return b"MM\x00*" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0) + b"\0" * 16


def _assert_header(
    header: ImageHeader | None,
    fmt: str,
    width: int,
    height: int,
    channels: int,
    *,
    has_alpha: bool = False,
    bit_depth: int = 8,
    has_exif: bool = False,
    progressive: bool = False,
    orientation: int = 1,
) -> None:
    assert header == ImageHeader(
        fmt, width, height, channels, has_alpha, bit_depth, has_exif, progressive, orientation
    )


def _assert_matches_opencv(data: bytes, header: ImageHeader | None) -> np.ndarray:
    assert header is not None
    img = _decode(data)
    assert (img.shape[1], img.shape[0]) == (header.width, header.height)
    return img


# ---------------------------------------------------------------------------------------------------
# JPEG


@pytest.mark.parametrize(("width", "height"), [(640, 480), (37, 1200), (1200, 37), (1, 1), (17, 9)])
def test_jpeg_color_sizes(width: int, height: int) -> None:
    data = _encode(".jpg", _pattern(height, width))
    header = probe(data)
    _assert_header(header, "jpeg", width, height, 3)
    img = _assert_matches_opencv(data, header)
    assert _channels_of(img) == 3


def test_jpeg_grayscale() -> None:
    data = _encode(".jpg", _pattern(50, 70, 1))
    header = probe(data)
    _assert_header(header, "jpeg", 70, 50, 1)
    assert _decode(data).ndim == 2


def test_jpeg_progressive() -> None:
    data = _encode(".jpg", _pattern(120, 90), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    header = probe(data)
    _assert_header(header, "jpeg", 90, 120, 3, progressive=True)
    _assert_matches_opencv(data, header)


def test_jpeg_with_exif_app1() -> None:
    plain = _encode(".jpg", _pattern(30, 40))
    plain_header = probe(plain)
    assert plain_header is not None
    assert not plain_header.has_exif
    with_exif = _jpeg_with_exif(plain)
    _assert_header(probe(with_exif), "jpeg", 40, 30, 3, has_exif=True)
    _assert_matches_opencv(with_exif, probe(with_exif))


def test_jpeg_app1_that_is_not_exif_does_not_count() -> None:
    plain = _encode(".jpg", _pattern(30, 40))
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    data = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp + plain[2:]
    _assert_header(probe(data), "jpeg", 40, 30, 3)


def test_jpeg_exif_after_sos_does_not_count() -> None:
    plain = _encode(".jpg", _pattern(30, 40))
    body = b"Exif\x00\x00" + _exif_tiff(1)
    data = plain[:-2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + plain[-2:]
    header = probe(data)
    assert header is not None
    assert not header.has_exif


def test_jpeg_fill_bytes_and_standalone_markers_are_skipped() -> None:
    plain = _encode(".jpg", _pattern(30, 40))
    sof = _jpeg_segment_offset(plain, {0xC0})
    # Fill bytes before a marker, RST/TEM standalone markers, and stray bytes libjpeg would skip.
    data = plain[:sof] + b"\xff\xff\xff\xd0\xff\x01junk" + b"\xff\xff" + plain[sof + 1 :]
    _assert_header(probe(data), "jpeg", 40, 30, 3)


def test_jpeg_sof_claiming_30000_squared_is_reported_as_such() -> None:
    small = _encode(".jpg", _pattern(16, 16), [cv2.IMWRITE_JPEG_QUALITY, 50])
    assert len(small) < 1000
    sof = _jpeg_segment_offset(small, {0xC0})
    bomb = bytearray(small)
    struct.pack_into(">HH", bomb, sof + 5, 30000, 30000)  # after marker(2), length(2), precision(1)
    header = probe(bytes(bomb))
    _assert_header(header, "jpeg", 30000, 30000, 3)
    assert header is not None
    assert header.width * header.height == 900_000_000


@pytest.mark.parametrize("position", ["width", "height"])
def test_jpeg_zero_dimension_is_rejected(position: str) -> None:
    data = bytearray(_encode(".jpg", _pattern(16, 16)))
    sof = _jpeg_segment_offset(bytes(data), {0xC0})
    struct.pack_into(">H", data, sof + (7 if position == "width" else 5), 0)
    assert probe(bytes(data)) is None


@pytest.mark.parametrize("length", [0, 1])
def test_jpeg_marker_with_length_below_two_terminates(length: int) -> None:
    data = b"\xff\xd8\xff\xe0" + struct.pack(">H", length) + b"\x00" * 64
    assert probe(data) is None
    # Also in front of a valid frame header: the walk must stop, not spin or jump backwards.
    sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    assert probe(b"\xff\xd8\xff\xe1" + struct.pack(">H", length) + sof) is None


def test_jpeg_segment_walk_is_bounded() -> None:
    # 20_000 standalone markers before the SOF: past the step cap, so the walk gives up.
    sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    started = time.perf_counter()
    assert probe(b"\xff\xd8" + b"\xff\xd0" * 20_000 + sof) is None
    assert probe(b"\xff\xd8" + b"\xff" * 1_000_000) is None
    assert probe(b"\xff\xd8" + b"\x00" * 1_000_000) is None
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(("marker", "progressive"), [(0xC1, False), (0xC2, True), (0xC6, True), (0xCA, True)])
def test_jpeg_other_sof_markers(marker: int, progressive: bool) -> None:
    frame = bytes([0xFF, marker]) + b"\x00\x0b\x0c\x00\x21\x00\x2a\x01\x01\x11\x00"
    header = probe(b"\xff\xd8" + frame + b"\xff\xda\x00\x02")
    _assert_header(header, "jpeg", 42, 33, 1, bit_depth=12, progressive=progressive)


def test_jpeg_four_components_is_not_alpha() -> None:
    # CMYK/YCCK JPEGs have four components; the fourth is K, not alpha.
    frame = b"\xff\xc0\x00\x14\x08\x00\x06\x00\x09\x04" + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00\x04\x11\x00"
    _assert_header(probe(b"\xff\xd8" + frame + b"\xff\xda"), "jpeg", 9, 6, 4)


@pytest.mark.parametrize("marker", [0xC4, 0xC8, 0xCC])
def test_jpeg_markers_in_sof_range_that_are_not_frames(marker: int) -> None:
    lookalike = bytes([0xFF, marker]) + b"\x00\x0b\x08\x00\x21\x00\x2a\x01\x01\x11\x00"
    real = b"\xff\xc0\x00\x0b\x08\x00\x05\x00\x07\x01\x01\x11\x00"
    _assert_header(probe(b"\xff\xd8" + lookalike + real), "jpeg", 7, 5, 1)


# ---------------------------------------------------------------------------------------------------
# PNG


@pytest.mark.parametrize(
    ("channels", "dtype", "expected_channels", "has_alpha", "bit_depth"),
    [
        (3, np.uint8, 3, False, 8),
        (4, np.uint8, 4, True, 8),
        (1, np.uint8, 1, False, 8),
        (3, np.uint16, 3, False, 16),
        (1, np.uint16, 1, False, 16),
        (4, np.uint16, 4, True, 16),
    ],
)
def test_png_from_opencv(
    channels: int, dtype: type, expected_channels: int, has_alpha: bool, bit_depth: int
) -> None:
    data = _encode(".png", _pattern(45, 61, channels, dtype))
    header = probe(data)
    _assert_header(header, "png", 61, 45, expected_channels, has_alpha=has_alpha, bit_depth=bit_depth)
    img = _assert_matches_opencv(data, header)
    assert _channels_of(img) == expected_channels
    assert img.dtype == (np.uint16 if bit_depth == 16 else np.uint8)


def test_png_palette_with_and_without_trns() -> None:
    plain = _palette_png(with_trns=False)
    transparent = _palette_png(with_trns=True)
    _assert_header(probe(plain), "png", 5, 4, 3)
    _assert_header(probe(transparent), "png", 5, 4, 3, has_alpha=True)
    # OpenCV: a palette PNG decodes to BGR, and to BGRA under IMREAD_UNCHANGED when tRNS is present.
    assert _decode(plain).shape == (4, 5, 3)
    img = _decode(transparent)
    assert img.shape == (4, 5, 4)
    assert img[0, 0].tolist() == [0, 0, 255, 0]  # palette entry 0 (red), alpha from tRNS
    assert img[0, 2].tolist() == [255, 0, 0, 255]  # entry 2 has no tRNS value: opaque
    assert _decode(transparent, cv2.IMREAD_COLOR).shape == (4, 5, 3)


def test_png_gray_alpha_decodes_to_four_channels() -> None:
    width, height = 6, 3
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x * 40, 100)) for _ in range(height))
    data = _png(width, height, 4, 8, rows)
    _assert_header(probe(data), "png", width, height, 2, has_alpha=True)
    img = _decode(data)
    # OpenCV has no 2-channel decode: grey+alpha comes back as BGRA with the grey value repeated.
    assert img.shape == (height, width, 4)
    assert img[0, 1].tolist() == [40, 40, 40, 100]


def test_png_trns_on_gray_and_rgb() -> None:
    width, height = 4, 3
    gray_rows = b"".join(b"\x00" + bytes(range(width)) for _ in range(height))
    rgb_rows = b"".join(b"\x00" + bytes(range(width * 3)) for _ in range(height))
    gray = _png(width, height, 0, 8, gray_rows, extra=_png_chunk(b"tRNS", b"\x00\x01"))
    rgb = _png(width, height, 2, 8, rgb_rows, extra=_png_chunk(b"tRNS", b"\x00\x00\x00\x01\x00\x02"))
    _assert_header(probe(gray), "png", width, height, 1, has_alpha=True)
    _assert_header(probe(rgb), "png", width, height, 3, has_alpha=True)
    # OpenCV ignores tRNS on a grey PNG (one channel out) but honours it on an RGB one (BGRA out).
    assert _decode(gray).shape == (height, width)
    assert _decode(rgb).shape == (height, width, 4)


def test_png_low_bit_depth_gray() -> None:
    data = _png(8, 2, 0, 1, b"\x00\xa5\x00\x5a")
    _assert_header(probe(data), "png", 8, 2, 1, bit_depth=1)
    img = _decode(data)
    assert img.dtype == np.uint8
    assert img[0].tolist() == [255, 0, 255, 0, 0, 255, 0, 255]  # scaled to 0/255


def test_png_exif_chunk() -> None:
    plain = _encode(".png", _pattern(20, 30))
    exif = _png_chunk(b"eXIf", _exif_tiff(1))
    plain_header = probe(plain)
    assert plain_header is not None
    assert not plain_header.has_exif
    before = _png_insert_after_ihdr(plain, exif)
    after = _png_insert_before_iend(plain, exif)
    _assert_header(probe(before), "png", 30, 20, 3, has_exif=True)
    _assert_header(probe(after), "png", 30, 20, 3, has_exif=True)
    _assert_matches_opencv(before, probe(before))


def test_png_chunk_length_ffffffff() -> None:
    plain = _encode(".png", _pattern(20, 30))
    huge = struct.pack(">I", 0xFFFFFFFF) + b"tEXt" + b"x" * 16
    # After IHDR the dimensions are known, so they are still reported.
    _assert_header(probe(_png_insert_after_ihdr(plain, huge)), "png", 30, 20, 3)
    broken_ihdr = bytearray(plain)
    struct.pack_into(">I", broken_ihdr, 8, 0xFFFFFFFF)
    assert probe(bytes(broken_ihdr)) is None


def test_png_truncated_after_ihdr_keeps_ihdr() -> None:
    plain = _encode(".png", _pattern(20, 30, 4))
    _assert_header(probe(plain[:33]), "png", 30, 20, 4, has_alpha=True)
    _assert_header(probe(plain[:40]), "png", 30, 20, 4, has_alpha=True)
    assert probe(plain[:32]) is None


@pytest.mark.parametrize(("width", "height"), [(0, 5), (5, 0), (0x8000_0000, 5)])
def test_png_invalid_dimensions(width: int, height: int) -> None:
    data = bytearray(_encode(".png", _pattern(5, 5)))
    struct.pack_into(">II", data, 16, width, height)
    assert probe(bytes(data)) is None


def test_png_invalid_color_type_or_depth() -> None:
    data = bytearray(_encode(".png", _pattern(5, 5)))
    data[25] = 5  # colour type 5 does not exist
    assert probe(bytes(data)) is None
    data[25], data[24] = 2, 7  # bit depth 7 does not exist
    assert probe(bytes(data)) is None


def test_png_chunk_walk_is_bounded() -> None:
    plain = _encode(".png", _pattern(5, 5))
    empties = _png_chunk(b"zzZz", b"") * 20_000
    started = time.perf_counter()
    header = probe(plain[:33] + empties + _png_chunk(b"eXIf", _exif_tiff(1)) + plain[33:])
    assert time.perf_counter() - started < 1.0
    _assert_header(header, "png", 5, 5, 3)  # the eXIf chunk lies past the cap: not seen


# ---------------------------------------------------------------------------------------------------
# WebP


def test_webp_lossy() -> None:
    data = _encode(".webp", _pattern(48, 66), [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert data[12:16] == b"VP8 "
    header = probe(data)
    _assert_header(header, "webp", 66, 48, 3)
    assert _channels_of(_assert_matches_opencv(data, header)) == 3


def test_webp_lossless() -> None:
    data = _encode(".webp", _pattern(48, 67), [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert data[12:16] == b"VP8L"
    header = probe(data)
    _assert_header(header, "webp", 67, 48, 3)
    assert _channels_of(_assert_matches_opencv(data, header)) == 3


@pytest.mark.parametrize(("quality", "chunk"), [(80, b"VP8X"), (101, b"VP8L")])
def test_webp_with_alpha(quality: int, chunk: bytes) -> None:
    data = _encode(".webp", _pattern(40, 50, 4), [cv2.IMWRITE_WEBP_QUALITY, quality])
    # Lossy alpha needs the extended format (VP8X + ALPH); lossless keeps it in the VP8L header bit.
    assert data[12:16] == chunk
    header = probe(data)
    _assert_header(header, "webp", 50, 40, 4, has_alpha=True)
    assert _channels_of(_assert_matches_opencv(data, header)) == 4


def test_webp_opaque_rgba_input_drops_alpha() -> None:
    arr = _pattern(40, 50, 4)
    arr[:, :, 3] = 255
    data = _encode(".webp", arr, [cv2.IMWRITE_WEBP_QUALITY, 101])
    header = probe(data)
    _assert_header(header, "webp", 50, 40, 3)
    assert _channels_of(_assert_matches_opencv(data, header)) == 3


def test_webp_vp8x_exif_flag_and_chunk() -> None:
    simple = _encode(".webp", _pattern(30, 44), [cv2.IMWRITE_WEBP_QUALITY, 80])
    exif_chunk = _riff_chunk(b"EXIF", _exif_tiff(1))
    flagged = _webp_vp8x(simple, 0x08, 44, 30, exif_chunk)
    _assert_header(probe(flagged), "webp", 44, 30, 3, has_exif=True)
    _assert_matches_opencv(flagged, probe(flagged))
    # A chunk the flags forget still counts, and so does a flag whose chunk is missing.
    _assert_header(probe(_webp_vp8x(simple, 0, 44, 30, exif_chunk)), "webp", 44, 30, 3, has_exif=True)
    _assert_header(probe(_webp_vp8x(simple, 0x08, 44, 30)), "webp", 44, 30, 3, has_exif=True)
    _assert_header(probe(_webp_vp8x(simple, 0, 44, 30)), "webp", 44, 30, 3)


def test_webp_vp8x_alpha_from_alph_chunk_without_flag() -> None:
    simple = _encode(".webp", _pattern(30, 44), [cv2.IMWRITE_WEBP_QUALITY, 80])
    alph = _riff_chunk(b"ALPH", b"\x00" + b"\xff" * (30 * 44))
    vp8x = b"\x00\x00\x00\x00" + (43).to_bytes(3, "little") + (29).to_bytes(3, "little")  # no flags
    data = _riff(_riff_chunk(b"VP8X", vp8x) + alph + simple[12:])
    _assert_header(probe(data), "webp", 44, 30, 4, has_alpha=True)


def test_webp_not_webp_riff() -> None:
    assert probe(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 32) is None
    inter_frame = b"\x01\x00\x00\x9d\x01\x2a\x10\x00\x10\x00"  # frame tag's low bit set
    assert probe(_riff(_riff_chunk(b"VP8 ", inter_frame))) is None
    assert probe(_riff(_riff_chunk(b"VP8L", b"\x2f\x00\x00\x00\xe0"))) is None  # version bits set


# ---------------------------------------------------------------------------------------------------
# GIF


def test_gif_from_opencv() -> None:
    data = _encode(".gif", _pattern(36, 52))
    header = probe(data)
    _assert_header(header, "gif", 52, 36, 3)
    assert _channels_of(_assert_matches_opencv(data, header)) == 3


@pytest.mark.parametrize("transparent", [None, False, True])
def test_gif_hand_built(transparent: bool | None) -> None:
    data = _gif(7, 5, transparent)
    header = probe(data)
    _assert_header(header, "gif", 7, 5, 3, has_alpha=bool(transparent))
    img = _assert_matches_opencv(data, header)
    # OpenCV 5's GIF decoder returns BGRA under IMREAD_UNCHANGED when the frame has a transparent index.
    assert _channels_of(img) == (4 if transparent else 3)


def test_gif87a_and_zero_screen() -> None:
    data = b"GIF87a" + _gif(3, 2, None)[6:]
    _assert_header(probe(data), "gif", 3, 2, 3)
    assert probe(b"GIF89a" + struct.pack("<HHBBB", 0, 2, 0, 0, 0)) is None


def test_gif_extension_walk_is_bounded() -> None:
    screen = b"GIF89a" + struct.pack("<HHBBB", 3, 2, 0, 0, 0)
    comments = b"\x21\xfe" + b"\x01x" * 30_000 + b"\x00"  # one extension with 30_000 sub-blocks
    started = time.perf_counter()
    _assert_header(probe(screen + comments + b"\x21\xf9\x04\x01\x00\x00\x00\x00"), "gif", 3, 2, 3)
    assert time.perf_counter() - started < 1.0


# ---------------------------------------------------------------------------------------------------
# BMP


@pytest.mark.parametrize(("channels", "has_alpha"), [(3, False), (4, True)])
def test_bmp_from_opencv(channels: int, has_alpha: bool) -> None:
    data = _encode(".bmp", _pattern(33, 47, channels))
    header = probe(data)
    _assert_header(header, "bmp", 47, 33, channels, has_alpha=has_alpha)
    assert _channels_of(_assert_matches_opencv(data, header)) == channels


def test_bmp_8bit_palette() -> None:
    data = _encode(".bmp", _pattern(33, 47, 1))
    assert struct.unpack_from("<H", data, 28)[0] == 8
    header = probe(data)
    _assert_header(header, "bmp", 47, 33, 3)
    # OpenCV decodes a grey-palette BMP to one channel under IMREAD_UNCHANGED.
    assert _channels_of(_assert_matches_opencv(data, header)) == 1


def test_bmp_32bit_variants_against_opencv() -> None:
    bi_rgb = _bmp32(5, 3, 124, 0, 0xFF000000)
    bitfields_alpha = _bmp32(5, 3, 124, 3, 0xFF000000)
    bitfields_no_alpha = _bmp32(5, 3, 124, 3, 0)
    _assert_header(probe(bi_rgb), "bmp", 5, 3, 4)
    _assert_header(probe(bitfields_alpha), "bmp", 5, 3, 4, has_alpha=True)
    _assert_header(probe(bitfields_no_alpha), "bmp", 5, 3, 4)
    # OpenCV: 32-bit BI_RGB drops the padding byte; any 32-bit BI_BITFIELDS keeps four channels.
    assert _decode(bi_rgb).shape == (3, 5, 3)
    assert _decode(bitfields_alpha).shape == (3, 5, 4)
    assert _decode(bitfields_no_alpha).shape == (3, 5, 4)


def test_bmp_top_down_and_os2() -> None:
    top_down = bytearray(_encode(".bmp", _pattern(9, 11)))
    struct.pack_into("<i", top_down, 22, -9)
    header = probe(bytes(top_down))
    _assert_header(header, "bmp", 11, 9, 3)
    _assert_matches_opencv(bytes(top_down), header)
    os2 = _bmp_os2(6, 4)
    header = probe(os2)
    _assert_header(header, "bmp", 6, 4, 3)
    _assert_matches_opencv(os2, header)


def test_bmp_unknown_header_size_or_negative_width() -> None:
    data = bytearray(_encode(".bmp", _pattern(9, 11)))
    struct.pack_into("<I", data, 14, 20)
    assert probe(bytes(data)) is None
    data = bytearray(_encode(".bmp", _pattern(9, 11)))
    struct.pack_into("<i", data, 18, -11)
    assert probe(bytes(data)) is None


# ---------------------------------------------------------------------------------------------------
# TIFF


@pytest.mark.parametrize(
    ("channels", "dtype", "has_alpha", "bit_depth"),
    [(3, np.uint8, False, 8), (1, np.uint8, False, 8), (4, np.uint8, True, 8), (3, np.uint16, False, 16)],
)
def test_tiff_from_opencv(channels: int, dtype: type, has_alpha: bool, bit_depth: int) -> None:
    data = _encode(".tiff", _pattern(26, 35, channels, dtype))
    header = probe(data)
    # OpenCV writes no ExtraSamples tag for 4 channels; the fourth sample beyond RGB is still alpha.
    _assert_header(header, "tiff", 35, 26, channels, has_alpha=has_alpha, bit_depth=bit_depth, has_exif=True)
    assert _channels_of(_assert_matches_opencv(data, header)) == channels


def test_tiff_big_endian_long_dimensions_and_extra_samples() -> None:
    data = _tiff_be(70000, 3, [(277, 3, 1, 4), (258, 3, 1, 8), (338, 3, 1, 2)])
    _assert_header(probe(data), "tiff", 70000, 3, 4, has_alpha=True, has_exif=True)
    plain = _tiff_be(12, 3, [(262, 3, 1, 1)])  # no SamplesPerPixel / BitsPerSample: defaults 1 and 1
    _assert_header(probe(plain), "tiff", 12, 3, 1, bit_depth=1, has_exif=True)


def test_tiff_malformed() -> None:
    assert probe(b"II*\x00" + struct.pack("<I", 4)) is None  # IFD offset inside the header
    assert probe(b"II*\x00" + struct.pack("<I", 10_000)) is None  # IFD offset past the end
    assert probe(b"II*\x00" + struct.pack("<IH", 8, 0xFFFF) + b"\x00" * 30) is None  # count > data
    assert probe(_tiff_be(0, 3)) is None
    missing_height = _tiff_be(5, 3)
    missing_height = missing_height.replace(struct.pack(">HHI", 257, 4, 1), struct.pack(">HHI", 999, 4, 1))
    assert probe(missing_height) is None


# ---------------------------------------------------------------------------------------------------
# OpenCV facts the decoder relies on


def test_opencv_imread_unchanged_ignores_exif_orientation() -> None:
    jpeg = _jpeg_with_exif(_encode(".jpg", _pattern(30, 40)), orientation=6)  # 6: rotate 90 clockwise
    png = _png_insert_after_ihdr(_encode(".png", _pattern(30, 40)), _png_chunk(b"eXIf", _exif_tiff(6)))
    for data in (jpeg, png):
        header = probe(data)
        # probe() reads a JPEG's orientation (only a JPEG's: a PNG's eXIf chunk is rare on the web).
        fmt, orientation = ("jpeg", 6) if data is jpeg else ("png", 1)
        _assert_header(header, fmt, 40, 30, 3, has_exif=True, orientation=orientation)
        assert _decode(data).shape == (30, 40, 3)  # stored orientation, like probe()
        assert _decode(data, cv2.IMREAD_COLOR).shape == (40, 30, 3)  # rotated
        assert _decode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION).shape == (30, 40, 3)
    assert _decode(jpeg, cv2.IMREAD_REDUCED_COLOR_4).shape == (10, 8, 3)  # reduced, then rotated


@pytest.mark.parametrize(
    ("flag", "scale"),
    [(cv2.IMREAD_REDUCED_COLOR_2, 2), (cv2.IMREAD_REDUCED_COLOR_4, 4), (cv2.IMREAD_REDUCED_COLOR_8, 8)],
)
def test_opencv_reduced_jpeg_size_is_ceiling(flag: int, scale: int) -> None:
    data = _encode(".jpg", _pattern(37, 1201), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    header = probe(data)
    assert header is not None
    assert _decode(data, flag).shape == (math.ceil(37 / scale), math.ceil(1201 / scale), 3)


# ---------------------------------------------------------------------------------------------------
# hostile and odd input

_SMALL_SAMPLES = {
    "jpeg": lambda: _jpeg_with_exif(_encode(".jpg", _pattern(12, 10))),
    "png": lambda: _png_insert_before_iend(_palette_png(True), _png_chunk(b"eXIf", _exif_tiff(1))),
    "webp-lossy": lambda: _encode(".webp", _pattern(12, 10), [cv2.IMWRITE_WEBP_QUALITY, 80]),
    "webp-vp8x": lambda: _encode(".webp", _pattern(12, 10, 4), [cv2.IMWRITE_WEBP_QUALITY, 80]),
    "gif": lambda: _gif(7, 5, True),
    "bmp": lambda: _encode(".bmp", _pattern(4, 3)),
    "tiff": lambda: _encode(".tiff", _pattern(4, 3)),
}


@pytest.mark.parametrize("name", sorted(_SMALL_SAMPLES))
def test_every_prefix_is_none_or_consistent(name: str) -> None:
    data = _SMALL_SAMPLES[name]()
    full = probe(data)
    assert full is not None
    assert len(data) < 5000
    for end in range(len(data)):
        header = probe(data[:end])
        assert header is None or isinstance(header, ImageHeader)
        if header is not None:
            # Truncation may hide later chunks (EXIF, tRNS) but never changes what was read.
            assert (header.format, header.width, header.height) == (full.format, full.width, full.height)


def test_random_bytes() -> None:
    rng = np.random.default_rng(1234)
    for size in [0, 1, 2, 7, 16, 100, 1000, 20_000]:
        for _ in range(20):
            header = probe(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
            assert header is None or header.width > 0


@pytest.mark.parametrize(
    "data", [b"", b"\xff", b"\xff\xd8", b"<html><body>404</body></html>", b"BM", b"RIFF"]
)
def test_not_images(data: bytes) -> None:
    assert probe(data) is None


def test_buffer_types() -> None:
    data = _encode(".png", _pattern(20, 30))
    expected = probe(data)
    assert expected is not None
    assert probe(memoryview(data)) == expected
    assert probe(memoryview(bytearray(data))) == expected
    assert probe(np.frombuffer(data, np.uint8).data) == expected
    # A uint16 view of the same bytes and a strided view still read as the bytes they hold.
    padded = data + b"\0" * (len(data) & 1)
    assert probe(np.frombuffer(padded, np.uint16).data) == expected
    doubled = np.repeat(np.frombuffer(data, np.uint8), 2)
    assert probe(doubled[::2].data) == expected
    assert probe("not bytes") is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# properties

_MAGICS = [
    b"\xff\xd8",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"RIFF\x10\x00\x00\x00WEBPVP8X",
    b"RIFF\x10\x00\x00\x00WEBPVP8L",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
]
_FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _small_sample(name: str) -> bytes:
    return _SMALL_SAMPLES[name]()


@_FAST
@given(
    st.sampled_from(sorted(_SMALL_SAMPLES)),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), max_size=6),
)
def test_property_corrupted_real_files_never_raise(name: str, patches: list[tuple[int, bytes]]) -> None:
    data = bytearray(_small_sample(name))
    for offset, replacement in patches:
        start = offset % len(data)
        data[start : start + len(replacement)] = replacement
    header = probe(bytes(data))
    assert header is None or (header.width > 0 and header.height > 0 and header.channels > 0)


@_FAST
@given(st.binary(max_size=512))
def test_property_never_raises(data: bytes) -> None:
    header = probe(data)
    assert header is None or (header.width > 0 and header.height > 0)


@_FAST
@given(st.sampled_from(_MAGICS), st.binary(max_size=512))
def test_property_never_raises_after_magic(magic: bytes, tail: bytes) -> None:
    header = probe(magic + tail)
    assert header is None or (header.width > 0 and header.height > 0)
