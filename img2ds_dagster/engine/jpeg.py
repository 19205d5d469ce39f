"""Faster 1/8-scale decoding of progressive JPEGs: their luma's AC scans are left out.

libjpeg decodes a JPEG at 1/8 scale with a 1x1 inverse DCT, which reads only a block's DC
coefficient: for every component at full resolution (the luma of a 4:2:0 file, every component of a
4:4:4 or grayscale one), the 63 AC coefficients of each block are decoded and then never used. A
baseline file interleaves them with the DC, so they must be decoded to be skipped; a progressive
file keeps them in scans of their own, and those are most of its bytes and of its decoding time
(libjpeg-turbo decodes progressive data about five times slower than baseline data). On the
benchmark corpora, the progressive JPEGs large enough for 1/8 scale (2048 pixels and more) decode in
8.5 ms instead of 23 ms this way.

``dc_only()`` rewrites such a file without those AC scans and, in their place, one valid scan per
component that says "every AC coefficient is zero" (runs of end-of-block codes, a few bytes). The
stand-in scan matters: with AC coefficients that were never sent, libjpeg would "smooth" the blocks
and, when nothing at all was sent for the first nine of them, change their DC too; with coefficients
known to be zero it decodes exactly as before. Everything else (frame, tables, the DC scans, the
chroma scans, which a 4:2:0 file's chroma still needs at 1/8 scale, and the APP segments) is kept
byte for byte, so the pixels are identical (tested on every such file of both benchmark corpora and
on sampling, restart and grayscale variants).

``dc_only()`` answers None for anything it does not handle the way libjpeg would (baseline,
arithmetic-coded, 12-bit, truncated or oddly laid out files), and the caller decodes the original
bytes, so a broken file keeps its verdict.
"""

from __future__ import annotations

import re
import struct

from .probe import JPEG_SOF

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
_SOF_PROGRESSIVE_HUFFMAN = 0xC2
_SOS, _DRI = 0xDA, 0xDD
# What ends a scan's entropy-coded data: a marker, i.e. 0xFF followed by neither a stuffed zero, a
# restart marker (part of the scan) nor another 0xFF (fill).
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_MAX_EOB_RUN = 32767  # the longest run one EOBn code (n = 14) can carry


def _eob_table() -> bytes:
    """A DHT segment for AC table 0 holding the 15 end-of-block-run codes EOB0-EOB14, 4 bits each."""
    counts = bytes([0, 0, 0, 15] + [0] * 12)
    symbols = bytes(n << 4 for n in range(15))  # run-length class n, size 0
    body = b"\x10" + counts + symbols  # class 1 (AC), table 0
    return b"\xff\xc4" + struct.pack(">H", 2 + len(body)) + body


_EOB_TABLE = _eob_table()
_NO_RESTARTS = b"\xff\xdd\x00\x04\x00\x00"


def eob_runs(blocks: int) -> bytes:
    """Entropy-coded data, with ``_EOB_TABLE``, for ``blocks`` blocks whose AC coefficients are 0."""
    bits = nbits = 0
    while blocks:
        run = min(blocks, _MAX_EOB_RUN)
        n = run.bit_length() - 1
        # The code for EOBn is n itself (4 bits, canonical order), then the run's n low bits.
        bits = (bits << (4 + n)) | (n << n) | (run - (1 << n))
        nbits += 4 + n
        blocks -= run
    pad = -nbits % 8  # the last byte is padded with 1 bits
    bits = (bits << pad) | ((1 << pad) - 1)
    return (bits.to_bytes((nbits + pad) // 8, "big")).replace(b"\xff", b"\xff\x00")


def dc_only(raw: bytes) -> bytes | None:  # noqa: PLR0912 - a branch per marker or malformed case
    """``raw`` without the AC scans of its full-resolution components, or None to decode it as it is.

    Only for a decode at 1/8 scale: at any other scale the AC coefficients are needed."""
    if not raw.startswith(SOI):
        return None
    end_of_file = len(raw)
    kept: list[bytes] = [SOI]
    full_resolution: set[int] | None = None
    blocks = 0
    dropped: list[int] = []  # component ids whose AC scans were left out, in order
    restarts = False
    pos = len(SOI)
    while True:
        # A marker: 0xFF, optional 0xFF fill bytes, then its code.
        if pos + 2 > end_of_file or raw[pos] != 0xFF:
            return None
        while pos + 2 < end_of_file and raw[pos + 1] == 0xFF:
            pos += 1
        marker = raw[pos + 1]
        if marker == EOI[1]:
            break
        if pos + 4 > end_of_file or marker in (0x00, 0x01, 0xFF, SOI[1]) or 0xD0 <= marker <= 0xD7:
            return None  # cut short, or not where a segment belongs: let libjpeg judge
        (length,) = struct.unpack_from(">H", raw, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > end_of_file:
            return None
        if marker in JPEG_SOF:
            if marker != _SOF_PROGRESSIVE_HUFFMAN or full_resolution is not None:
                return None
            frame = _frame(raw, pos, length)
            if frame is None:
                return None
            full_resolution, blocks = frame
        elif marker == _DRI:
            restarts = True
        elif marker == _SOS:
            if full_resolution is None:
                return None
            scan = _scan(raw, pos, length)
            found = _END_OF_SCAN.search(raw, end)
            if scan is None or found is None:
                return None  # a malformed header, or data with no end (a truncated file)
            components, first_coefficient = scan
            if first_coefficient > 0:  # an AC scan, which holds one component
                if len(components) != 1:
                    return None
                if components[0] in full_resolution:
                    if components[0] not in dropped:
                        dropped.append(components[0])
                    pos = found.start()
                    continue
            end = found.start()
        kept.append(raw[pos:end])
        pos = end
    if not dropped:
        return None
    if restarts:
        kept.append(_NO_RESTARTS)  # the stand-in scans have no restart markers
    kept.append(_EOB_TABLE)
    data = eob_runs(blocks)
    for component in dropped:
        # One component, DC table 0 (unused), AC table 0, coefficients 1-63, no approximation.
        kept.append(b"\xff\xda\x00\x08\x01" + bytes([component, 0x00, 1, 63, 0x00]) + data)
    kept.append(EOI)
    return b"".join(kept)


def _frame(raw: bytes, pos: int, length: int) -> tuple[set[int], int] | None:
    """The ids of the components at full resolution and the number of blocks each of them has."""
    if length < 8:
        return None
    precision, height, width, count = struct.unpack_from(">BHHB", raw, pos + 4)
    if precision != 8 or width == 0 or height == 0 or count == 0 or length != 8 + 3 * count:
        return None
    sampling = {}
    for i in range(count):
        component, factors = raw[pos + 10 + 3 * i], raw[pos + 11 + 3 * i]
        sampling[component] = (factors >> 4, factors & 15)
    if len(sampling) != count:
        return None
    h_max = max(h for h, _ in sampling.values())
    v_max = max(v for _, v in sampling.values())
    full = {c for c, (h, v) in sampling.items() if (h, v) == (h_max, v_max)}
    # A full-resolution component's own scans cover ceil(width / 8) x ceil(height / 8) blocks.
    return full, -(-width // 8) * -(-height // 8)


def _scan(raw: bytes, pos: int, length: int) -> tuple[list[int], int] | None:
    """A scan header's component ids and first coefficient, if the header is well formed."""
    if length < 6:
        return None
    count = raw[pos + 4]
    if length != 6 + 2 * count:
        return None
    components = [raw[pos + 5 + 2 * i] for i in range(count)]
    end = pos + 2 + length
    first, last, approximation = raw[end - 3], raw[end - 2], raw[end - 1]
    if first > last or last > 63 or approximation >> 4 > 13 or approximation & 15 > 13:
        return None
    return components, first
