"""Progressive JPEGs decoded at 1/8 scale without their luma's AC scans (engine/jpeg.py) give
libjpeg's pixels and libjpeg's verdicts.

Every layout OpenCV's libjpeg-turbo writes (4:2:0, 4:2:2, 4:4:4, grayscale, restart intervals,
sides that are not a multiple of 8, more blocks than one end-of-block run holds) decodes to the same
array with nothing on stderr; files the fast path does not take (baseline, arithmetic-coded, 12-bit,
truncated, malformed) come back as None, so they are decoded from their own bytes as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from img2ds_dagster.engine import jpeg
from img2ds_dagster.engine.images import ImageError, ImageProcessor, ProcessedImage
from img2ds_dagster.engine.settings import ImageSettings

SAMPLES = Path(__file__).resolve().parent.parent / "img2ds_dagster" / "demo" / "samples"
REDUCED_8 = cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION
REDUCED_GRAY_8 = cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION


def photo(width: int, height: int) -> np.ndarray:
    """A real photograph (the bundled rocket) enlarged to ``width`` x ``height``, BGR."""
    img = cv2.imread(str(SAMPLES / "rocket_1200x800.jpg"), cv2.IMREAD_COLOR)
    assert img is not None
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)


def progressive(img: np.ndarray, *params: int) -> bytes:
    ok, data = cv2.imencode(
        ".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 90, *params]
    )
    assert ok
    return data.tobytes()


def decode(raw: bytes, flags: int = REDUCED_8) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), flags)
    assert img is not None
    return img


def markers(raw: bytes, code: int) -> int:
    """How many segments with this marker code the file has (0xDA: scans)."""
    return raw.count(bytes([0xFF, code]))


VARIANTS: dict[str, Callable[[], bytes]] = {
    # 288 x 216 = 62,208 luma blocks: two end-of-block runs, the first 32,767 long.
    "4:2:0": lambda: progressive(photo(2304, 1728)),
    "4:4:4": lambda: progressive(
        photo(2048, 1536), cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444
    ),
    "4:2:2": lambda: progressive(
        photo(2048, 1536), cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422
    ),
    "grayscale": lambda: progressive(cv2.cvtColor(photo(2400, 1600), cv2.COLOR_BGR2GRAY)),
    "restart interval": lambda: progressive(photo(2100, 2100), cv2.IMWRITE_JPEG_RST_INTERVAL, 7),
    "odd sides": lambda: progressive(photo(2053, 3001)),
    "panorama": lambda: progressive(photo(4096, 1030)),
    "low quality": lambda: progressive(photo(2400, 1600), cv2.IMWRITE_JPEG_QUALITY, 30),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_layout_decodes_to_libjpegs_pixels_at_one_eighth(
    name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    raw = VARIANTS[name]()
    lighter = jpeg.dc_only(raw)
    assert lighter is not None, "the fast path should take this file"
    assert len(lighter) < len(raw) * 0.6
    assert markers(lighter, 0xDA) < markers(raw, 0xDA)
    flags = REDUCED_GRAY_8 if name == "grayscale" else REDUCED_8
    expected, got = decode(raw, flags), decode(lighter, flags)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)
    # libjpeg prints its warnings (a bad scan, extra bytes, a bogus progression) on stderr.
    assert capfd.readouterr().err == ""


def read_eob_runs(data: bytes) -> tuple[list[int], str]:
    """The runs coded in ``data`` (codes 0-14, 4 bits each, then n bits), and the leftover bits."""
    assert b"\xff" not in data.replace(b"\xff\x00", b"")
    bits = "".join(f"{byte:08b}" for byte in data.replace(b"\xff\x00", b"\xff"))
    runs, pos = [], 0
    while len(bits) - pos >= 4 and bits[pos : pos + 4] != "1111":
        n = int(bits[pos : pos + 4], 2)
        extra = bits[pos + 4 : pos + 4 + n]
        runs.append((1 << n) + (int(extra, 2) if extra else 0))
        pos += 4 + n
    return runs, bits[pos:]


@pytest.mark.parametrize("blocks", [1, 2, 3, 255, 256, 4097, 32767, 32768, 62208, 100_000])
def test_end_of_block_runs_cover_every_block(blocks: int) -> None:
    data = jpeg.eob_runs(blocks)
    runs, rest = read_eob_runs(data)
    assert sum(runs) == blocks
    assert all(run <= 32767 for run in runs)
    assert set(rest) <= {"1"}  # padded with 1 bits...
    assert len(rest) < 8  # ...to the byte


def test_a_run_of_32767_needs_byte_stuffing() -> None:
    # 1110 then fourteen 1 bits: a 0xFF byte, which entropy-coded data must follow with 0x00.
    assert b"\xff\x00" in jpeg.eob_runs(32767)


def sof_precision_12(raw: bytes) -> bytes:
    at = raw.index(b"\xff\xc2") + 4
    return raw[:at] + b"\x0c" + raw[at + 1 :]


def with_marker(raw: bytes, old: bytes, new: bytes) -> bytes:
    return raw.replace(old, new, 1)


def first_ac_band(raw: bytes, first: int, last: int) -> bytes:
    """``raw`` with the spectral band of its first AC scan header set to [first, last]."""
    at = raw.find(b"\xff\xda")
    while raw[at + 2 + struct.unpack_from(">H", raw, at + 2)[0] - 3] == 0:  # a DC scan: next one
        at = raw.find(b"\xff\xda", at + 2)
    band = at + 2 + struct.unpack_from(">H", raw, at + 2)[0] - 3
    return raw[:band] + bytes([first, last]) + raw[band + 2 :]


REFUSED: dict[str, Callable[[bytes], bytes]] = {
    "baseline": lambda raw: cv2.imencode(".jpg", decode(raw, cv2.IMREAD_COLOR))[1].tobytes(),
    "arithmetic-coded frame (SOF10)": lambda raw: with_marker(raw, b"\xff\xc2", b"\xff\xca"),
    "12-bit samples": sof_precision_12,
    "truncated in a scan": lambda raw: raw[: len(raw) * 2 // 3],
    "no end of image": lambda raw: raw[:-2],
    "garbage between segments": lambda raw: with_marker(raw, b"\xff\xc2", b"\x00\xff\xc2"),
    "no frame before the first scan": lambda raw: with_marker(raw, b"\xff\xc2", b"\xff\xe5"),
    "a scan whose band ends before it starts": lambda raw: first_ac_band(raw, 5, 1),
    "a scan whose band ends past 63": lambda raw: first_ac_band(raw, 1, 64),
    "not a JPEG": lambda raw: (SAMPLES / "coffee_240x240_alpha.png").read_bytes(),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_files_the_fast_path_does_not_handle_are_left_to_libjpeg(name: str) -> None:
    raw = progressive(photo(2048, 1536))
    changed = REFUSED[name](raw)
    assert changed != raw
    assert jpeg.dc_only(changed) is None


def test_a_progressive_file_with_no_luma_ac_scans_is_left_as_it_is() -> None:
    lighter = jpeg.dc_only(progressive(photo(2048, 1536)))
    assert lighter is not None
    stand_in = lighter.rindex(b"\xff\xda")  # the last scan: the stand-in for the luma's AC scans
    dc_and_chroma = lighter[:stand_in] + jpeg.EOI
    assert jpeg.dc_only(dc_and_chroma) is None


def scan_headers(raw: bytes) -> list[tuple[int, ...]]:
    """(components..., Ss, Se) of every scan, read the simple way (headers hold no 0xFF here)."""
    headers, at = [], raw.find(b"\xff\xda")
    while at != -1:
        (length,) = struct.unpack_from(">H", raw, at + 2)
        count = raw[at + 4]
        ids = tuple(raw[at + 5 + 2 * i] for i in range(count))
        headers.append((*ids, raw[at + 2 + length - 3], raw[at + 2 + length - 2]))
        at = raw.find(b"\xff\xda", at + 2 + length)
    return headers


def test_only_the_full_resolution_components_ac_scans_are_replaced() -> None:
    raw = progressive(photo(2304, 1728))  # 4:2:0: luma is component 1
    lighter = jpeg.dc_only(raw)
    assert lighter is not None
    before, after = scan_headers(raw), scan_headers(lighter)
    luma_ac = [h for h in before if h[0] == 1 and h[-2] > 0]
    assert len(luma_ac) >= 2
    assert [h for h in before if h not in luma_ac] == after[:-1]  # DC and chroma scans, in order
    assert after[-1] == (1, 1, 63)


def processor() -> ImageProcessor:
    return ImageProcessor(ImageSettings(image_size=256, resize_mode="border", encode_quality=95))


def test_the_processor_gives_the_same_bytes_with_and_without_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raws = [VARIANTS[name]() for name in ("4:2:0", "grayscale", "odd sides")]
    taken: list[bool] = []
    real = jpeg.dc_only

    def spy(raw: bytes) -> bytes | None:
        lighter = real(raw)
        taken.append(lighter is not None)
        return lighter

    monkeypatch.setattr(jpeg, "dc_only", spy)
    fast = [processor().process(raw) for raw in raws]
    assert taken == [True, True, True]
    monkeypatch.setattr(jpeg, "dc_only", lambda raw: None)
    slow = [processor().process(raw) for raw in raws]
    assert fast == slow


def test_the_fast_path_is_only_for_one_eighth_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(jpeg, "dc_only", calls.append)
    processor().process(progressive(photo(2040, 1500)))  # 1/4 scale: 2040 / 8 < 256
    processor().process(cv2.imencode(".jpg", photo(2304, 1728))[1].tobytes())  # baseline
    ImageProcessor(ImageSettings(image_size=256, reduced_jpeg_decode=False)).process(
        progressive(photo(2304, 1728))
    )
    assert calls == []
    processor().process(progressive(photo(2304, 1728)))
    assert len(calls) == 1


def test_a_truncated_progressive_file_keeps_its_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = progressive(photo(2304, 1728))
    cut = raw[: len(raw) // 2]
    assert jpeg.dc_only(cut) is None
    outcomes: list[ProcessedImage | str] = []
    for fast_path in (jpeg.dc_only, lambda raw: None):
        monkeypatch.setattr(jpeg, "dc_only", fast_path)
        try:
            outcomes.append(processor().process(cut))
        except ImageError as err:
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1]


SMALL = {
    "4:2:0": progressive(photo(96, 64)),
    "4:4:4 with restarts": progressive(
        photo(80, 72),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        cv2.IMWRITE_JPEG_RST_INTERVAL,
        2,
    ),
    "grayscale": progressive(cv2.cvtColor(photo(64, 64), cv2.COLOR_BGR2GRAY)),
}


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(SMALL)),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=6)), max_size=5),
    st.integers(0, 1 << 16),
)
def test_property_corrupted_files_never_raise(name: str, patches: list[tuple[int, bytes]], cut: int) -> None:
    # The bytes come from the web: a parsing error here would fail the whole shard, not one sample.
    data = bytearray(SMALL[name])
    for offset, replacement in patches:
        start = offset % len(data)
        data[start : start + len(replacement)] = replacement
    raw = bytes(data[: len(data) - cut % len(data)])  # cut anywhere, or not at all
    lighter = jpeg.dc_only(raw)
    if lighter is not None:
        assert lighter.startswith(jpeg.SOI)
        assert lighter.endswith(jpeg.EOI)
        cv2.imdecode(np.frombuffer(lighter, np.uint8), REDUCED_8)  # no crash; None is an answer
