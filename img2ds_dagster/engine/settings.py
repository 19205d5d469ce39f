"""Typed download settings, one frozen dataclass per stage, with img2dataset 1.47's defaults.

A table's settings are fixed when the table is staged and saved next to its shards as JSON, so every
shard of a table (and every retry or backfill of it) is built with the same settings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..errors import ConfigError

# The allowed values of each option with a fixed set: the engine's checks, the Dagster config (an
# enum in the launchpad), the command line and mypy all read these.
ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop", "bucket"]
BucketCrop = Literal["center", "corner"]
Interpolation = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]
EncodeFormat = Literal["jpg", "png", "webp"]
OutputFormat = Literal["files", "webdataset", "parquet", "tfrecord", "dummy"]
HashType = Literal["md5", "sha256", "sha512"]
# Where shards are built (distribute.py); img2dataset's three names.
DistributorName = Literal["multiprocessing", "ray", "pyspark"]
RESIZE_MODES: tuple[ResizeMode, ...] = get_args(ResizeMode)
BUCKET_CROPS: tuple[BucketCrop, ...] = get_args(BucketCrop)
INTERPOLATIONS: tuple[Interpolation, ...] = get_args(Interpolation)
ENCODE_FORMATS: tuple[EncodeFormat, ...] = get_args(EncodeFormat)
OUTPUT_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
HASH_TYPES: tuple[HashType, ...] = get_args(HashType)
DISTRIBUTORS: tuple[DistributorName, ...] = get_args(DistributorName)
# img2dataset's four, and noml (the opt-out some sites send for machine learning in particular).
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex", "noml")

# Column names img2dataset reserves for its own metadata.
RESERVED_COLUMNS = frozenset(
    {"key", "caption", "url", "width", "height", "original_width", "original_height"}
    | {"status", "error_message", "exif", *HASH_TYPES}
    | {"bucket_id", "target_width", "target_height"}  # resize_mode="bucket"'s
)


def _require(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{option}: {message}")


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """How a URL file is read and cut into shards."""

    input_format: str | None = None  # None: taken from the file's extension
    url_col: str = "url"
    caption_col: str | None = None
    save_additional_columns: tuple[str, ...] = ()
    number_sample_per_shard: int = 10000
    # Boxes to blur, [[x_min, y_min, x_max, y_max], ...] relative to the image; saved as an extra column.
    bbox_col: str | None = None
    # verify_hash=[column, hash type]: the column is read under the hash type's name.
    verify_hash_col: str | None = None
    verify_hash_type: HashType | None = None

    def __post_init__(self) -> None:
        _require(self.number_sample_per_shard >= 1, "number_sample_per_shard", "must be at least 1")
        _require(bool(self.url_col), "url_col", "must be a column name")
        reserved = sorted(RESERVED_COLUMNS.intersection(self.save_additional_columns))
        _require(
            not reserved,
            "save_additional_columns",
            f"{reserved} are written by the downloader itself and cannot be copied from the input",
        )
        _require(
            self.bbox_col is None or self.bbox_col not in RESERVED_COLUMNS,
            "bbox_col",
            f"{self.bbox_col!r} is a column the downloader writes itself",
        )
        _require(
            (self.verify_hash_col is None) == (self.verify_hash_type is None),
            "verify_hash",
            "must be [column, hash type]",
        )
        _require(
            self.verify_hash_type is None or self.verify_hash_type in HASH_TYPES,
            "verify_hash",
            f"the hash type {self.verify_hash_type!r} is not one of {list(HASH_TYPES)}",
        )

    @property
    def extra_columns(self) -> list[str]:
        """Input columns copied to the metadata as they are: save_additional_columns, then bbox_col."""
        extras = [*self.save_additional_columns]
        if self.bbox_col is not None and self.bbox_col not in extras:
            extras.append(self.bbox_col)
        return extras

    @property
    def input_columns(self) -> list[str]:
        """Source column names to read, in img2dataset's metadata order: extras, caption, the hash
        to verify, url."""
        names = self.extra_columns
        if self.caption_col is not None:
            names.append(self.caption_col)
        if self.verify_hash_col is not None:
            names.append(self.verify_hash_col)
        return [*names, self.url_col]

    @property
    def renames(self) -> dict[str, str]:
        """Input column name -> staged name: ``url``, ``caption`` and the verified hash's type."""
        renames = {self.url_col: "url"}
        if self.caption_col is not None:
            renames[self.caption_col] = "caption"
        if self.verify_hash_col is not None and self.verify_hash_type is not None:
            renames[self.verify_hash_col] = self.verify_hash_type
        return renames


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """How one URL is downloaded."""

    timeout: float = 10.0  # seconds for one whole attempt: connect, headers and body
    retries: int = 0
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_DIRECTIVES
    max_download_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 10
    ignore_ssl_certificate: bool = False  # accept any certificate on https URLs
    # Every download through this proxy (http://host:port); None: HTTP(S)_PROXY and NO_PROXY, if set.
    proxy: str | None = None
    # The address guard (guard.py): networks exempt from it, and networks refused as well.
    allowed_networks: tuple[str, ...] = ()
    blocked_networks: tuple[str, ...] = ()
    # The User-Agent whole; None: img2ds_dagster/<version> with the token and the contact below.
    user_agent: str | None = None
    user_agent_contact: str | None = None  # a URL or mailto: where site owners can reach you
    # Site owners' signals (polite.py): robots.txt with its AI-usage lines, TDMRep's
    # tdm-reservation header, aipref's Content-Usage header, the XMP DataMining field of the image.
    respect_robots_txt: bool = True
    respect_tdm_reservation: bool = True
    respect_content_usage: bool = True
    respect_xmp_data_mining: bool = True

    def __post_init__(self) -> None:
        _require(self.timeout > 0, "timeout", "must be a positive number of seconds")
        _require(
            self.proxy is None or self.proxy.startswith("http://"),
            "proxy",
            f"{self.proxy!r} is not an http:// URL (https:// proxies are not supported)",
        )
        for option in ("allowed_networks", "blocked_networks"):
            for value in getattr(self, option):
                try:
                    ipaddress.ip_network(value, strict=False)
                except ValueError as err:
                    raise ConfigError(f"{option}: {err}") from None
        _require(self.retries >= 0, "retries", "must be 0 or more")
        _require(self.max_download_bytes > 0, "max_download_bytes", "must be positive")
        _require(self.max_redirects >= 0, "max_redirects", "must be 0 or more")


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """How a downloaded image is checked, resized and re-encoded."""

    image_size: int = 256
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    encode_quality: int = 95
    encode_format: EncodeFormat = "jpg"
    min_image_size: int = 0
    max_image_area: float | None = None  # None: no limit
    max_aspect_ratio: float | None = None  # None: no limit
    # Refuse to decode images whose header claims more pixels than this (PIL's warning threshold).
    max_decoded_pixels: int = 89_478_485
    # Decode large JPEGs at 1/2, 1/4 or 1/8 scale, and average other large images down by a whole
    # factor, before a last resize of under 2x (images.py, _resize). False: img2dataset's one-step resize.
    reduced_jpeg_decode: bool = True
    # Keep the downloaded bytes when the image needs no resizing and is already in encode_format.
    skip_reencode: bool = False
    # Keep the downloaded bytes as they are: no decoding, no checks, no resizing.
    disable_all_reencoding: bool = False
    # Apply a JPEG's EXIF orientation, so the output is upright. None: on in bucket mode only
    # (img2dataset ignores the orientation).
    exif_transpose: bool | None = None
    # resize_mode="bucket" (buckets.py): the buckets' base size and the multiple their sides round
    # to; the crop of the cover-resized image, centred or at one of bucket_corners (0 top-left,
    # 1 top-right, 2 bottom-left, 3 bottom-right), chosen per image from its bytes.
    bucket_base: int = 512
    bucket_divisible: int = 32
    bucket_crop: BucketCrop = "center"
    bucket_corners: tuple[int, ...] = (0, 1, 2, 3)

    @property
    def transposes(self) -> bool:
        """Whether the EXIF orientation is applied."""
        return self.resize_mode == "bucket" if self.exif_transpose is None else self.exif_transpose

    def __post_init__(self) -> None:
        _require(self.image_size >= 1, "image_size", "must be at least 1 pixel")
        _require(self.bucket_divisible >= 1, "bucket_divisible", "must be at least 1 pixel")
        _require(
            self.bucket_base >= self.bucket_divisible,
            "bucket_base",
            f"must be at least bucket_divisible ({self.bucket_divisible})",
        )
        _require(self.bucket_crop in BUCKET_CROPS, "bucket_crop", f"must be one of {list(BUCKET_CROPS)}")
        _require(
            bool(self.bucket_corners) and set(self.bucket_corners) <= {0, 1, 2, 3},
            "bucket_corners",
            "must list one or more of 0 (top-left), 1 (top-right), 2 (bottom-left), 3 (bottom-right)",
        )
        _require(self.resize_mode in RESIZE_MODES, "resize_mode", f"must be one of {list(RESIZE_MODES)}")
        for option in ("upscale_interpolation", "downscale_interpolation"):
            value = getattr(self, option)
            _require(value in INTERPOLATIONS, option, f"{value!r} is not one of {list(INTERPOLATIONS)}")
        _require(
            self.encode_format in ENCODE_FORMATS, "encode_format", f"must be one of {list(ENCODE_FORMATS)}"
        )
        if self.encode_format == "png":
            _require(
                0 <= self.encode_quality <= 9,
                "encode_quality",
                "for png it is the compression level, from 0 to 9",
            )
        else:
            _require(self.encode_quality >= 0, "encode_quality", "must be 0 or more")
        _require(self.min_image_size >= 0, "min_image_size", "must be 0 or more")
        _require(self.max_image_area is None or self.max_image_area > 0, "max_image_area", "must be positive")
        _require(
            self.max_aspect_ratio is None or self.max_aspect_ratio >= 1,
            "max_aspect_ratio",
            "must be 1 or more",
        )
        _require(self.max_decoded_pixels > 0, "max_decoded_pixels", "must be positive")


@dataclass(frozen=True, slots=True)
class OutputSettings:
    """What is written for each shard."""

    output_format: OutputFormat = "files"
    oom_shard_count: int = 5
    extract_exif: bool = True
    compute_hash: HashType | None = "sha256"
    # The shards asset's success_rate check warns (it does not fail the shard) under this share of
    # successful samples; link rot leaves LAION-style lists at 50-80% today.
    min_success_rate: float = 0.5

    def __post_init__(self) -> None:
        _require(0 <= self.min_success_rate <= 1, "min_success_rate", "must be between 0 and 1")
        _require(
            self.output_format in OUTPUT_FORMATS, "output_format", f"must be one of {list(OUTPUT_FORMATS)}"
        )
        _require(1 <= self.oom_shard_count <= 12, "oom_shard_count", "must be between 1 and 12")
        _require(
            self.compute_hash is None or self.compute_hash in HASH_TYPES,
            "compute_hash",
            f"must be None or one of {list(HASH_TYPES)}",
        )


_STAGES: dict[str, type[Any]] = {
    "source": SourceSettings,
    "fetch": FetchSettings,
    "image": ImageSettings,
    "output": OutputSettings,
}


@dataclass(frozen=True, slots=True)
class DownloadSettings:
    """All settings of one table, grouped by stage; serialised with the staged table."""

    source: SourceSettings = field(default_factory=SourceSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    image: ImageSettings = field(default_factory=ImageSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self) -> None:
        verify = self.source.verify_hash_type
        _require(
            verify is None or verify == self.output.compute_hash,
            "verify_hash",
            f"the hash type {verify!r} must be compute_hash's ({self.output.compute_hash!r}), "
            "as the computed hash replaces the verified column in the metadata",
        )

    @classmethod
    def from_flags(cls, **flags: Any) -> DownloadSettings:
        """Build settings from img2dataset-style flat options (``image_size=384, url_col="URL"``)."""
        grouped: dict[str, dict[str, Any]] = {stage: {} for stage in _STAGES}
        owner = {f.name: stage for stage, kind in _STAGES.items() for f in dataclasses.fields(kind)}
        for name, value in flags.items():
            if name not in owner:
                raise ConfigError(f"{name}: unknown download option")
            grouped[owner[name]][name] = _normalise(value)
        return cls(**{stage: _STAGES[stage](**grouped[stage]) for stage in _STAGES})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able dict (tuples become lists)."""
        return {
            stage: {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(getattr(self, stage)).items()
            }
            for stage in _STAGES
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> DownloadSettings:
        return cls(
            **{
                stage: _STAGES[stage](**{k: _normalise(v) for k, v in data.get(stage, {}).items()})
                for stage in _STAGES
            }
        )

    def flat(self) -> dict[str, Any]:
        """The settings as one flat mapping of option name to value (for display)."""
        return {k: v for stage in _STAGES for k, v in self.to_dict()[stage].items()}

    @property
    def key_digits(self) -> int:
        """Digits of the in-shard index in sample keys, as img2dataset computes them."""
        return math.ceil(math.log10(self.source.number_sample_per_shard))


def _normalise(value: Any) -> Any:
    # JSON and Dagster config carry lists; the dataclasses hold tuples.
    if isinstance(value, list):
        return tuple(value)
    # "No limit" is None in every layer; tables staged by img2ds_dagster 0.1 saved it as "inf".
    if value == "inf":
        return None
    return value


def shard_name(shard_id: int, oom_shard_count: int) -> str:
    """Shard file stem: the shard id zero-padded to ``oom_shard_count`` digits."""
    return f"{shard_id:0{oom_shard_count}d}"


def sample_key(shard_id: int, index: int, key_digits: int, oom_shard_count: int) -> str:
    """img2dataset's sample key: shard id then index in shard, as one zero-padded number."""
    return f"{shard_id * 10**key_digits + index:0{key_digits + oom_shard_count}d}"
