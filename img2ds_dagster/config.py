"""Dagster run config for a URL table: img2dataset's per-table options, same names and defaults.

These are the options that decide what a shard contains; they are fixed when a table is staged.
Parallelism (threads, processes) is a resource instead, since it changes speed and not the output.
"""

from __future__ import annotations

import math
from typing import Any

import dagster as dg
from pydantic import Field

from .engine.settings import DEFAULT_DISALLOWED_DIRECTIVES, DownloadSettings
from .errors import ConfigError

# The Dagster UI shows config defaults as JSON, which has no infinity: "no limit" is None here.
_UNLIMITED = {"max_image_area", "max_aspect_ratio"}


class DownloadConfig(dg.Config):
    """Per-table download options (img2dataset's flags)."""

    image_size: int = Field(default=256, description="Side of the output image, in pixels.")
    resize_mode: str = Field(
        default="border", description="no, border, keep_ratio, keep_ratio_largest or center_crop."
    )
    resize_only_if_bigger: bool = Field(default=False, description="Only ever scale images down.")
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    encode_quality: int = Field(
        default=95, description="JPEG/WebP quality; for png, the compression level 0-9."
    )
    encode_format: str = Field(default="jpg", description="jpg, png or webp.")
    output_format: str = Field(default="files", description="files, webdataset, parquet, tfrecord or dummy.")
    input_format: str | None = Field(
        default=None,
        description="txt, csv, tsv, json, jsonl (optionally .gz) or parquet; default: from the file name.",
    )
    url_col: str = "url"
    caption_col: str | None = None
    save_additional_columns: list[str] | None = Field(
        default=None, description="Input columns copied into each sample's metadata."
    )
    number_sample_per_shard: int = 10000
    oom_shard_count: int = Field(default=5, description="Digits of zero padding in shard names.")
    extract_exif: bool = True
    compute_hash: str | None = Field(
        default="sha256", description="None, md5, sha256 or sha512 of the downloaded bytes."
    )
    timeout: float = Field(
        default=10.0, description="Seconds allowed for one download attempt, body included."
    )
    retries: int = Field(
        default=0, description="Extra attempts after a transient failure (timeout, 5xx, 429)."
    )
    user_agent_token: str | None = None
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES),
        description="X-Robots-Tag directives that exclude an image; [] keeps everything.",
    )
    min_image_size: int = 0
    max_image_area: float | None = Field(default=None, description="None: no limit.")
    max_aspect_ratio: float | None = Field(default=None, description="None: no limit.")
    max_download_bytes: int = Field(default=64 * 1024 * 1024, description="Larger bodies are not downloaded.")
    max_decoded_pixels: int = Field(
        default=89_478_485, description="Images whose header claims more pixels are not decoded."
    )
    reduced_jpeg_decode: bool = Field(
        default=True,
        description="Decode large JPEGs at 1/2, 1/4 or 1/8 scale, and average other large images down by a "
        "whole factor, before the last resize; False resizes in one step as img2dataset does.",
    )
    skip_reencode: bool = Field(
        default=False,
        description="Keep the downloaded bytes when no resize is needed and the format is encode_format.",
    )
    disable_all_reencoding: bool = Field(
        default=False, description="Keep the downloaded bytes untouched: no decoding, checks or resizing."
    )
    bbox_col: str | None = Field(
        default=None,
        description="Column of boxes [[x_min, y_min, x_max, y_max], ...] (relative) to blur; also saved.",
    )
    verify_hash: list[str] | None = Field(
        default=None,
        description="[column, hash type]: images whose bytes do not match are failed_to_download.",
    )
    ignore_ssl_certificate: bool = Field(default=False, description="Accept any certificate on https URLs.")

    def to_settings(self) -> DownloadSettings:
        """The engine's settings; raises ConfigError naming the option when a value cannot work."""
        flags: dict[str, Any] = {name: getattr(self, name) for name in DownloadConfig.model_fields}
        for name in _UNLIMITED:
            if flags[name] is None:
                flags[name] = math.inf
        flags["save_additional_columns"] = flags["save_additional_columns"] or []
        verify = flags.pop("verify_hash")
        if verify is not None:
            if len(verify) != 2:
                raise ConfigError(f"verify_hash: must be [column, hash type], got {verify!r}")
            flags["verify_hash_col"], flags["verify_hash_type"] = verify
        return DownloadSettings.from_flags(**flags)


class UrlTableConfig(DownloadConfig):
    """Config of a ``url_tables`` run: the download options plus where this table comes from and goes."""

    source: str | None = Field(
        default=None,
        description="fsspec URL of the URL file; default: the inbox file this partition is named after.",
    )
    output_folder: str | None = Field(
        default=None, description="Where the shards go; default: <datasets>/<table>."
    )
    first_shard_id: int = Field(
        default=0, description="Id of the table's first shard (to number after another table)."
    )
