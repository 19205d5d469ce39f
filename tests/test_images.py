"""Image processing: img2dataset's output geometry for every resize mode, alpha, filters, limits."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import cv2
import exifread
import numpy as np
import pytest
from imageserver import ImageServer

from img2ds_dagster.engine.images import (
    ImageError,
    ImageProcessor,
    _resize,
    blur_boxes,
    exif_json,
    jpeg_reduction,
    parse_boxes,
    plan,
)
from img2ds_dagster.engine.probe import probe
from img2ds_dagster.engine.settings import ImageSettings

SAMPLES = Path(__file__).parents[1] / "img2ds_dagster" / "demo" / "samples"

# Output sizes img2dataset 1.47 produced for these input sizes at image_size=256 (recorded from a
# side-by-side run of both tools on the same URLs).
IMG2DATASET_SIZES = {
    (640, 480): {"keep_ratio": (341, 256), "keep_ratio_largest": (256, 192)},
    (480, 640): {"keep_ratio": (256, 341), "keep_ratio_largest": (192, 256)},
    (100, 300): {"keep_ratio": (256, 768), "keep_ratio_largest": (85, 256)},
    (255, 257): {"keep_ratio": (256, 258), "keep_ratio_largest": (254, 256)},
    (257, 1000): {"keep_ratio": (256, 996), "keep_ratio_largest": (66, 256)},
    (451, 300): {"keep_ratio": (385, 256), "keep_ratio_largest": (256, 170)},
    (1000, 250): {"keep_ratio": (1024, 256), "keep_ratio_largest": (256, 64)},
    (3000, 2000): {"keep_ratio": (384, 256), "keep_ratio_largest": (256, 171)},
    (7, 3000): {"keep_ratio_largest": (1, 256)},
    (40, 30): {"keep_ratio": (341, 256), "keep_ratio_largest": (256, 192)},
    (1, 1): {"keep_ratio": (256, 256), "keep_ratio_largest": (256, 256)},
}
CASES = [
    (size, mode, expected)
    for size, modes in IMG2DATASET_SIZES.items()
    for mode, expected in {**modes, "border": (256, 256), "center_crop": (256, 256), "no": size}.items()
]


def photo(server: ImageServer, width: int, height: int, ext: str = "jpg", *, alpha: bool = False) -> bytes:
    """A real photo of exactly this size, encoded as ``ext`` (the test server's generator)."""
    return server.assets.generated(width, height, f".{ext}", alpha, False)


def decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img


@pytest.mark.parametrize(("size", "mode", "expected"), CASES)
def test_output_size_matches_img2dataset(
    server: ImageServer, size: tuple[int, int], mode: str, expected: tuple[int, int]
) -> None:
    raw = photo(server, *size, "jpg")
    out = ImageProcessor(ImageSettings(resize_mode=mode)).process(raw)
    assert (out.width, out.height) == expected
    assert (out.original_width, out.original_height) == size
    assert decode(out.data).shape[:2] == (expected[1], expected[0])


@pytest.mark.parametrize(("mode", "expected"), [("border", (40, 30)), ("keep_ratio", (40, 30))])
def test_resize_only_if_bigger_leaves_small_images_alone(
    server: ImageServer, mode: str, expected: tuple[int, int]
) -> None:
    settings = ImageSettings(resize_mode=mode, resize_only_if_bigger=True)
    small = ImageProcessor(settings).process(photo(server, 40, 30, "jpg"))
    assert (small.width, small.height) == expected
    big = ImageProcessor(settings).process(photo(server, 640, 480, "jpg"))
    assert (big.width, big.height) == {"border": (256, 256), "keep_ratio": (341, 256)}[mode]


def test_border_pads_with_white(server: ImageServer) -> None:
    settings = ImageSettings(resize_mode="border", encode_format="png", encode_quality=1)
    out = decode(ImageProcessor(settings).process(photo(server, 640, 320, "jpg")).data)
    # 640x320 becomes 256x128 centred in 256x256: 64 rows of padding above and below.
    assert out.shape == (256, 256, 3)
    assert (out[:64] == 255).all()
    assert (out[-64:] == 255).all()
    assert (out[64:192] != 255).any()


def test_alpha_is_composited_on_white(server: ImageServer) -> None:
    raw = photo(server, 120, 120, "png", alpha=True)
    source = decode(raw)
    settings = ImageSettings(resize_mode="no", encode_format="png", encode_quality=1)
    out = decode(ImageProcessor(settings).process(raw).data)
    assert out.shape == (120, 120, 3)
    alpha = source[..., 3:4].astype(np.float64) / 255
    expected = np.rint(source[..., :3] * alpha + 255 * (1 - alpha))  # img2dataset's formula
    assert np.abs(out.astype(np.int16) - expected).max() <= 1
    transparent = source[..., 3] == 0
    assert transparent.any()
    assert (out[transparent] == 255).all()


@pytest.mark.parametrize("mode", ["border", "keep_ratio", "center_crop"])
def test_alpha_edges_match_compositing_before_resizing(mode: str) -> None:
    # A logo: opaque red on fully transparent *black* pixels, with hard edges. Compositing after a
    # plain resize would darken the edges; premultiplied resizing must not.
    logo = np.zeros((300, 420, 4), np.uint8)
    logo[60:240, 100:330] = (0, 0, 255, 255)
    logo[100:200, 150:280, 3] = 128  # a half-transparent window
    raw = cv2.imencode(".png", logo)[1].tobytes()
    settings = ImageSettings(resize_mode=mode, encode_format="png", encode_quality=1)
    out = decode(ImageProcessor(settings).process(raw).data)
    alpha = logo[..., 3:4].astype(np.float64) / 255
    flat = np.rint(logo[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)  # img2dataset: composite first
    expected = decode(ImageProcessor(settings).process(cv2.imencode(".png", flat)[1].tobytes()).data)
    assert out.shape == expected.shape
    assert np.abs(out.astype(np.int16) - expected).max() <= 2


@pytest.mark.parametrize("channels", [3, 4])
def test_png_colours_keep_their_channel_order(channels: int) -> None:
    # PNGs are decoded by another library than JPEGs, in RGB order: blue must stay blue.
    blue = np.zeros((50, 80, channels), np.uint8)
    blue[..., 0] = 255  # B in OpenCV's BGR(A)
    if channels == 4:
        blue[..., 3] = 255
    raw = cv2.imencode(".png", blue)[1].tobytes()
    out = decode(
        ImageProcessor(ImageSettings(resize_mode="no", encode_format="png", encode_quality=1))
        .process(raw)
        .data
    )
    assert out[25, 40].tolist() == [255, 0, 0]


def test_a_truncated_png_is_a_decoding_error() -> None:
    raw = cv2.imencode(".png", np.indices((200, 200)).sum(0).astype(np.uint8))[1].tobytes()
    with pytest.raises(ImageError, match=r"^Image decoding error$"):
        ImageProcessor(ImageSettings()).process(raw[: len(raw) // 2])


def test_grayscale_stays_one_channel() -> None:
    raw = (SAMPLES / "camera_384x384_gray.jpg").read_bytes()
    out = ImageProcessor(ImageSettings()).process(raw)
    assert decode(out.data).ndim == 2


def test_sixteen_bit_png_becomes_eight_bit() -> None:
    img = (np.indices((60, 80)).sum(0) * 500).astype(np.uint16)
    raw = cv2.imencode(".png", cv2.merge([img, img, img]))[1].tobytes()
    out = decode(
        ImageProcessor(ImageSettings(resize_mode="no", encode_format="png", encode_quality=3))
        .process(raw)
        .data
    )
    assert out.dtype == np.uint8
    assert out.shape == (60, 80, 3)


@pytest.mark.parametrize(
    ("encode_format", "header_format"), [("jpg", "jpeg"), ("png", "png"), ("webp", "webp")]
)
def test_encode_formats(server: ImageServer, encode_format: str, header_format: str) -> None:
    quality = 3 if encode_format == "png" else 90
    settings = ImageSettings(encode_format=encode_format, encode_quality=quality)
    out = ImageProcessor(settings).process(photo(server, 300, 200, "jpg"))
    header = probe(out.data)
    assert header is not None
    assert (header.format, header.width, header.height) == (header_format, 256, 256)


@pytest.mark.parametrize(
    ("settings", "size", "message"),
    [
        (ImageSettings(min_image_size=100), (300, 90), "image too small"),
        (ImageSettings(max_image_area=10_000), (200, 100), "image area too large"),
        (ImageSettings(max_aspect_ratio=2.0), (300, 100), "aspect ratio too large"),
    ],
)
def test_img2dataset_filters(
    server: ImageServer, settings: ImageSettings, size: tuple[int, int], message: str
) -> None:
    with pytest.raises(ImageError, match=f"^{message}$"):
        ImageProcessor(settings).process(photo(server, *size, "jpg"))


def test_a_header_claiming_too_many_pixels_is_not_decoded(server: ImageServer) -> None:
    bomb = server.assets.bomb
    assert len(bomb) < 1000
    started = time.monotonic()
    with pytest.raises(ImageError, match="30000x30000 pixels is over the max_decoded_pixels limit"):
        ImageProcessor(ImageSettings()).process(bomb)
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize("raw", [b"<html>not found</html>", b"\xff\xd8\xff\xe0garbage", b""])
def test_undecodable_bodies(raw: bytes) -> None:
    with pytest.raises(ImageError, match=r"^Image decoding error$"):
        ImageProcessor(ImageSettings()).process(raw)


def test_truncated_jpeg_is_a_decoding_error(server: ImageServer) -> None:
    raw = photo(server, 400, 300, "jpg")
    with pytest.raises(ImageError, match=r"^Image decoding error$"):
        ImageProcessor(ImageSettings()).process(raw[: len(raw) * 6 // 10])


@pytest.mark.parametrize("size", [(400, 300), (2400, 1000)])  # decoded at full size, and at 1/8
@pytest.mark.parametrize(
    "settings",
    [
        ImageSettings(min_image_size=1500),
        ImageSettings(max_image_area=10_000),
        ImageSettings(max_aspect_ratio=1.1),
    ],
)
def test_a_broken_image_is_a_decoding_error_whatever_the_filters(
    server: ImageServer, size: tuple[int, int], settings: ImageSettings
) -> None:
    # img2dataset decodes before it filters: its message is the decoding error, not the filter's.
    raw = photo(server, *size, "jpg")
    with pytest.raises(ImageError, match=r"^Image decoding error$"):
        ImageProcessor(settings).process(raw[: len(raw) * 6 // 10])


def test_an_encoder_limit_fails_the_sample_not_the_shard(server: ImageServer) -> None:
    # keep_ratio makes 7x3000 into 256x109714, past JPEG's 65535-pixel limit.
    with pytest.raises(ImageError):
        ImageProcessor(ImageSettings(resize_mode="keep_ratio")).process(photo(server, 7, 3000, "jpg"))


def test_large_jpegs_are_decoded_at_reduced_size_with_the_same_result(server: ImageServer) -> None:
    raw = photo(server, 3000, 2000, "jpg")
    header = probe(raw)
    assert header is not None
    settings = ImageSettings(resize_mode="border")
    assert jpeg_reduction(header, plan(3000, 2000, settings), settings) == 8
    reduced = ImageProcessor(settings).process(raw)
    full = ImageProcessor(ImageSettings(resize_mode="border", reduced_jpeg_decode=False)).process(raw)
    assert (reduced.width, reduced.height) == (full.width, full.height) == (256, 256)
    mse = np.mean((decode(reduced.data).astype(float) - decode(full.data).astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35


def psnr(a: bytes, b: bytes) -> float:
    mse = np.mean((decode(a).astype(float) - decode(b).astype(float)) ** 2)
    return float(10 * np.log10(255**2 / mse)) if mse else float("inf")


@pytest.mark.parametrize(("width", "height", "factor"), [(2049, 1537, 8), (2044, 1533, 4), (1021, 766, 2)])
def test_a_reduced_jpeg_keeps_the_exact_scale(
    server: ImageServer, width: int, height: int, factor: int
) -> None:
    # At 1/8, 2049 pixels are 256.125: libjpeg rounds up to 257, and resizing those 257 pixels to
    # the target would stretch the picture by most of a pixel (31.6 dB against a full decode).
    # 2044 pixels are 255.5 at 1/8, which libjpeg rounds up to the target's 256: too few pixels of
    # picture, so 1/4 it is (1/8 gave 35.5 dB here, 1021 pixels at 1/2 33.1 dB).
    raw = photo(server, width, height, "jpg")
    header = probe(raw)
    assert header is not None
    assert jpeg_reduction(header, plan(width, height, ImageSettings()), ImageSettings()) == factor
    reduced = ImageProcessor(ImageSettings()).process(raw)
    full = ImageProcessor(ImageSettings(reduced_jpeg_decode=False)).process(raw)
    assert (reduced.width, reduced.height) == (full.width, full.height) == (256, 256)
    assert psnr(reduced.data, full.data) > 40


@pytest.mark.parametrize(
    ("ext", "alpha", "size"),
    [
        ("webp", False, (1000, 700)),
        ("webp", True, (1000, 700)),
        ("png", False, (1500, 1100)),
        ("png", True, (1000, 700)),
    ],
)
def test_large_images_are_averaged_down_first_with_the_same_result(
    server: ImageServer, ext: str, alpha: bool, size: tuple[int, int]
) -> None:
    raw = photo(server, *size, ext, alpha=alpha)
    reduced = ImageProcessor(ImageSettings()).process(raw)
    full = ImageProcessor(ImageSettings(reduced_jpeg_decode=False)).process(raw)
    assert (reduced.width, reduced.height, reduced.original_width) == (full.width, full.height, size[0])
    assert reduced.data != full.data  # the two-step resize did run
    assert psnr(reduced.data, full.data) > 38
    if alpha:
        # The image fits as 256x179 (or 256x188) from row 38 (34); the mask is fully transparent
        # in the corners, which come out white.
        top = (256 - round(256 * size[1] / size[0])) // 2
        assert decode(reduced.data)[top + 1 : top + 4, 0:3].min() >= 240


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_reduced_images_come_out_at_the_planned_size(scale: int) -> None:
    # Every rounding of the reduced sizes, for sides that are and are not multiples of the scale.
    for width in range(509, 2600, 97):
        for mode in ("border", "keep_ratio", "center_crop"):
            settings = ImageSettings(resize_mode=mode)
            height = width * 3 // 4 + 1
            geometry = plan(width, height, settings)
            assert geometry.size is not None
            if -(-width // scale) < geometry.size[0] or -(-height // scale) < geometry.size[1]:
                continue  # not a scale libjpeg would be asked for
            img = np.zeros((-(-height // scale), -(-width // scale), 3), np.uint8)
            out = _resize(img, geometry, (width, height), scale, reduce=True)
            assert (out.shape[1], out.shape[0]) == geometry.size


def test_no_reduction_when_the_target_needs_every_pixel() -> None:
    settings = ImageSettings(image_size=256)
    header = probe(cv2.imencode(".jpg", np.zeros((400, 300, 3), np.uint8))[1].tobytes())
    assert header is not None
    assert jpeg_reduction(header, plan(300, 400, settings), settings) == 1
    assert jpeg_reduction(header, plan(300, 400, ImageSettings(resize_mode="no")), settings) == 1


def exifread_json(raw: bytes) -> str:
    """What img2dataset stores in the exif column."""
    tags = exifread.process_file(io.BytesIO(raw), details=False)
    return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.iterdir() if p.suffix != ".md"))
def test_exif_matches_img2dataset(name: str) -> None:
    raw = (SAMPLES / name).read_bytes()
    assert exif_json(raw, probe(raw)) == exifread_json(raw)


def test_exif_is_read_when_present() -> None:
    raw = (SAMPLES / "chelsea_451x300_exif.jpg").read_bytes()
    tags = json.loads(exif_json(raw, probe(raw)) or "{}")
    assert tags["Image Make"] == "img2ds_dagster"
    assert "EXIF DateTimeOriginal" in tags


# SHA-256 of img2dataset 1.47's BoundingBoxBlurrer output for the cases below, computed with
# img2dataset (albumentations 1.4.24) on the same seeded arrays: the blur must match it bit for bit.
BLUR_CASES = [
    (
        "color",
        [[0.1, 0.2, 0.5, 0.6], [0.7, 0.1, 0.95, 0.3]],
        "ab9dc6006e0e7174ab084ee82f6a6220df59118477f8ccd06836b329237e21f7",
    ),
    (
        "gray",
        [[0.1, 0.2, 0.5, 0.6], [0.7, 0.1, 0.95, 0.3]],
        "bde41c62bd20f0ad40f8cd79058358be63314e5b0357645e1601eaa6b72eb109",
    ),
    ("color", [[0.0, 0.0, 1.0, 1.0]], "c80ce4862e4288df74fb6d45a9fe486c961d3c4289b26d4d88c0361856c63711"),
    ("color", [[0.5, 0.5, 0.5, 0.5]], "e2a585d7ead64f2f5fadf0646740df3cee8f4eba304cc6eb06216b77b8d1a43a"),
]


@pytest.mark.parametrize(("kind", "boxes", "expected"), BLUR_CASES)
def test_blur_matches_img2datasets_blurrer(kind: str, boxes: list[list[float]], expected: str) -> None:
    img = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    if kind == "gray":
        img = img[..., 1].copy()
    out = blur_boxes(img, boxes)
    assert out.shape == img.shape
    assert hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest() == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[[0.1, 0.2]]", "a box is"),
        ("not json", "is not a list of boxes"),
        ([["a", 0, 0, 0]], "is not a list of"),
    ],
)
def test_bad_boxes_fail_the_sample_naming_bbox_col(value: object, message: str) -> None:
    with pytest.raises(ImageError, match=f"^bbox_col: .*{message}"):
        parse_boxes(value)


def test_boxes_are_read_from_lists_and_json_text() -> None:
    assert parse_boxes(None) is None
    assert parse_boxes([]) == []
    assert parse_boxes("[[0, 0.5, 1, 1]]") == [[0.0, 0.5, 1.0, 1.0]]
    assert parse_boxes([(0, 0, 1, 1)]) == [[0.0, 0.0, 1.0, 1.0]]
