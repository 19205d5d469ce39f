"""A deterministic, web-like image corpus made from real photographs, and URL lists that point at it.

The photos are the public-domain / CC0 samples that scikit-image ships inside its package (see
``PHOTOS`` for each one's licence as its docstring states it); nothing is downloaded and nothing is
synthetic: every image is a seeded random crop of one of those photos, resized to a web-like size
(``cv2.INTER_CUBIC`` when enlarging, ``cv2.INTER_AREA`` when shrinking) and encoded the way web
images are. scikit-image is not a dependency of the project::

    /work/main/.venv/bin/pip install scikit-image
    python -m benchmarks.corpus build --out benchmarks/.corpus --count 5000 --seed 0
    python -m benchmarks.corpus urls --corpus benchmarks/.corpus --base http://127.0.0.1:8080 \\
        --count 50000 --out urls.parquet          # or --format txt
    python -m benchmarks.corpus stats --corpus benchmarks/.corpus

What a corpus holds (shares of all entries; the image formats are shares of the good images):

- 90% good images. Profile "mixed" (the default): 75% JPEG (quality 70-95, 20% progressive, 30%
  Huffman-optimised, some 4:4:4, 30% with a camera-like EXIF block, most of those with a thumbnail),
  4% grayscale JPEG, 7% PNG RGB, 5% PNG with a real alpha channel (a feathered cut-out of the subject,
  a soft oval, or a fade), 9% lossy WebP. Profile "jpeg-heavy" (``--profile jpeg-heavy``): 85% JPEG,
  4% grayscale, 3% PNG, 2% PNG with alpha, 6% WebP.
- Sizes: 5% tiny (sides 16-150 px), 80% with sides 300-1200 px, 15% up to 3000 px on the long side;
  aspect ratios 4:3, 3:2, 1:1, 16:9 (landscape and portrait) and 2:1-4:1 panoramas.
- 10% faults: 3% URLs of files that do not exist (404), 2.5% ``.jpg`` files whose body is an HTML page,
  2.5% truncated JPEGs (the first 40-80% of a real one), 2% good JPEGs under ``noai/``, which the
  benchmark server sends with ``X-Robots-Tag: noai``.

The sources are at most 1411 px (most are 300-640 px), so large images are enlarged crops: smoother than
camera photos of the same size, they compress to fewer bytes per pixel (``stats`` prints them), which
makes entropy decoding a little cheaper than on real web images of the same dimensions.

A URL list of ``count`` rows takes the corpus's entries in order (their order is already random) and,
past the corpus size, repeats them with ``?r=<n>``; the rows are then shuffled with ``--seed``.

Built here (2 cores, ``--count 5000 --seed 0``): 59 s, 843 MiB; the mean JPEG is 97 KiB for 0.92 MPix.

The same seed gives a byte-identical corpus (every random choice is drawn up front from one seeded
generator, and the encoders are deterministic), whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]  # 8-bit gray (h, w) or BGR (h, w, 3), as the engine's images.py

PIP_INSTALL = "/work/main/.venv/bin/pip install scikit-image"
CORPUS_FILE = "corpus.json"
# Only these are ever deleted when a corpus is rebuilt in place.
MANAGED = ("img", "noai", CORPUS_FILE)

GOOD_KINDS = ("jpeg", "gray", "png", "png-alpha", "webp")
FAULTS = ("404", "html", "truncated", "noai")


@dataclass(frozen=True, slots=True)
class Photo:
    caption: str
    weight: float  # how often it is picked, among the photos of its colour
    licence: str  # as the skimage.data function's docstring states it


# Only photos whose docstring states public domain, CC0 or no known copyright restrictions. Left out:
# the motorcycle stereo pair and moon (no licence stated), and the drawings, phantoms and masks.
COLOR_PHOTOS = {
    "astronaut": Photo("astronaut Eileen Collins in her flight suit", 3, "public domain"),
    "chelsea": Photo("Chelsea the tabby cat", 3, "CC0"),
    "coffee": Photo("a cup of coffee on a saucer", 3, "CC0"),
    "rocket": Photo("a Falcon 9 rocket on the launch pad", 3, "public domain"),
    "hubble_deep_field": Photo("galaxies of the Hubble deep field", 2, "public domain"),
    "immunohistochemistry": Photo(
        "an immunohistochemistry slide under the microscope", 1, "no known copyright"
    ),
    "retina": Photo("a fundus photograph of a human retina", 1, "CC0"),
}
GRAY_PHOTOS = {
    "camera": Photo("a photographer with a camera on a tripod", 2, "CC0"),
    "coins": Photo("old Greek coins", 1, "no known copyright"),
    "clock": Photo("a wall clock", 1, "public domain"),
    "cell": Photo("a cell under the microscope", 1, "CC0"),
    "brick": Photo("a brick wall", 1, "CC0"),
    "grass": Photo("a patch of grass", 1, "CC0"),
    "gravel": Photo("gravel on the ground", 1, "CC0"),
    "text": Photo("a page of printed text", 1, "no known copyright"),
}
PHOTOS = {**COLOR_PHOTOS, **GRAY_PHOTOS}
# Colour images are mostly colour photos; black-and-white photos saved as colour files exist too.
GRAY_SOURCE_IN_COLOR = 0.15

# Shares of the good images per format, by corpus profile. "mixed" gives PNG (which both tools must
# decode in full) 12% of the images and, being photographs, half of the CPU; "jpeg-heavy" is closer
# to image-text datasets of web photos, where nearly everything is JPEG.
PROFILES: dict[str, dict[str, float]] = {
    "mixed": {"jpeg": 0.75, "gray": 0.04, "png": 0.07, "png-alpha": 0.05, "webp": 0.09},
    "jpeg-heavy": {"jpeg": 0.85, "gray": 0.04, "png": 0.03, "png-alpha": 0.02, "webp": 0.06},
}
FAULT_SHARES = (("404", 0.03), ("html", 0.025), ("truncated", 0.025), ("noai", 0.02))


def kind_shares(profile: str) -> tuple[tuple[str, str | None, float], ...]:
    """(kind, fault, share of all entries); the good kinds share the 90% the faults leave."""
    good = 1 - sum(share for _, share in FAULT_SHARES)
    return (
        *((kind, None, good * share) for kind, share in PROFILES[profile].items()),
        *(("fault", fault, share) for fault, share in FAULT_SHARES),
    )


SIZE_BUCKETS = (("tiny", 0.05), ("main", 0.80), ("large", 0.15))
# (name, width / height, share); "pano" draws its ratio from 2:1 to 4:1.
ASPECTS = (
    ("4:3", 4 / 3, 0.22),
    ("3:4", 3 / 4, 0.08),
    ("3:2", 3 / 2, 0.18),
    ("2:3", 2 / 3, 0.07),
    ("1:1", 1.0, 0.20),
    ("16:9", 16 / 9, 0.15),
    ("9:16", 9 / 16, 0.04),
    ("pano", 0.0, 0.06),
)
CAPTIONS = (
    "{s}",
    "photo of {s}",
    "{s} - stock photo",
    "{s}, high resolution",
    "close-up of {s}",
    "{s} | wallpaper {w}x{h}",
    "{s} ({w} x {h})",
)
CAMERAS = (
    ("Canon", "Canon EOS 5D Mark IV", "Digital Photo Professional"),
    ("NIKON CORPORATION", "NIKON D750", "Ver.1.10"),
    ("SONY", "ILCE-7M3", "ILCE-7M3 v3.01"),
    ("Apple", "iPhone 12", "16.3.1"),
    ("samsung", "SM-G991B", "G991BXXU5CVLL"),
    ("FUJIFILM", "X-T3", "Adobe Photoshop Lightroom Classic 12.1 (Windows)"),
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One URL of the corpus; ``path`` is relative to the corpus folder (and to the server's root)."""

    path: str
    kind: str  # one of GOOD_KINDS, or "fault"
    format: str | None  # "jpeg" | "png" | "webp" | "html"; None for a 404
    width: int | None  # what the image's header says; None for 404 and HTML
    height: int | None
    fault: str | None = None  # one of FAULTS for kind "fault"
    bytes: int | None = None  # file size; None for a 404
    source: str | None = None  # the skimage.data photo it was cut from
    caption: str = ""
    quality: int | None = None  # JPEG/WebP quality, PNG compression level
    progressive: bool = False
    exif: bool = False

    @property
    def good(self) -> bool:
        """A decodable, allowed image: what a downloader should turn into a sample."""
        return self.kind != "fault"


@dataclass(frozen=True, slots=True)
class ExifSpec:
    make: str
    model: str
    software: str
    datetime: str
    exposure: tuple[int, int]
    fnumber: tuple[int, int]
    iso: int
    focal: tuple[int, int]
    thumbnail: bool


@dataclass(frozen=True, slots=True)
class Spec:
    """Every random choice for one entry, drawn up front so that rendering is a pure function."""

    path: str
    kind: str
    fault: str | None
    source: str
    caption: str
    width: int
    height: int
    crop: tuple[int, int, int, int]  # x, y, w, h in the source photo
    flip: bool
    quality: int
    progressive: bool = False
    optimize: bool = False
    subsampling_444: bool = False
    exif: ExifSpec | None = None
    alpha_style: str = ""
    alpha_params: tuple[float, ...] = ()
    zero_transparent: bool = False
    truncate_at: float = 1.0
    html_variant: int = 0


# --------------------------------------------------------------------------------------------------
# Planning: all randomness, in one process, in a fixed order


def _exact_counts(count: int, shares: Sequence[float]) -> list[int]:
    """Integer counts proportional to ``shares`` that add up to ``count`` (largest remainders)."""
    total = sum(shares)
    raw = [count * s / total for s in shares]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    return counts


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _target_size(rng: np.random.Generator, bucket: str) -> tuple[int, int]:
    _, ratio, _ = ASPECTS[int(rng.choice(len(ASPECTS), p=[a[2] for a in ASPECTS]))]
    if ratio == 0.0:
        ratio = float(rng.uniform(2.0, 4.0))
    stretch = max(ratio, 1 / ratio)
    if bucket == "tiny":
        long = int(rng.integers(16, 151))
    elif bucket == "main":
        long = int(rng.integers(max(300, math.ceil(300 * stretch)), 1201))
    else:
        long = int(rng.integers(1201, 3001))
    short = long / stretch
    if rng.random() < 0.3:  # user crops: web images are often a few percent off the nominal ratio
        short *= float(rng.uniform(0.93, 1.07))
    low = 16 if bucket == "tiny" else 300 if bucket == "main" else 1
    high = 150 if bucket == "tiny" else long
    short_px = min(high, max(low, round(short)))
    return (long, short_px) if ratio >= 1 else (short_px, long)


def _crop_box(
    rng: np.random.Generator, shape: tuple[int, ...], size: tuple[int, int], bucket: str
) -> tuple[int, int, int, int]:
    h0, w0 = shape[:2]
    ratio = size[0] / size[1]
    if w0 / h0 > ratio:
        cw, ch = h0 * ratio, float(h0)
    else:
        cw, ch = float(w0), w0 / ratio
    # Big targets take most of the photo so they are enlarged as little as possible.
    low = {"tiny": 0.3, "main": 0.5, "large": 0.85}[bucket]
    scale = float(rng.uniform(low, 1.0))
    cw_px = min(w0, max(4, round(cw * scale)))
    ch_px = min(h0, max(4, round(ch * scale)))
    x = int(rng.integers(0, w0 - cw_px + 1))
    y = int(rng.integers(0, h0 - ch_px + 1))
    return x, y, cw_px, ch_px


def _exif_spec(rng: np.random.Generator) -> ExifSpec:
    make, model, software = CAMERAS[int(rng.integers(len(CAMERAS)))]
    stamp = (
        f"{rng.integers(2012, 2025)}:{rng.integers(1, 13):02d}:{rng.integers(1, 29):02d} "
        f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d}"
    )
    return ExifSpec(
        make=make,
        model=model,
        software=software,
        datetime=stamp,
        exposure=(1, int(rng.choice([30, 60, 125, 250, 500, 1000, 2000]))),
        fnumber=(int(rng.choice([14, 18, 28, 40, 56, 80, 110])), 10),
        iso=int(rng.choice([100, 200, 400, 800, 1600, 3200])),
        focal=(int(rng.integers(24, 201)), 1),
        thumbnail=bool(rng.random() < 0.7),
    )


def plan(count: int, seed: int, shapes: dict[str, tuple[int, ...]], profile: str = "mixed") -> list[Spec]:
    """Draw every entry's kind, source, size, crop and encoding from one generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    shares = kind_shares(profile)
    counts = _exact_counts(count, [share for _, _, share in shares])
    kinds = [(kind, fault) for (kind, fault, _), n in zip(shares, counts, strict=True) for _ in range(n)]
    order = rng.permutation(len(kinds))
    color_weights = {name: p.weight for name, p in COLOR_PHOTOS.items()}
    gray_weights = {name: p.weight for name, p in GRAY_PHOTOS.items()}
    all_weights = {name: p.weight for name, p in PHOTOS.items()}
    specs = []
    for index, k in enumerate(order):
        kind, fault = kinds[int(k)]
        if kind == "gray":
            source = _pick(rng, all_weights)
        elif rng.random() < GRAY_SOURCE_IN_COLOR:
            source = _pick(rng, gray_weights)
        else:
            source = _pick(rng, color_weights)
        bucket = SIZE_BUCKETS[int(rng.choice(len(SIZE_BUCKETS), p=[b[1] for b in SIZE_BUCKETS]))][0]
        width, height = _target_size(rng, bucket)
        crop = _crop_box(rng, shapes[source], (width, height), bucket)
        caption = str(rng.choice(CAPTIONS)).format(s=PHOTOS[source].caption, w=width, h=height)
        fields: dict[str, Any] = {"flip": bool(rng.random() < 0.5)}
        as_jpeg = kind in ("jpeg", "gray") or fault in ("truncated", "noai")
        if as_jpeg:
            quality = int(rng.integers(70, 96))
            fields.update(
                quality=quality,
                progressive=bool(rng.random() < 0.2),
                optimize=bool(rng.random() < 0.3),
                subsampling_444=bool(kind != "gray" and quality >= 90 and rng.random() < 0.4),
            )
            if rng.random() < (0.1 if kind == "gray" else 0.3):
                fields["exif"] = _exif_spec(rng)
        elif kind in ("png", "png-alpha"):
            # zlib levels 1-6: the decoder's cost hardly depends on the level, while level 9 would take
            # most of the build's time (0.6 s to encode one 1000x750 photo, for 1% fewer bytes).
            fields["quality"] = int(rng.choice([1, 3, 6], p=[0.3, 0.5, 0.2]))
        else:
            fields["quality"] = int(rng.integers(60, 91))  # WebP, and unused for 404/HTML
        if kind == "png-alpha":
            style = str(rng.choice(["cutout", "oval", "fade"], p=[0.45, 0.35, 0.2]))
            fields.update(
                alpha_style=style,
                alpha_params=tuple(float(v) for v in rng.uniform(0, 1, 4)),
                zero_transparent=bool(rng.random() < 0.5),
            )
        if fault == "truncated":
            fields["truncate_at"] = float(rng.uniform(0.4, 0.8))
        if fault == "html":
            fields["html_variant"] = int(rng.integers(1_000_000))
        ext = {"png": "png", "png-alpha": "png", "webp": "webp"}.get(kind, "jpg")
        folder = "noai" if fault == "noai" else f"img/{index // 1000:03d}"
        specs.append(
            Spec(
                path=f"{folder}/{index:06d}.{ext}",
                kind=kind,
                fault=fault,
                source=source,
                caption=caption,
                width=width,
                height=height,
                crop=crop,
                **fields,
            )
        )
    return specs


# --------------------------------------------------------------------------------------------------
# Rendering: one pure function per entry, run in a process pool

_SOURCES: dict[str, Array] = {}


def load_photos() -> dict[str, Array]:
    """The photos, colour ones as BGR (OpenCV's order), grayscale ones as 2-D arrays."""
    import skimage.data

    photos = {}
    for name in PHOTOS:
        img: Array = np.ascontiguousarray(getattr(skimage.data, name)(), dtype=np.uint8)
        if img.ndim == 3:
            img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR)
        photos[name] = img
    return photos


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool's processes are the parallelism
    _SOURCES.update(load_photos())


def _photo(spec: Spec, channels: int) -> Array:
    src = _SOURCES[spec.source]
    x, y, w, h = spec.crop
    img = src[y : y + h, x : x + w]
    if spec.flip:
        img = img[:, ::-1]
    img = np.ascontiguousarray(img)
    if channels == 1 and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif channels == 3 and img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    size = (spec.width, spec.height)
    enlarge = spec.width * spec.height > w * h
    return cv2.resize(img, size, interpolation=cv2.INTER_CUBIC if enlarge else cv2.INTER_AREA)


def _alpha(img: Array, spec: Spec) -> Array:
    """A real transparency mask: a feathered cut-out of the subject, a soft oval, or a fade."""
    h, w = img.shape[:2]
    p = spec.alpha_params
    style = spec.alpha_style
    if style == "cutout":
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        blurred = cv2.GaussianBlur(gray, (0, 0), max(1.0, min(w, h) / 100))
        _, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # Product shots put the subject in the middle: whichever side of the threshold covers the
        # centre is kept.
        centre = mask[h // 3 : max(h // 3 + 1, 2 * h // 3), w // 3 : max(w // 3 + 1, 2 * w // 3)]
        if centre.mean() < 128:
            mask = cv2.bitwise_not(mask)
        k = max(3, (min(w, h) // 40) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
        alpha = cv2.GaussianBlur(mask, (0, 0), max(0.8, min(w, h) / 150))
        transparent = float((alpha < 255).mean())
        if 0.05 <= transparent <= 0.95:
            return alpha
        style = "oval"  # the threshold kept (almost) everything or nothing: no cut-out to make
    if style == "oval":
        alpha = np.zeros((h, w), np.uint8)
        axes = (max(1, round(w * (0.35 + 0.13 * p[0]))), max(1, round(h * (0.35 + 0.13 * p[1]))))
        cv2.ellipse(alpha, (w // 2, h // 2), axes, 0, 0, 360, 255, -1)
        return cv2.GaussianBlur(alpha, (0, 0), max(0.8, min(w, h) * (0.01 + 0.04 * p[2])))
    start, end = 80 * p[0], 200 + 55 * p[1]
    ramp = np.linspace(start, end, w if p[2] < 0.5 else h).round().astype(np.uint8)
    return np.ascontiguousarray(
        np.broadcast_to(ramp, (h, w)) if p[2] < 0.5 else np.repeat(ramp[:, None], w, 1)
    )


def _ifd(entries: list[tuple[int, int, int, bytes]], start: int, next_ifd: int) -> bytes:
    """A little-endian TIFF IFD at offset ``start``, its values longer than 4 bytes right after it."""
    entries = sorted(entries)
    data_at = start + 2 + 12 * len(entries) + 4
    head = [struct.pack("<H", len(entries))]
    data = []
    for tag, typ, count, value in entries:
        if len(value) <= 4:
            head.append(struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0"))
        else:
            head.append(struct.pack("<HHII", tag, typ, count, data_at))
            padded = value + b"\0" * (len(value) % 2)
            data.append(padded)
            data_at += len(padded)
    head.append(struct.pack("<I", next_ifd))
    return b"".join(head + data)


def _ifd_size(entries: list[tuple[int, int, int, bytes]]) -> int:
    return 2 + 12 * len(entries) + 4 + sum(len(v) + len(v) % 2 for *_, v in entries if len(v) > 4)


def _ascii(tag: int, text: str) -> tuple[int, int, int, bytes]:
    raw = text.encode() + b"\0"
    return (tag, 2, len(raw), raw)


def _short(tag: int, value: int) -> tuple[int, int, int, bytes]:
    return (tag, 3, 1, struct.pack("<H", value))


def _long(tag: int, value: int) -> tuple[int, int, int, bytes]:
    return (tag, 4, 1, struct.pack("<I", value))


def _rational(tag: int, value: tuple[int, int]) -> tuple[int, int, int, bytes]:
    return (tag, 5, 1, struct.pack("<II", *value))


def _exif_segment(exif: ExifSpec, img: Array, width: int, height: int) -> bytes:
    """An APP1 EXIF segment laid out as cameras write it: IFD0, the Exif IFD, and IFD1 + thumbnail."""
    thumb = b""
    if exif.thumbnail:
        scale = 160 / max(width, height)
        small = cv2.resize(
            img, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
        thumb = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])[1].tobytes()
    sub = [
        _rational(0x829A, exif.exposure),
        _rational(0x829D, exif.fnumber),
        _short(0x8827, exif.iso),
        (0x9000, 7, 4, b"0232"),
        _ascii(0x9003, exif.datetime),
        _ascii(0x9004, exif.datetime),
        _rational(0x920A, exif.focal),
        _short(0xA001, 1),
        _long(0xA002, width),
        _long(0xA003, height),
    ]
    ifd0 = [
        _ascii(0x010F, exif.make),
        _ascii(0x0110, exif.model),
        _short(0x0112, 1),  # upright: the downloader ignores orientation, as img2dataset does
        _rational(0x011A, (72, 1)),
        _rational(0x011B, (72, 1)),
        _short(0x0128, 2),
        _ascii(0x0131, exif.software),
        _ascii(0x0132, exif.datetime),
        _long(0x8769, 0),  # placeholder, sized like the real pointer
    ]
    ifd1 = [
        _short(0x0103, 6),
        _long(0x0201, 0),
        _long(0x0202, len(thumb)),
        _rational(0x011A, (72, 1)),
        _rational(0x011B, (72, 1)),
        _short(0x0128, 2),
    ]
    sub_at = 8 + _ifd_size(ifd0)
    ifd1_at = sub_at + _ifd_size(sub)
    thumb_at = ifd1_at + _ifd_size(ifd1)
    ifd0[-1] = _long(0x8769, sub_at)
    ifd1[1] = _long(0x0201, thumb_at)
    tiff = b"II*\0" + struct.pack("<I", 8) + _ifd(ifd0, 8, ifd1_at if thumb else 0) + _ifd(sub, sub_at, 0)
    if thumb:
        tiff += _ifd(ifd1, ifd1_at, 0) + thumb
    payload = b"Exif\0\0" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _jpeg(spec: Spec, img: Array) -> bytes:
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        spec.quality,
        cv2.IMWRITE_JPEG_PROGRESSIVE,
        int(spec.progressive),
        cv2.IMWRITE_JPEG_OPTIMIZE,
        int(spec.optimize),
    ]
    if img.ndim == 3:
        sampling = (
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444
            if spec.subsampling_444
            else cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420
        )
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    data = cv2.imencode(".jpg", img, params)[1].tobytes()
    if spec.exif is not None:
        # After the JFIF APP0 segment that libjpeg writes first.
        at = 4 + struct.unpack(">H", data[4:6])[0] if data[2:4] == b"\xff\xe0" else 2
        data = data[:at] + _exif_segment(spec.exif, img, spec.width, spec.height) + data[at:]
    return data


_HTML_PAGES = (
    (
        "Page not found",
        "<h1>Oops! That page can&rsquo;t be found.</h1><p>It looks like nothing was found at this "
        "location. Maybe try one of the links below or a search?</p>",
    ),
    (
        "Just a moment...",
        "<h1>Checking your browser before accessing the site.</h1><p>This process is automatic. Your "
        "browser will redirect to your requested content shortly.</p><noscript>Please enable "
        "JavaScript and cookies to continue.</noscript>",
    ),
    (
        "Sign in",
        '<form method="post" action="/login"><label>Email <input name="email"></label><label>Password '
        '<input type="password" name="password"></label><button>Sign in</button></form>',
    ),
    (
        "Hotlinking not allowed",
        "<h1>403 - Hotlinking not allowed</h1><p>Images on this site may not be embedded on other "
        "sites. Please visit our gallery to see the full picture.</p>",
    ),
)


def _html(spec: Spec) -> bytes:
    variant = spec.html_variant
    title, body = _HTML_PAGES[variant % len(_HTML_PAGES)]
    links = "".join(
        f'<li><a href="/category/{(variant >> 3) % 97 + i}/">Category {(variant >> 3) % 97 + i}</a></li>'
        for i in range(10 + variant % 40)
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="stylesheet" href="/static/site.{variant:06x}.css"></head>\n'
        f"<body><header><nav><ul>{links}</ul></nav></header>\n<main>{body}</main>\n"
        f"<footer>&copy; 2024 Example Media. Request id {variant:08x}.</footer>"
        f'<script src="/static/app.{variant:06x}.js" async></script></body></html>\n'
    )
    return page.encode()


def render(spec: Spec, out: Path) -> Entry:
    """Write one entry's file under ``out`` (nothing for a 404) and describe it."""
    entry: dict[str, Any] = {
        "path": spec.path,
        "kind": spec.kind,
        "fault": spec.fault,
        "source": spec.source,
        "caption": spec.caption,
    }
    data: bytes | None
    if spec.fault == "404":
        data = None
        entry.update(format=None, width=None, height=None)
    elif spec.fault == "html":
        data = _html(spec)
        entry.update(format="html", width=None, height=None)
    else:
        img = _photo(spec, 1 if spec.kind == "gray" else 3)
        entry.update(width=spec.width, height=spec.height, quality=spec.quality)
        if spec.kind == "png":
            data = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, spec.quality])[1].tobytes()
            entry["format"] = "png"
        elif spec.kind == "png-alpha":
            alpha = _alpha(img, spec)
            if spec.zero_transparent:  # some tools blank what cannot be seen, others keep it
                img = cv2.bitwise_and(img, img, mask=(alpha > 0).astype(np.uint8))
            bgra = cv2.merge([*cv2.split(img), alpha])
            data = cv2.imencode(".png", bgra, [cv2.IMWRITE_PNG_COMPRESSION, spec.quality])[1].tobytes()
            entry["format"] = "png"
        elif spec.kind == "webp":
            data = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, spec.quality])[1].tobytes()
            entry["format"] = "webp"
        else:
            data = _jpeg(spec, img)
            entry.update(format="jpeg", progressive=spec.progressive, exif=spec.exif is not None)
            if spec.fault == "truncated":
                data = data[: round(len(data) * spec.truncate_at)]
    if data is not None:
        target = out / spec.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entry["bytes"] = len(data)
    return Entry(**entry)


def _render_job(job: tuple[Spec, str]) -> Entry:
    return render(job[0], Path(job[1]))


# --------------------------------------------------------------------------------------------------
# Library functions for the other benchmark scripts


def corpus_dir(path: str | os.PathLike[str]) -> Path:
    """The corpus folder, given the folder or its corpus.json."""
    p = Path(path)
    return p.parent if p.name == CORPUS_FILE else p


def load_corpus(path: str | os.PathLike[str]) -> list[Entry]:
    """The entries of a built corpus (``path`` is its folder or its corpus.json)."""
    raw = json.loads((corpus_dir(path) / CORPUS_FILE).read_text())
    return [Entry(**item) for item in raw]


def url_rows(entries: Sequence[Entry], base: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Exactly ``count`` unique (url, caption) rows in a seeded shuffled order.

    Past the corpus size the entries repeat with ``?r=<n>`` appended (the server ignores query strings,
    a downloader sees distinct URLs), so a list can be much longer than the corpus.
    """
    if not entries:
        raise ValueError("the corpus has no entries")
    base = base.rstrip("/")
    order = np.random.default_rng(seed).permutation(count)
    rows = []
    for n in order:
        rep, i = divmod(int(n), len(entries))
        entry = entries[i]
        rows.append((f"{base}/{entry.path}" + (f"?r={rep}" if rep else ""), entry.caption))
    return rows


def write_url_list(
    entries: Sequence[Entry],
    base: str,
    count: int,
    out: str | os.PathLike[str],
    *,
    fmt: str = "parquet",
    seed: int = 0,
) -> Path:
    """Write ``url_rows`` as parquet (columns ``url``, ``caption``) or txt (one URL a line)."""
    rows = url_rows(entries, base, count, seed)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        target.write_text("".join(f"{url}\n" for url, _ in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]})
        pq.write_table(table, target)
    else:
        raise ValueError(f"unknown url list format {fmt!r} (parquet or txt)")
    return target


def size_bucket(entry: Entry) -> str:
    if entry.width is None or entry.height is None:
        return "n/a"
    long = max(entry.width, entry.height)
    return "tiny" if long <= 150 else "main" if long <= 1200 else "large"


def summarize(entries: Sequence[Entry]) -> dict[str, Any]:
    """Counts per kind, format, fault and size bucket, and bytes on disk."""
    good = [e for e in entries if e.good]
    per_kind: dict[str, dict[str, float]] = {}
    for kind in GOOD_KINDS:
        items = [e for e in good if e.kind == kind]
        pixels = sum((e.width or 0) * (e.height or 0) for e in items)
        size = sum(e.bytes or 0 for e in items)
        per_kind[kind] = {
            "count": len(items),
            "bytes": size,
            "mean_kib": round(size / len(items) / 1024, 1) if items else 0.0,
            "mean_mpix": round(pixels / len(items) / 1e6, 3) if items else 0.0,
            "bits_per_pixel": round(8 * size / pixels, 2) if pixels else 0.0,
        }
    return {
        "entries": len(entries),
        "good": len(good),
        "kind": dict(sorted(Counter(e.kind for e in entries).items())),
        "format": dict(sorted(Counter(str(e.format) for e in entries).items())),
        "fault": dict(sorted(Counter(e.fault for e in entries if e.fault).items())),
        "size_bucket_good": dict(sorted(Counter(size_bucket(e) for e in good).items())),
        "jpeg_progressive": sum(e.progressive for e in good),
        "jpeg_exif": sum(e.exif for e in good),
        "bytes_on_disk": sum(e.bytes or 0 for e in entries),
        "per_kind": per_kind,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    for key in ("entries", "good", "kind", "format", "fault", "size_bucket_good"):
        print(f"{key:>17}: {summary[key]}")
    print(f"{'jpeg progressive':>17}: {summary['jpeg_progressive']}  with EXIF: {summary['jpeg_exif']}")
    print(f"{'bytes on disk':>17}: {summary['bytes_on_disk'] / 2**20:.1f} MiB")
    print(f"{'':>17}  {'count':>6} {'mean KiB':>9} {'mean MPix':>10} {'bits/px':>8}")
    for kind, row in summary["per_kind"].items():
        print(
            f"{kind:>17}: {row['count']:>6} {row['mean_kib']:>9} {row['mean_mpix']:>10} "
            f"{row['bits_per_pixel']:>8}"
        )


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, to check that two builds are identical."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Command line


def build(out: Path, count: int, seed: int, jobs: int, profile: str = "mixed") -> list[Entry]:
    """Plan and render a corpus of ``count`` entries into ``out``, replacing a corpus already there."""
    if out.exists() and any(out.iterdir()) and not (out / CORPUS_FILE).exists():
        raise SystemExit(f"{out} is not empty and holds no {CORPUS_FILE}: refusing to write into it")
    for name in MANAGED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    shapes = {name: img.shape for name, img in load_photos().items()}
    specs = plan(count, seed, shapes, profile)
    # Biggest first, so that no worker is left with a 3000 px PNG at the end.
    by_cost = sorted(range(len(specs)), key=lambda i: -specs[i].width * specs[i].height)
    entries: list[Entry | None] = [None] * len(specs)
    # Spawned, not forked: a child forked after OpenCV ran in this process can deadlock on the state
    # of OpenCV's thread pool that it inherits.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker) as pool:
        jobs_in_order = [(specs[i], str(out)) for i in by_cost]
        for i, entry in zip(by_cost, pool.map(_render_job, jobs_in_order, chunksize=4), strict=True):
            entries[i] = entry
    done = [e for e in entries if e is not None]
    text = json.dumps([dataclasses.asdict(e) for e in done], indent=1)
    (out / CORPUS_FILE).write_text(text + "\n")
    return done


def _require_skimage() -> None:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        print("scikit-image is needed to build the corpus (it ships the photos). Install it with:")
        print(f"    {PIP_INSTALL}")
        raise SystemExit(2) from None


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="render a corpus")
    b.add_argument("--out", type=Path, default=Path("benchmarks/.corpus"))
    b.add_argument("--count", type=int, default=5000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    b.add_argument("--digest", action="store_true", help="print a sha256 of the whole tree")
    b.add_argument("--profile", choices=sorted(PROFILES), default="mixed", help="the mix of image formats")
    u = sub.add_parser("urls", help="write a URL list for a served corpus")
    u.add_argument("--corpus", type=Path, default=Path("benchmarks/.corpus"))
    u.add_argument("--base", required=True, help="the server's base URL, e.g. http://127.0.0.1:8080")
    u.add_argument("--count", type=int, required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--format", choices=("parquet", "txt"), default="parquet")
    u.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("stats", help="print a built corpus's statistics")
    s.add_argument("--corpus", type=Path, default=Path("benchmarks/.corpus"))
    s.add_argument("--json", action="store_true", help="print them as JSON")
    args = parser.parse_args(None if argv is None else list(argv))

    if args.command == "build":
        _require_skimage()
        started = time.perf_counter()
        entries = build(args.out, args.count, args.seed, args.jobs, args.profile)
        elapsed = time.perf_counter() - started
        _print_summary(summarize(entries))
        print(f"built {len(entries)} entries in {args.out} in {elapsed:.1f} s with {args.jobs} processes")
        if args.digest:
            print(f"tree sha256: {tree_digest(args.out)}")
    elif args.command == "urls":
        entries = load_corpus(args.corpus)
        target = write_url_list(entries, args.base, args.count, args.out, fmt=args.format, seed=args.seed)
        print(f"wrote {args.count} URLs ({len(entries)} distinct files) to {target}")
    else:
        summary = summarize(load_corpus(args.corpus))
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
