"""Decode, check, resize, pad or crop, and re-encode one image, with img2dataset's geometry, or into
an aspect-ratio bucket (``resize_mode="bucket"``, buckets.py).

The output geometry is planned from the header's dimensions before anything is decoded, which lets
the processor refuse decompression bombs for free and let libjpeg decode large JPEGs at 1/2, 1/4 or
1/8 scale; other large images are averaged down by a whole factor before the final resize.
Everything here runs in OpenCV calls that release the GIL, so several threads process images in
parallel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import zlib
from dataclasses import dataclass
from typing import Any

import cv2
import exifread
import imagecodecs
import numpy as np
import numpy.typing as npt

from . import jpeg, png
from .buckets import Bucket, cover_scale, cover_size, crop_origin, nearest_bucket
from .probe import ImageHeader, probe
from .settings import ImageSettings

Image = npt.NDArray[Any]  # 8-bit gray (h, w) or BGR (h, w, 3) once decoded

INTERPOLATION_FLAGS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
    "lanczos4": cv2.INTER_LANCZOS4,
}
ENCODERS = {
    "jpg": (".jpg", cv2.IMWRITE_JPEG_QUALITY),
    "png": (".png", cv2.IMWRITE_PNG_COMPRESSION),
    "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY),
}
_REDUCED_FLAGS = {
    (1, False): cv2.IMREAD_COLOR,
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
    (1, True): cv2.IMREAD_GRAYSCALE,
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
WHITE = (255, 255, 255, 255)
# encode_format -> the header format that needs no re-encoding under skip_reencode
_HEADER_FORMATS = {"jpg": "jpeg", "png": "png", "webp": "webp"}
Boxes = list[list[float]]


class ImageError(Exception):
    """The image cannot be used; the message is the sample's error message (``failed_to_resize``),
    and ``original`` the image's (upright) size when it is known."""

    def __init__(
        self, message: str, original: tuple[int, int] | None = None, bucket: Bucket | None = None
    ) -> None:
        super().__init__(message)
        self.original = original
        self.bucket = bucket


@dataclass(frozen=True, slots=True)
class Geometry:
    """What to do to an image of a given size: resize to ``size`` (w, h), then pad or crop; or, for
    an image the bucket would have to upsample, ``refusal``, the sample's error message."""

    size: tuple[int, int] | None
    interpolation: int
    pad: tuple[int, int, int, int] | None  # top, bottom, left, right
    crop: tuple[int, int, int, int] | None  # x, y, width, height
    resizes: bool = True  # False when img2dataset skips its resize step (an unchanged size still counts)
    bucket: Bucket | None = None
    # Downscales are antialiased: a box average by a whole factor first, the interpolation for the rest.
    antialias: bool = False
    scale: float = 1.0  # of the resize, output / input
    refusal: str | None = None


def plan(width: int, height: int, s: ImageSettings, corner: int = 0) -> Geometry:
    """img2dataset's resize geometry (albumentations' Smallest/LongestMaxSize, PadIfNeeded, CenterCrop),
    or a bucket's (``corner``: the one bucket_crop="corner" keeps)."""
    side = s.image_size
    down, up = INTERPOLATION_FLAGS[s.downscale_interpolation], INTERPOLATION_FLAGS[s.upscale_interpolation]
    mode = s.resize_mode
    if mode == "bucket":
        return _bucket_plan(width, height, s, corner)
    if mode == "no":
        return Geometry(None, down, None, None, resizes=False)
    reference = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    downscale = reference > side
    if s.resize_only_if_bigger and not downscale:
        return Geometry(None, down, None, None, resizes=False)
    scale = side / reference
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    size = None if (new_w, new_h) == (width, height) else (new_w, new_h)
    w, h = size or (width, height)
    pad = crop = None
    if mode == "border":
        top, left = max(0, side - h) // 2, max(0, side - w) // 2
        pad = (top, max(0, side - h) - top, left, max(0, side - w) - left)
    elif mode == "center_crop":
        crop = ((w - side) // 2, (h - side) // 2, side, side)
    return Geometry(size, down if downscale else up, pad, crop)


def _bucket_plan(width: int, height: int, s: ImageSettings, corner: int) -> Geometry:
    """The nearest bucket's geometry: an antialiased bicubic resize that covers the bucket, then a
    crop to its size; refused when covering it would need upsampling."""
    bucket = nearest_bucket(width, height, s.bucket_base, s.bucket_divisible)
    scale = cover_scale(width, height, bucket)
    if scale > 1:
        refusal = (
            f"image of {width}x{height} is smaller than its bucket {bucket.id} "
            f"({bucket.width}x{bucket.height}): no upsampling in bucket mode"
        )
        return Geometry(None, cv2.INTER_CUBIC, None, None, bucket=bucket, refusal=refusal)
    size = cover_size(width, height, bucket)
    x, y = crop_origin(size, bucket, s.bucket_crop, corner)
    return Geometry(
        None if size == (width, height) else size,
        cv2.INTER_CUBIC,
        None,
        (x, y, bucket.width, bucket.height),
        bucket=bucket,
        antialias=True,
        scale=scale,
    )


# A bucket's JPEG keeps full-resolution chroma (4:4:4) when the resize scaled the image by this much or
# less, and subsamples it (4:2:0) above: the card's "adaptive_scale" rule. Nearly every source JPEG
# carries 4:2:0 chroma; scaled by s, it has 0.5 / s of the output's resolution, so from 0.85 down
# 4:2:0 would discard chroma the image has, while near 1:1 it discards nothing and saves bytes.
ADAPTIVE_SCALE_THRESHOLD = 0.85


def chroma_sampling(scale: float) -> int:
    """OpenCV's JPEG sampling factor for a bucket image resized by ``scale``."""
    if scale <= ADAPTIVE_SCALE_THRESHOLD:
        return int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444)
    return int(cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)


def bucket_corner(raw: bytes, s: ImageSettings) -> int:
    """The corner bucket_crop="corner" keeps for an image: one of bucket_corners, picked by the CRC-32
    of its bytes, so that the same image is always cropped alike."""
    if s.resize_mode != "bucket" or s.bucket_crop != "corner":
        return 0
    return s.bucket_corners[zlib.crc32(raw) % len(s.bucket_corners)]


def upright(header: ImageHeader) -> ImageHeader:
    """The header of the image once its EXIF orientation is applied (5 to 8 swap the sides)."""
    if header.orientation in (5, 6, 7, 8):
        return dataclasses.replace(header, width=header.height, height=header.width)
    return header


def orient(img: Image, orientation: int) -> Image:
    """The image as EXIF orientation ``orientation`` says it should be seen (PIL's exif_transpose)."""
    if orientation == 2:
        return cv2.flip(img, 1)
    if orientation == 3:
        return cv2.rotate(img, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(img, 0)
    if orientation == 5:
        return cv2.transpose(img)
    if orientation == 6:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(img), -1)
    if orientation == 8:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img


def jpeg_reduction(header: ImageHeader, geometry: Geometry, s: ImageSettings) -> int:
    """The largest libjpeg scale-down (8, 4, 2 or 1) that still leaves at least the target size.

    The exact reduced size counts, not the one libjpeg rounds up to: at 1/8, a 1018-pixel side is
    127.25 pixels of picture in 128 pixels of output, the last one mostly edge padding, too few for
    a 128-pixel target (26.6 dB against a full decode, where 1/4 gives 45)."""
    if not s.reduced_jpeg_decode or header.format != "jpeg" or geometry.size is None:
        return 1
    target_w, target_h = geometry.size
    for factor in (8, 4, 2):
        if header.width >= target_w * factor and header.height >= target_h * factor:
            return factor
    return 1


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    bucket: Bucket | None = None


class ImageProcessor:
    """Turns downloaded bytes into the encoded output image, or raises ImageError."""

    def __init__(self, settings: ImageSettings) -> None:
        self.settings = settings
        ext, flag = ENCODERS[settings.encode_format]
        self._ext = ext
        self._params = [int(flag), settings.encode_quality]

    def process(
        self, raw: bytes, header: ImageHeader | None = None, boxes: Boxes | None = None
    ) -> ProcessedImage:
        """The output image; ``boxes`` (relative ``[x_min, y_min, x_max, y_max]``) are blurred."""
        try:
            return self._process(raw, header, boxes)
        except cv2.error as err:  # e.g. a side over the encoder's limit (JPEG: 65535 pixels)
            raise ImageError(f"OpenCV error: {err.err}") from None

    def _process(self, raw: bytes, header: ImageHeader | None, boxes: Boxes | None) -> ProcessedImage:
        s = self.settings
        if not raw:  # an empty 200 response
            raise ImageError("Image decoding error")
        header = header if header is not None else probe(raw)
        if header is not None:
            orientation = header.orientation if s.transposes else 1
            header = upright(header) if orientation != 1 else header
            original = (header.width, header.height)
            self._check_pixels(*original)
            geometry = plan(*original, s, bucket_corner(raw, s))
            if geometry.refusal is not None:  # not decoded: the header says all there is to say
                self._filter(*original)
                raise ImageError(geometry.refusal, original, geometry.bucket)
            # Decoded even when a filter refuses it: img2dataset decodes first, so an image that is
            # both filtered and broken fails with "Image decoding error".
            img, rgb, scale = self._decode(raw, header, geometry)
            if orientation != 1:
                img = orient(img, orientation)
            self._filter(*original)
        else:
            # Unknown or malformed header: let OpenCV try (its own pixel limit still applies).
            img, rgb, scale = self._decode_unchanged(raw), False, 1
            original = (img.shape[1], img.shape[0])
            self._check_pixels(*original)
            self._filter(*original)
            geometry = plan(*original, s, bucket_corner(raw, s))
            if geometry.refusal is not None:
                raise ImageError(geometry.refusal, original, geometry.bucket)
        if self._keeps_bytes(header, geometry, img, boxes):
            return ProcessedImage(raw, original[0], original[1], *original)
        img = self._apply(img, geometry, original, scale, boxes)
        if rgb and img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)  # on the small image: cheaper than on the decoded one
        params = self._params
        if geometry.bucket is not None:
            if img.ndim == 2:  # buckets are RGB
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            if s.encode_format == "jpg":
                params = [*params, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, chroma_sampling(geometry.scale)]
        ok, encoded = cv2.imencode(self._ext, img, params)
        if not ok:
            raise ImageError("Image encoding error")
        data = encoded.tobytes()
        return ProcessedImage(data, img.shape[1], img.shape[0], *original, bucket=geometry.bucket)

    def _keeps_bytes(
        self, header: ImageHeader | None, geometry: Geometry, img: Image, boxes: Boxes | None
    ) -> bool:
        """``skip_reencode``: the downloaded bytes are the output when nothing changes the pixels.

        As in img2dataset: no resize step, no alpha to composite, already in ``encode_format``.
        Unlike img2dataset, an image with boxes to blur is always re-encoded (img2dataset keeps
        the unblurred original in that case)."""
        if not self.settings.skip_reencode or header is None or geometry.bucket is not None:
            return False
        has_alpha = img.ndim == 3 and img.shape[2] in (2, 4)
        return (
            not geometry.resizes
            and not has_alpha
            and not boxes
            and header.format == _HEADER_FORMATS[self.settings.encode_format]
        )

    def _check_pixels(self, width: int, height: int) -> None:
        """The decompression-bomb guard, applied to the header's size before anything is decoded."""
        s = self.settings
        if width * height > s.max_decoded_pixels:
            raise ImageError(
                f"image of {width}x{height} pixels is over the max_decoded_pixels limit "
                f"({s.max_decoded_pixels})"
            )

    def _filter(self, width: int, height: int) -> None:
        """img2dataset's filters and messages, in its order."""
        s = self.settings
        if min(width, height) < s.min_image_size:
            raise ImageError("image too small")
        if s.max_image_area is not None and width * height > s.max_image_area:
            raise ImageError("image area too large")
        if s.max_aspect_ratio is not None and max(width, height) / min(width, height) > s.max_aspect_ratio:
            raise ImageError("aspect ratio too large")

    def _decode(self, raw: bytes, header: ImageHeader, geometry: Geometry) -> tuple[Image, bool, int]:
        """The decoded image, whether its colour channels are in RGB (not BGR) order, and the scale
        it was decoded at (2 for half the original's width and height)."""
        if header.format == "png":
            png_img, rgb = self._decode_png(raw)
            return png_img, rgb, 1
        if header.format != "jpeg":
            return self._decode_unchanged(raw), False, 1
        factor = jpeg_reduction(header, geometry, self.settings)
        # EXIF orientation is ignored, as img2dataset's IMREAD_UNCHANGED decode does.
        flags = _REDUCED_FLAGS[(factor, header.channels == 1)] | cv2.IMREAD_IGNORE_ORIENTATION
        img = None
        if factor == 8 and header.progressive:
            lighter = jpeg.dc_only(raw)  # the same pixels from a third of the bytes (see jpeg.py)
            if lighter is not None:
                img = cv2.imdecode(np.frombuffer(lighter, np.uint8), flags)
        if img is None:
            img = cv2.imdecode(np.frombuffer(raw, np.uint8), flags)
        if img is None:
            raise ImageError("Image decoding error")
        return img, False, factor

    def _decode_png(self, raw: bytes) -> tuple[Image, bool]:
        # imagecodecs' libpng build decodes faster than OpenCV's and releases the GIL; the pixels are
        # identical (checked on the benchmark corpus). It gives RGB(A) order. The image data is
        # inflated by libdeflate first (see png.py), faster than zlib (README, "Speed").
        try:
            img = imagecodecs.png_decode(png.restored(raw) or raw)
        except (imagecodecs.PngError, ValueError, RuntimeError):
            # OpenCV has the last word on a PNG libpng refused: the verdict stays img2dataset's.
            return self._decode_unchanged(raw), False
        return _as_8bit(img), True

    def _decode_unchanged(self, raw: bytes) -> Image:
        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None or img.size == 0:
            raise ImageError("Image decoding error")
        return _as_8bit(img)

    def _apply(
        self, img: Image, geometry: Geometry, original: tuple[int, int], scale: int, boxes: Boxes | None
    ) -> Image:
        # Alpha is composited on white after resizing, on premultiplied colours: resizing is linear,
        # so this equals img2dataset's composite-then-resize (to rounding) while the compositing
        # runs on the small image instead of the full-size one.
        has_alpha = img.ndim == 3 and img.shape[2] in (2, 4)
        if has_alpha:
            img = _premultiply(img)
        if geometry.size is not None and (img.shape[1], img.shape[0]) != geometry.size:
            img = _resize(img, geometry, original, scale, self.settings.reduced_jpeg_decode)
        if has_alpha:
            img = _over_white(img)
        if boxes:
            # img2dataset blurs after scaling and before padding or cropping.
            img = blur_boxes(img, boxes)
        if geometry.pad is not None and any(geometry.pad):
            img = cv2.copyMakeBorder(img, *geometry.pad, cv2.BORDER_CONSTANT, value=WHITE)
        if geometry.crop is not None:
            x, y, w, h = geometry.crop
            img = img[y : y + h, x : x + w]
        return img


def _resize(img: Image, geometry: Geometry, original: tuple[int, int], scale: int, reduce: bool) -> Image:
    """``img``, an image of ``original`` size decoded at 1/``scale``, resized to ``geometry.size``.

    With ``reduce`` (``reduced_jpeg_decode``), a downscale of 2x or more is done in two steps. First
    an exact average of k x k blocks, for the largest whole k that leaves at least the target size:
    OpenCV's area resize has a fast path for whole factors, several times faster than for fractional
    ones. libjpeg's DCT scaling did that step already for a reduced JPEG. What is left is under 2x,
    where bilinear interpolation barely aliases and costs a fraction of an area resize by a
    fractional factor. Both steps keep the exact scale of the original to the target: a reduced
    image's rounded-up size (a 1001-pixel side at 1/4 is 251 pixels, not 250.25) would otherwise
    stretch the picture by up to a pixel across the output. The README ("Speed") has the costs and
    the PSNR against a full-size decode and area resize. Without ``reduce``, the whole image is
    resized in one step as img2dataset does.
    """
    assert geometry.size is not None
    width, height = geometry.size
    interpolation = geometry.interpolation
    if geometry.antialias:
        # A bucket's bicubic downscale, antialiased as PIL's is: a box average by the largest whole
        # factor, then bicubic for what is left (under 2x, where it barely aliases).
        factor = min(img.shape[1] // width, img.shape[0] // height)
        if factor >= 2:
            img = cv2.resize(img, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
            scale *= factor
    elif reduce and interpolation == cv2.INTER_AREA:
        factor = min(img.shape[1] // width, img.shape[0] // height)
        if factor >= 2:
            # fx and fy of exactly 1/factor take the fast path; a partial block at the right or
            # bottom edge is the average of the pixels it has.
            img = cv2.resize(img, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
            scale *= factor
        if scale > 1 and img.shape[1] < 2 * width and img.shape[0] < 2 * height:
            interpolation = cv2.INTER_LINEAR
    if scale == 1:
        return cv2.resize(img, geometry.size, interpolation=interpolation)
    # Scale factors given, not the output size: OpenCV then maps pixel centres with exactly these
    # factors, and rounds the output size, which may come out a row or column over the target.
    out = cv2.resize(
        img,
        None,
        fx=width * scale / original[0],
        fy=height * scale / original[1],
        interpolation=interpolation,
    )
    if out.shape[1] < width or out.shape[0] < height:  # an edge case of the rounding: resize to fit
        return cv2.resize(img, geometry.size, interpolation=interpolation)
    return out[:height, :width]


def parse_boxes(value: Any) -> Boxes | None:
    """bbox_col's value as a list of 4-float boxes: a list (parquet, JSON) or its JSON text (CSV)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ImageError(f"bbox_col: {value[:80]!r} is not a list of boxes") from None
    try:
        boxes = [[float(v) for v in box] for box in value]
    except (TypeError, ValueError):
        raise ImageError(f"bbox_col: {str(value)[:80]} is not a list of [x0, y0, x1, y1] boxes") from None
    for box in boxes:
        if len(box) != 4:
            raise ImageError(f"bbox_col: a box is [x_min, y_min, x_max, y_max], got {box}")
    return boxes


def blur_boxes(img: Image, boxes: Boxes) -> Image:
    """Blur the boxes (relative ``[x_min, y_min, x_max, y_max]``) as img2dataset's blurrer does.

    Each box grows by a tenth of its longest side on every side; the image is Gaussian-blurred with a
    kernel of ``2 * ceil(sigma) + 1`` pixels (at least 3) for ``sigma`` a tenth of the longest box
    side, OpenCV deriving the kernel's own sigma from its size as albumentations' GaussianBlur lets
    it; the box mask is blurred alike and blends the blurred image into the original, so edges are
    soft (ImageNet face obfuscation's recipe)."""
    height, width = img.shape[:2]
    values = img.astype(np.float32) / 255.0
    mask = np.zeros_like(values)
    longest = 0
    for box in boxes:
        x0, y0, x1, y1 = int(box[0] * width), int(box[1] * height), int(box[2] * width), int(box[3] * height)
        side = max(x1 - x0, y1 - y0)
        longest = max(longest, side)
        grow = 0.1 * side
        x0, y0 = int(np.clip(int(x0 - grow), 0, width - 1)), int(np.clip(int(y0 - grow), 0, height - 1))
        x1, y1 = int(np.clip(int(x1 + grow), 0, width - 1)), int(np.clip(int(y1 + grow), 0, height - 1))
        mask[y0:y1, x0:x1, ...] = 1
    kernel = max(3, int(2 * math.ceil(0.1 * longest) + 1))
    kernel += 1 - kernel % 2
    blurred = cv2.GaussianBlur(values, (kernel, kernel), 0)
    blurred_mask = cv2.GaussianBlur(mask, (kernel, kernel), 0)
    out: Image = ((values * (1 - blurred_mask) + blurred * blurred_mask) * 255.0).astype(np.uint8)
    return out


def _as_8bit(img: Image) -> Image:
    """8 bits per sample, deeper samples scaled down; gray, gray+alpha, BGR or BGRA."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    return img


def _premultiply(img: Image) -> Image:
    """Colour channels multiplied by alpha / 255 (alpha, the last channel, unchanged)."""
    if img.shape[2] == 4:
        out: Image = cv2.cvtColor(img, cv2.COLOR_RGBA2mRGBA)  # any channel order, alpha last; SIMD
        return out
    gray, alpha = img[..., 0].astype(np.uint16), img[..., 1]
    return np.dstack([((gray * alpha + 127) // 255).astype(np.uint8), alpha])


def _over_white(premultiplied: Image) -> Image:
    """Premultiplied colour over a white background: ``colour * a + 255 * (1 - a)``."""
    color = premultiplied[..., :-1].astype(np.uint16)
    out: Image = np.minimum(color + (255 - premultiplied[..., -1:]), 255).astype(np.uint8)
    return out if out.shape[2] > 1 else out[..., 0]


def exif_json(raw: bytes, header: ImageHeader | None) -> str | None:
    """EXIF tags as img2dataset stores them: JSON of tag name -> stripped string, or None if the
    EXIF block cannot be parsed. Files with no EXIF block skip the (pure Python) parser."""
    if header is not None and not header.has_exif:
        return "{}"
    try:
        tags = exifread.process_file(io.BytesIO(raw), details=False)
    # The parser reads untrusted bytes and raises anything from IndexError to struct.error; a bad
    # EXIF block must not fail the sample, so it is recorded as absent, as img2dataset does.
    except Exception:
        return None
    return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})


def digest(raw: bytes, hash_type: str) -> str:
    return hashlib.new(hash_type, raw).hexdigest()
