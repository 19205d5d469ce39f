"""resize_mode="bucket" and exif_transpose: the bucket list, the bucket each image goes to, the cover
resize and crop against PIL's antialiased bicubic, no upsampling, EXIF orientations, chroma
subsampling, and the bucket columns a download writes."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_url_file
from imageserver import SAMPLES_DIR, ImageServer
from PIL import Image, ImageOps, JpegImagePlugin

from img2ds_dagster import download
from img2ds_dagster.engine.buckets import buckets, nearest_bucket
from img2ds_dagster.engine.images import ImageError, ImageProcessor, bucket_corner
from img2ds_dagster.engine.probe import probe
from img2ds_dagster.engine.settings import ImageSettings
from img2ds_dagster.errors import ConfigError

BUCKET = ImageSettings(resize_mode="bucket")
# The card's bucket ids and their targets at base 512 (reference/bucketed-dataset-card.md).
CARD = {
    "p1024x1024": (512, 512),
    "p1152x896": (576, 448),
    "p1152x832": (576, 416),
    "p1216x832": (608, 416),
    "p832x1152": (416, 576),
    "p832x1216": (416, 608),
    "p1280x768": (640, 384),
    "p2048x512": (1024, 256),
}
# The aspect ratios of the benchmark corpus (benchmarks/corpus.py, ASPECTS; "pano" is 2:1 to 4:1)
# with the few-percent crops it applies, both ways round.
CORPUS_RATIOS = [4 / 3, 3 / 2, 1.0, 16 / 9, 2.0, 3.0, 4.0, 4 / 3 * 0.93, 3 / 2 * 1.07]
SIZES = sorted(
    {(round(1400 * r), 1400) for r in CORPUS_RATIOS}
    | {(1400, round(1400 * r)) for r in CORPUS_RATIOS}
    | {(2600, 700), (700, 2600), (1025, 257), (513, 512)}
)


def photo(server: ImageServer, width: int, height: int) -> bytes:
    return server.assets.generated(width, height, ".jpg", False, False)


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_the_bucket_list_holds_the_cards_buckets_at_its_base() -> None:
    found = {b.id: (b.width, b.height) for b in buckets(512, 32)}
    assert {k: found[k] for k in CARD} == CARD
    assert len(found) == 41  # SDXL's 41 proto sizes, all distinct at 512
    for base, divisible in ((512, 32), (768, 64), (256, 16), (1024, 8)):
        for b in buckets(base, divisible):
            assert (b.width % divisible, b.height % divisible) == (0, 0), (base, b)
            assert abs(b.width * b.height / base**2 - 1) < 0.2, (base, b)  # about base x base pixels


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio() -> None:
    assert nearest_bucket(1000, 1000, 512, 32).id == "p1024x1024"
    assert nearest_bucket(1200, 800, 512, 32).id == "p1216x832"  # 1.5 is nearer 1.46 than 1.67
    assert nearest_bucket(800, 1200, 512, 32).id == "p832x1216"
    assert nearest_bucket(9000, 1000, 512, 32).id == "p2048x512"  # beyond the widest: the widest
    for width, height in SIZES:
        chosen = nearest_bucket(width, height, 512, 32)
        distance = abs(math.log(chosen.width / chosen.height) - math.log(width / height))
        assert all(
            distance <= abs(math.log(b.width / b.height) - math.log(width / height)) for b in buckets(512, 32)
        )


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_a_bucket_image_has_its_buckets_exact_size_and_is_never_upsampled(
    server: ImageServer, width: int, height: int
) -> None:
    out = ImageProcessor(BUCKET).process(photo(server, width, height))
    bucket = nearest_bucket(width, height, 512, 32)
    assert out.bucket == bucket
    assert (out.width, out.height) == (bucket.width, bucket.height)
    assert decode(out.data).shape == (bucket.height, bucket.width, 3)
    assert out.width % 32 == 0
    assert out.height % 32 == 0
    assert out.width <= width
    assert out.height <= height
    assert (out.original_width, out.original_height) == (width, height)


def test_the_demo_samples_in_bucket_mode() -> None:
    """Every demo sample either fills its bucket without upsampling or is refused naming the bucket."""
    processor = ImageProcessor(BUCKET)
    kept, refused = [], []
    for path in sorted(SAMPLES_DIR.glob("*.*")):
        if path.suffix == ".md":
            continue
        header = probe(path.read_bytes())
        assert header is not None
        bucket = nearest_bucket(header.width, header.height, 512, 32)
        if bucket.width > header.width or bucket.height > header.height:
            with pytest.raises(ImageError, match=rf"bucket {bucket.id} \({bucket.width}x{bucket.height}\)"):
                processor.process(path.read_bytes())
            refused.append(path.name)
            continue
        out = processor.process(path.read_bytes())
        img = decode(out.data)
        assert img.shape == (bucket.height, bucket.width, 3), path.name  # RGB, gray and alpha included
        kept.append(path.name)
    assert "astronaut_600x900.jpg" in kept
    assert "rocket_1200x800.jpg" in kept
    assert "hubble_1000x250.jpg" in refused  # 1000 wide: p2048x512 wants 1024


def test_the_cover_resize_matches_pils_antialiased_bicubic(server: ImageServer) -> None:
    """The card's processing done with PIL (bicubic with its antialiasing, cover, centre crop) and
    ours agree to well within JPEG's own error."""
    for width, height in ((2600, 1400), (1400, 1400), (1000, 1500), (700, 2600)):
        raw = photo(server, width, height)
        bucket = nearest_bucket(width, height, 512, 32)
        settings = ImageSettings(resize_mode="bucket", encode_format="png", encode_quality=1)
        ours = decode(ImageProcessor(settings).process(raw).data)
        source = Image.open(io.BytesIO(raw)).convert("RGB")
        scale = max(bucket.width / width, bucket.height / height)
        size = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
        resized = source.resize(size, Image.Resampling.BICUBIC)
        x, y = (size[0] - bucket.width) // 2, (size[1] - bucket.height) // 2
        reference = np.asarray(resized.crop((x, y, x + bucket.width, y + bucket.height)))[..., ::-1]
        assert psnr(ours, reference) > 35, (width, height, psnr(ours, reference))


def corner_image(width: int, height: int) -> np.ndarray:
    """Four flat quadrants: blue, green / red, white (BGR)."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 2] = (255, 0, 0)
    img[: height // 2, width // 2 :] = (0, 255, 0)
    img[height // 2 :, : width // 2] = (0, 0, 255)
    img[height // 2 :, width // 2 :] = (255, 255, 255)
    return img


def edged(width: int, height: int) -> np.ndarray:
    """Mid gray with a white band 40 pixels wide along each edge of the longer side's ends."""
    img = np.full((height, width, 3), 128, np.uint8)
    if width > height:
        img[:, :40], img[:, -40:] = 255, 255
    else:
        img[:40], img[-40:] = 255, 255
    return img


@pytest.mark.parametrize("corner", [0, 1, 2, 3])
def test_a_corner_crop_keeps_the_corner_it_picks(corner: int) -> None:
    """At base 1024, 2060 x 2000 goes to the 1024 x 1024 bucket with 30 columns to spare once covered
    (58 of the source's): a corner crop keeps the band on its own side and cuts the other one off."""
    settings = ImageSettings(
        resize_mode="bucket",
        bucket_base=1024,
        bucket_crop="corner",
        bucket_corners=(corner,),
        encode_format="png",
        encode_quality=1,
    )
    wide = decode(ImageProcessor(settings).process(bytes(cv2.imencode(".png", edged(2060, 2000))[1])).data)
    tall = decode(ImageProcessor(settings).process(bytes(cv2.imencode(".png", edged(2000, 2060))[1])).data)
    assert wide.shape == tall.shape == (1024, 1024, 3)
    left, right = wide[:, :8].mean() > 250, wide[:, -8:].mean() > 250
    top, bottom = tall[:8].mean() > 250, tall[-8:].mean() > 250
    assert (left, right) == ((True, False) if corner in (0, 2) else (False, True))
    assert (top, bottom) == ((True, False) if corner in (0, 1) else (False, True))


def test_the_corner_is_chosen_per_image_from_its_bytes() -> None:
    settings = ImageSettings(resize_mode="bucket", bucket_crop="corner", bucket_corners=(2, 3))
    picks = [bucket_corner(bytes([i]) * 100, settings) for i in range(64)]
    assert set(picks) == {2, 3}  # both allowed corners occur, no other
    assert picks == [bucket_corner(bytes([i]) * 100, settings) for i in range(64)]  # the same every time


def exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_transpose_makes_every_orientation_upright(orientation: int) -> None:
    stored = Image.fromarray(corner_image(300, 200)[..., ::-1])  # 300 wide, 200 high as stored
    raw = exif_jpeg(stored, orientation)
    header = probe(raw)
    assert header is not None
    assert header.orientation == orientation
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))))[..., ::-1]
    out = ImageProcessor(ImageSettings(resize_mode="no", exif_transpose=True)).process(raw)
    assert (out.width, out.height) == (upright.shape[1], upright.shape[0])
    assert (out.original_width, out.original_height) == (out.width, out.height)
    assert psnr(decode(out.data), upright) > 30
    # By default, outside bucket mode, the orientation is ignored as img2dataset ignores it.
    kept = ImageProcessor(ImageSettings(resize_mode="no")).process(raw)
    assert (kept.width, kept.height) == (300, 200)


def test_bucket_mode_transposes_by_default(server: ImageServer) -> None:
    turned = Image.open(io.BytesIO(photo(server, 1400, 1000))).transpose(Image.Transpose.ROTATE_90)
    raw = exif_jpeg(turned, 6)  # stored 1000 x 1400, shown 1400 x 1000 once rotated 90 degrees clockwise
    out = ImageProcessor(BUCKET).process(raw)
    assert out.bucket is not None
    assert out.bucket.width > out.bucket.height
    assert (out.original_width, out.original_height) == (1400, 1000)
    sideways = ImageProcessor(ImageSettings(resize_mode="bucket", exif_transpose=False)).process(raw)
    assert sideways.bucket is not None
    assert sideways.bucket.width < sideways.bucket.height


def test_chroma_is_kept_whole_when_the_image_is_scaled_down_enough(server: ImageServer) -> None:
    """adaptive_scale: 4:4:4 at a scale of 0.85 or less, 4:2:0 above (JpegImagePlugin: 0 and 2)."""
    small = ImageProcessor(BUCKET).process(photo(server, 2048, 1536))  # to 576 x 448 at 0.29
    near = ImageProcessor(BUCKET).process(photo(server, 600, 460))  # to 576 x 448 at 0.97
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(small.data))) == 0
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(near.data))) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bucket_divisible": 0}, "bucket_divisible"),
        ({"bucket_base": 16}, "bucket_base"),
        ({"bucket_crop": "middle"}, "bucket_crop"),
        ({"bucket_corners": ()}, "bucket_corners"),
        ({"bucket_corners": (4,)}, "bucket_corners"),
    ],
)
def test_bad_bucket_options_are_refused_by_name(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ImageSettings(resize_mode="bucket", **options)  # type: ignore[arg-type]


def test_a_bucket_download_records_each_samples_bucket(server: ImageServer, tmp_path: Path) -> None:
    names = ["rocket_1200x800.jpg", "astronaut_600x900.jpg", "hubble_1000x250.jpg"]
    urls = write_url_file(tmp_path / "urls.txt", [server.url(f"/samples/{n}") for n in names])
    out = tmp_path / "out"
    download(str(urls), output_folder=str(out), output_format="webdataset", resize_mode="bucket")
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in rows}
    rocket, hubble = by_url["rocket_1200x800.jpg"], by_url["hubble_1000x250.jpg"]
    assert (rocket["status"], rocket["bucket_id"], rocket["target_width"], rocket["target_height"]) == (
        "success",
        "p1216x832",
        608,
        416,
    )
    assert (hubble["status"], hubble["bucket_id"]) == ("failed_to_resize", "p2048x512")
    assert (hubble["original_width"], hubble["original_height"]) == (1000, 250)
    assert "no upsampling" in hubble["error_message"]
    with tarfile.open(out / "00000.tar") as tar:
        meta = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]  # type: ignore[arg-type]
    assert sorted(m["bucket_id"] for m in meta) == ["p1216x832", "p832x1216"]
    assert all((m["width"], m["height"]) == (m["target_width"], m["target_height"]) for m in meta)
