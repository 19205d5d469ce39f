"""Read an image's size and a few properties from its header, without decoding it.

The downloader probes untrusted bytes with this before OpenCV sees them: to refuse decompression bombs,
apply img2dataset's size filters, pick decode flags, and skip the EXIF parser when there is no EXIF.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ImageHeader", "probe"]


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the header says about an image, as stored (EXIF orientation is not applied: it is
    ``orientation``, read from a JPEG's EXIF block, 1 when absent or for other formats).

    ``channels`` counts stored samples per pixel, except that palette images (PNG, BMP, GIF, TIFF)
    report 3 because they decode to colour; a PNG made transparent by a tRNS chunk keeps its channel
    count and sets ``has_alpha``. ``bit_depth`` is the stored bits per sample (8 for palette
    images, whose palette entries are 8-bit).
    """

    format: str  # "jpeg" | "png" | "webp" | "gif" | "bmp" | "tiff"
    width: int
    height: int
    channels: int
    has_alpha: bool
    bit_depth: int
    has_exif: bool
    progressive: bool
    orientation: int = 1  # EXIF's 1 to 8; 5 to 8 swap width and height once applied


# Every walk over segments, chunks, blocks or IFD entries stops after this many steps, so that the
# work done on hostile input is bounded by a constant rather than by what the input claims.
_MAX_STEPS = 10_000
# Looking for the next JPEG marker copies a window at a time so the byte search runs in C; windows start
# small because the marker is almost always next, and grow so that long runs cost few Python steps.
_FIRST_WINDOW = 64
_MAX_WINDOW = 1 << 16

_U16BE = struct.Struct(">H")
_U16LE = struct.Struct("<H")
_U32BE = struct.Struct(">I")
_U32LE = struct.Struct("<I")

_Parser = Callable[[memoryview], ImageHeader | None]


def probe(data: bytes | memoryview) -> ImageHeader | None:
    """Parse the header; None when the bytes are not a recognised image or the header is malformed/truncated.

    Never raises. Visits at most a fixed number of segments or chunks whatever the input claims; the
    only scan that grows with the input (JPEG stray and fill bytes) runs in C, a window at a time.
    """
    try:
        view = _byte_view(data)
        head = bytes(view[:16])
        for magic, parser in _PARSERS.items():
            if head.startswith(magic):
                header = parser(view)
                break
        else:
            return None
    # The parsers check bounds themselves; this is the backstop that keeps "never raises" true for a
    # read they missed (struct.error is how a short read surfaces) and for odd buffer objects.
    except (struct.error, IndexError, ValueError, TypeError, OverflowError):
        return None
    if header is None or header.width <= 0 or header.height <= 0:
        return None
    return header


def _byte_view(data: bytes | memoryview) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    # Indexing must yield byte values whatever the exporter's item format (numpy arrays, array.array).
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# ---------------------------------------------------------------------------------------------------
# JPEG

# SOF0-3, 5-7, 9-11, 13-15; C4 (DHT), C8 (JPG) and CC (DAC) share the range but carry no frame header.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length field: TEM, RST0-7 and a repeated SOI.
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
_JPEG_APP1 = 0xE1
_EXIF_ID = b"Exif\x00\x00"


def _probe_jpeg(buf: memoryview) -> ImageHeader | None:
    n = len(buf)
    pos = 2
    has_exif = False
    orientation = 1
    frame: tuple[int, int, int, int, bool] | None = None  # width, height, components, precision, progressive
    for _ in range(_MAX_STEPS):
        code = _next_marker_code(buf, pos)
        if code < 0:
            break
        marker = buf[code]
        pos = code + 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            continue  # 0x00 is a stuffed byte, not a marker: more garbage to skip
        if marker in (_JPEG_SOS, _JPEG_EOI) or pos + 2 > n:
            break
        length = _U16BE.unpack_from(buf, pos)[0]
        if length < 2:
            break
        end = pos + length
        if marker == _JPEG_APP1 and bytes(buf[pos + 2 : min(end, pos + 8)]) == _EXIF_ID:
            if not has_exif:
                orientation = _exif_orientation(buf[pos + 8 : min(end, n)])
            has_exif = True
        elif marker in JPEG_SOF and frame is None:
            if length < 8 or pos + 8 > n:
                break
            precision, height, width, components = struct.unpack_from(">BHHB", buf, pos + 2)
            if precision == 0 or components == 0:
                return None
            frame = (width, height, components, precision, marker in _JPEG_PROGRESSIVE)
        pos = end
    if frame is None:
        return None
    # A frame header seen before truncation or a broken segment is still what the decoder would use.
    width, height, components, precision, progressive = frame
    return ImageHeader(
        "jpeg", width, height, components, False, precision, has_exif, progressive, orientation
    )


_ORIENTATION_TAG = 0x0112


def _exif_orientation(tiff: memoryview) -> int:
    """The Orientation entry (1 to 8) of the first IFD of an EXIF block's TIFF data; 1 when there
    is none or the block is malformed."""
    if len(tiff) < 8 or bytes(tiff[:2]) not in (b"II", b"MM"):
        return 1
    u16, u32 = (_U16LE, _U32LE) if bytes(tiff[:2]) == b"II" else (_U16BE, _U32BE)
    ifd = u32.unpack_from(tiff, 4)[0]
    if ifd + 2 > len(tiff):
        return 1
    count = u16.unpack_from(tiff, ifd)[0]
    for i in range(min(count, _MAX_STEPS)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if u16.unpack_from(tiff, entry)[0] == _ORIENTATION_TAG:
            value = u16.unpack_from(tiff, entry + 8)[0]  # a SHORT, left-justified in the value field
            return value if 1 <= value <= 8 else 1
    return 1


def _next_marker_code(buf: memoryview, pos: int) -> int:
    """Offset of the next marker's code byte at or after `pos`, or -1 at the end of the data.

    libjpeg skips stray bytes before a marker (with a warning) and any number of 0xFF fill bytes may
    pad one, so both are skipped here rather than treated as malformed.
    """
    n = len(buf)
    size = _FIRST_WINDOW
    in_fill = False  # the previous window ended inside a run of 0xFF
    while pos < n:
        window = bytes(buf[pos : pos + size])
        start = 0 if in_fill else window.find(b"\xff")
        if start >= 0:
            rest = window[start:].lstrip(b"\xff")
            if rest:
                return pos + len(window) - len(rest)
            in_fill = True
        pos += len(window)
        size = min(size * 2, _MAX_WINDOW)
    return -1


# ---------------------------------------------------------------------------------------------------
# PNG

# colour type -> decoded channels (palette decodes to colour)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_BIT_DEPTHS = frozenset({1, 2, 4, 8, 16})
_PNG_MAX_INT = 0x7FFF_FFFF  # PNG's four-byte integers stop at 2**31 - 1


def _probe_png(buf: memoryview) -> ImageHeader | None:
    if len(buf) < 33 or bytes(buf[8:16]) != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, color_type = struct.unpack_from(">IIBB", buf, 16)
    channels = _PNG_CHANNELS.get(color_type)
    if channels is None or depth not in _PNG_BIT_DEPTHS or width > _PNG_MAX_INT or height > _PNG_MAX_INT:
        return None
    has_alpha = color_type in (4, 6)
    has_exif = False
    n = len(buf)
    pos = 33
    seen_idat = False
    for _ in range(_MAX_STEPS):
        if pos + 8 > n:
            break
        length = _U32BE.unpack_from(buf, pos)[0]
        kind = bytes(buf[pos + 4 : pos + 8])
        if length > _PNG_MAX_INT or kind == b"IEND":
            break
        if kind == b"IDAT":
            seen_idat = True
        elif kind == b"tRNS" and not seen_idat:
            has_alpha = True
        elif kind == b"eXIf":
            # libpng accepts eXIf after IDAT too; skipping IDAT chunks costs one read per chunk.
            has_exif = True
        pos += 12 + length
    bit_depth = 8 if color_type == 3 else depth  # palette entries are 8-bit whatever the index depth
    return ImageHeader("png", width, height, channels, has_alpha, bit_depth, has_exif, False)


# ---------------------------------------------------------------------------------------------------
# WebP

_VP8X_ALPHA = 0x10
_VP8X_EXIF = 0x08
_VP8L_SIGNATURE = 0x2F
_VP8_START_CODE = b"\x9d\x01\x2a"


def _probe_webp(buf: memoryview) -> ImageHeader | None:
    if len(buf) < 20 or bytes(buf[8:12]) != b"WEBP":
        return None
    kind = bytes(buf[12:16])
    size = _U32LE.unpack_from(buf, 16)[0]
    payload = buf[20 : 20 + size]
    if kind == b"VP8 ":
        return _webp_vp8(payload)
    if kind == b"VP8L":
        return _webp_vp8l(payload)
    if kind == b"VP8X":
        return _webp_vp8x(buf, payload, 20 + size + (size & 1))
    return None


def _webp_vp8(payload: memoryview) -> ImageHeader | None:
    # The frame tag's low bit is 0 for a key frame, which is the only kind that carries dimensions.
    if len(payload) < 10 or payload[0] & 1 or bytes(payload[3:6]) != _VP8_START_CODE:
        return None
    width, height = struct.unpack_from("<HH", payload, 6)
    return ImageHeader("webp", width & 0x3FFF, height & 0x3FFF, 3, False, 8, False, False)


def _vp8l_size_alpha(payload: memoryview) -> tuple[int, int, bool] | None:
    if len(payload) < 5 or payload[0] != _VP8L_SIGNATURE:
        return None
    bits = _U32LE.unpack_from(payload, 1)[0]
    if bits >> 29:  # version must be 0
        return None
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)


def _webp_vp8l(payload: memoryview) -> ImageHeader | None:
    parsed = _vp8l_size_alpha(payload)
    if parsed is None:
        return None
    width, height, alpha = parsed
    return ImageHeader("webp", width, height, 4 if alpha else 3, alpha, 8, False, False)


def _webp_vp8x(buf: memoryview, payload: memoryview, pos: int) -> ImageHeader | None:
    if len(payload) < 10:
        return None
    flags = payload[0]
    width = (payload[4] | payload[5] << 8 | payload[6] << 16) + 1
    height = (payload[7] | payload[8] << 8 | payload[9] << 16) + 1
    has_alpha = bool(flags & _VP8X_ALPHA)
    has_exif = bool(flags & _VP8X_EXIF)
    # Encoders do not always set the flags to match the chunks they wrote, so the chunks count too.
    n = len(buf)
    for _ in range(_MAX_STEPS):
        if pos + 8 > n:
            break
        kind = bytes(buf[pos : pos + 4])
        size = _U32LE.unpack_from(buf, pos + 4)[0]
        if kind == b"ALPH":
            has_alpha = True
        elif kind == b"EXIF":
            has_exif = True
        elif kind == b"VP8L":
            parsed = _vp8l_size_alpha(buf[pos + 8 : pos + 8 + size])
            has_alpha = has_alpha or (parsed is not None and parsed[2])
        pos += 8 + size + (size & 1)
    return ImageHeader("webp", width, height, 4 if has_alpha else 3, has_alpha, 8, has_exif, False)


# ---------------------------------------------------------------------------------------------------
# GIF

_GIF_EXTENSION = 0x21
_GIF_GRAPHIC_CONTROL = 0xF9


def _probe_gif(buf: memoryview) -> ImageHeader | None:
    if len(buf) < 13:
        return None
    width, height, packed = struct.unpack_from("<HHB", buf, 6)
    pos = 13
    if packed & 0x80:
        pos += 3 << ((packed & 7) + 1)
    has_alpha = False
    n = len(buf)
    steps = 0
    # Only blocks before the first image: transparency declared later belongs to later frames.
    while pos + 1 < n and buf[pos] == _GIF_EXTENSION and steps < _MAX_STEPS:
        label = buf[pos + 1]
        pos += 2
        if label == _GIF_GRAPHIC_CONTROL and pos + 1 < n and buf[pos] >= 1:
            has_alpha = has_alpha or bool(buf[pos + 1] & 1)
        while pos < n and steps < _MAX_STEPS:  # data sub-blocks, ended by a zero-length one
            steps += 1
            block = buf[pos]
            pos += 1 + block
            if block == 0:
                break
    return ImageHeader("gif", width, height, 3, has_alpha, 8, False, False)


# ---------------------------------------------------------------------------------------------------
# BMP

_BMP_CORE_HEADER = 12
_BMP_INFO_HEADER = 40
_BMP_ALPHA_MASK_HEADER = 56  # BITMAPV3INFOHEADER and later carry an alpha mask at offset 52
_BMP_BITFIELDS = frozenset({3, 6})  # BI_BITFIELDS, BI_ALPHABITFIELDS


def _probe_bmp(buf: memoryview) -> ImageHeader | None:
    if len(buf) < 18:
        return None
    dib_size = _U32LE.unpack_from(buf, 14)[0]
    has_alpha = False
    if dib_size == _BMP_CORE_HEADER and len(buf) >= 26:
        width, height, _planes, bit_count = struct.unpack_from("<HHHH", buf, 18)
    elif dib_size >= _BMP_INFO_HEADER and len(buf) >= 30:
        width, height, _planes, bit_count = struct.unpack_from("<iiHH", buf, 18)
        if width < 0:
            return None
        height = abs(height)  # negative height means rows are stored top-down
        # BI_RGB's fourth byte is padding; only bit-field layouts can name an alpha channel.
        if bit_count == 32 and dib_size >= _BMP_ALPHA_MASK_HEADER and len(buf) >= 14 + 56:
            compression = _U32LE.unpack_from(buf, 30)[0]
            has_alpha = compression in _BMP_BITFIELDS and _U32LE.unpack_from(buf, 14 + 52)[0] != 0
    else:
        return None
    if bit_count == 0:
        return None
    channels = 4 if bit_count == 32 else 3
    return ImageHeader("bmp", width, height, channels, has_alpha, 8, False, False)


# ---------------------------------------------------------------------------------------------------
# TIFF

_TIFF_SHORT = 3
_TIFF_LONG = 4
_TIFF_WIDTH = 256
_TIFF_HEIGHT = 257
_TIFF_BITS = 258
_TIFF_PHOTOMETRIC = 262
_TIFF_SAMPLES = 277
_TIFF_EXTRA_SAMPLES = 338
_TIFF_PALETTE = 3
# Photometric interpretation -> colour samples; samples beyond these are extra (alpha) samples, which is
# how libtiff reads files that omit the ExtraSamples tag (OpenCV's own TIFF writer does).
_TIFF_COLOR_SAMPLES = {0: 1, 1: 1, 2: 3, 3: 1, 5: 4, 6: 3, 8: 3}


def _probe_tiff(buf: memoryview) -> ImageHeader | None:
    big_endian = buf[0] == ord("M")
    u16 = _U16BE if big_endian else _U16LE
    u32 = _U32BE if big_endian else _U32LE
    n = len(buf)
    if n < 8:
        return None
    ifd = u32.unpack_from(buf, 4)[0]
    if ifd < 8 or ifd + 2 > n:
        return None
    count = min(u16.unpack_from(buf, ifd)[0], (n - ifd - 2) // 12, _MAX_STEPS)
    tags: dict[int, tuple[int, int, int]] = {}  # tag -> (type, count, offset of the value field)
    for index in range(count):
        entry = ifd + 2 + 12 * index
        tag, kind, values = struct.unpack_from(">HHI" if big_endian else "<HHI", buf, entry)
        tags.setdefault(tag, (kind, values, entry + 8))

    def scalar(tag: int, default: int | None) -> int | None:
        if tag not in tags:
            return default
        kind, values, field = tags[tag]
        if values == 0:
            return default
        if kind == _TIFF_SHORT:
            # Two SHORTs fit in the entry; more live at the offset the entry holds.
            where = field if values <= 2 else u32.unpack_from(buf, field)[0]
            return int(u16.unpack_from(buf, where)[0]) if where + 2 <= n else None
        if kind == _TIFF_LONG:
            where = field if values == 1 else u32.unpack_from(buf, field)[0]
            return int(u32.unpack_from(buf, where)[0]) if where + 4 <= n else None
        return None

    width = scalar(_TIFF_WIDTH, None)
    height = scalar(_TIFF_HEIGHT, None)
    samples = scalar(_TIFF_SAMPLES, 1)
    bits = scalar(_TIFF_BITS, 1)
    photometric = scalar(_TIFF_PHOTOMETRIC, None)
    if width is None or height is None or not samples or not bits:
        return None
    color = _TIFF_COLOR_SAMPLES.get(photometric) if photometric is not None else None
    has_alpha = _TIFF_EXTRA_SAMPLES in tags or (color is not None and samples > color)
    channels = 3 if photometric == _TIFF_PALETTE and samples == 1 else samples
    return ImageHeader("tiff", width, height, channels, has_alpha, bits, True, False)


_PARSERS: dict[bytes, _Parser] = {
    b"\xff\xd8": _probe_jpeg,
    b"\x89PNG\r\n\x1a\n": _probe_png,
    b"RIFF": _probe_webp,
    b"GIF87a": _probe_gif,
    b"GIF89a": _probe_gif,
    b"BM": _probe_bmp,
    b"II*\x00": _probe_tiff,
    b"MM\x00*": _probe_tiff,
}
