"""Dagster run config for a URL table: img2dataset's per-table options, same names and defaults.

These are the options that decide what a shard contains; they are fixed when a table is staged.
Parallelism (threads, processes) is a resource instead, since it changes speed and not the output.
Every default is the engine's (``engine/settings.py``), read from its dataclasses: a default lives
there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pydantic
from pydantic import Field

from .engine.settings import (
    BucketCrop,
    DownloadSettings,
    EncodeFormat,
    FetchSettings,
    ImageSettings,
    Interpolation,
    OutputFormat,
    OutputSettings,
    ResizeMode,
    SourceSettings,
)
from .errors import ConfigError

_SOURCE, _FETCH, _IMAGE, _OUTPUT = SourceSettings(), FetchSettings(), ImageSettings(), OutputSettings()


def config_error(err: pydantic.ValidationError, origin: Mapping[str, str] | None = None) -> ConfigError:
    """A ConfigError with one ``option: problem`` per bad option, each preceded by the file it came
    from when ``origin`` (option -> settings file) knows it."""
    problems = []
    for error in err.errors():
        option = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "literal_error":  # worded as the engine's own checks
            problem = f"must be one of {error.get('ctx', {}).get('expected')}"
        else:
            problem = error["msg"][:1].lower() + error["msg"][1:]
        where = (origin or {}).get(str(error["loc"][0]) if error["loc"] else "")
        problems.append(f"{where}: " * bool(where) + f"{option}: {problem}, got {error.get('input')!r}")
    return ConfigError("; ".join(problems))


class DownloadConfig(dg.Config):
    """Per-table download options (img2dataset's flags)."""

    image_size: int = Field(default=_IMAGE.image_size, description="Side of the output image, in pixels.")
    resize_mode: ResizeMode = Field(
        default=_IMAGE.resize_mode, description="How the image is fitted to image_size."
    )
    resize_only_if_bigger: bool = Field(
        default=_IMAGE.resize_only_if_bigger, description="Only ever scale images down."
    )
    upscale_interpolation: Interpolation = _IMAGE.upscale_interpolation
    downscale_interpolation: Interpolation = _IMAGE.downscale_interpolation
    encode_quality: int = Field(
        default=_IMAGE.encode_quality, description="JPEG/WebP quality; for png, the compression level 0-9."
    )
    encode_format: EncodeFormat = _IMAGE.encode_format
    output_format: OutputFormat = _OUTPUT.output_format
    input_format: str | None = Field(
        default=_SOURCE.input_format,
        description="txt, csv, tsv, json, jsonl (optionally .gz) or parquet; default: from the file name.",
    )
    url_col: str = _SOURCE.url_col
    caption_col: str | None = _SOURCE.caption_col
    save_additional_columns: list[str] | None = Field(
        default=None, description="Input columns copied into each sample's metadata."
    )
    number_sample_per_shard: int = _SOURCE.number_sample_per_shard
    oom_shard_count: int = Field(
        default=_OUTPUT.oom_shard_count, description="Digits of zero padding in shard names."
    )
    extract_exif: bool = _OUTPUT.extract_exif
    # Not a Literal like the others: Dagster's config has no optional enum. The engine checks it.
    compute_hash: str | None = Field(
        default=_OUTPUT.compute_hash,
        description="md5, sha256, sha512 or None: the hash saved with each sample.",
    )
    timeout: float = Field(
        default=_FETCH.timeout, description="Seconds allowed for one download attempt, body included."
    )
    retries: int = Field(
        default=_FETCH.retries, description="Extra attempts after a transient failure (timeout, 5xx, 429)."
    )
    user_agent_token: str | None = _FETCH.user_agent_token
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: list(_FETCH.disallowed_header_directives),
        description="X-Robots-Tag directives that exclude an image; [] keeps everything.",
    )
    min_image_size: int = _IMAGE.min_image_size
    max_image_area: float | None = Field(default=_IMAGE.max_image_area, description="None: no limit.")
    max_aspect_ratio: float | None = Field(default=_IMAGE.max_aspect_ratio, description="None: no limit.")
    max_download_bytes: int = Field(
        default=_FETCH.max_download_bytes, description="Larger bodies are not downloaded."
    )
    max_decoded_pixels: int = Field(
        default=_IMAGE.max_decoded_pixels,
        description="Images whose header claims more pixels are not decoded.",
    )
    reduced_jpeg_decode: bool = Field(
        default=_IMAGE.reduced_jpeg_decode,
        description="Decode large JPEGs at 1/2, 1/4 or 1/8 scale, and average other large images down by a "
        "whole factor, before the last resize; False resizes in one step as img2dataset does.",
    )
    skip_reencode: bool = Field(
        default=_IMAGE.skip_reencode,
        description="Keep the downloaded bytes when no resize is needed and the format is encode_format.",
    )
    disable_all_reencoding: bool = Field(
        default=_IMAGE.disable_all_reencoding,
        description="Keep the downloaded bytes untouched: no decoding, checks or resizing.",
    )
    exif_transpose: bool | None = Field(
        default=_IMAGE.exif_transpose,
        description="Apply a JPEG's EXIF orientation (upright output); default: on in bucket mode only.",
    )
    bucket_base: int = Field(
        default=_IMAGE.bucket_base, description="resize_mode=bucket: the buckets' base size (512: ~512x512)."
    )
    bucket_divisible: int = Field(
        default=_IMAGE.bucket_divisible, description="resize_mode=bucket: bucket sides are multiples of this."
    )
    bucket_crop: BucketCrop = Field(
        default=_IMAGE.bucket_crop, description="resize_mode=bucket: keep the centre, or a corner."
    )
    bucket_corners: list[int] = Field(
        default_factory=lambda: list(_IMAGE.bucket_corners),
        description="bucket_crop=corner: the corners it may keep (0 top-left, 1 top-right, 2 bottom-left, "
        "3 bottom-right), one per image picked from its bytes.",
    )
    bbox_col: str | None = Field(
        default=_SOURCE.bbox_col,
        description="Column of boxes [[x_min, y_min, x_max, y_max], ...] (relative) to blur; also saved.",
    )
    verify_hash: list[str] | None = Field(
        default=None,
        description="[column, hash type]: images whose bytes do not match are failed_to_download.",
    )
    ignore_ssl_certificate: bool = Field(
        default=_FETCH.ignore_ssl_certificate, description="Accept any certificate on https URLs."
    )
    proxy: str | None = Field(
        default=_FETCH.proxy,
        description="http://host:port of a proxy for every download; default: HTTP(S)_PROXY and NO_PROXY.",
    )
    allowed_networks: list[str] = Field(
        default_factory=lambda: list(_FETCH.allowed_networks),
        description="Networks the address guard lets through whatever the rule, e.g. ['10.0.0.0/8'].",
    )
    blocked_networks: list[str] = Field(
        default_factory=lambda: list(_FETCH.blocked_networks),
        description="Networks the address guard refuses as well (this wins over allowed_networks).",
    )
    user_agent: str | None = Field(
        default=_FETCH.user_agent,
        description="The User-Agent whole; default: img2ds_dagster/<version> (...).",
    )
    user_agent_contact: str | None = Field(
        default=_FETCH.user_agent_contact,
        description="A URL or mailto: in the User-Agent where site owners can reach you.",
    )
    respect_robots_txt: bool = Field(
        default=_FETCH.respect_robots_txt,
        description="Follow each host's robots.txt, its Crawl-delay and its AI-usage lines.",
    )
    respect_tdm_reservation: bool = Field(
        default=_FETCH.respect_tdm_reservation, description="Refuse images sent with tdm-reservation: 1."
    )
    respect_content_usage: bool = Field(
        default=_FETCH.respect_content_usage,
        description="Refuse images whose Content-Usage header opts out of AI training (train-ai=n).",
    )
    respect_xmp_data_mining: bool = Field(
        default=_FETCH.respect_xmp_data_mining,
        description="Refuse images whose XMP DataMining field prohibits AI/ML training.",
    )
    min_success_rate: float = Field(
        default=_OUTPUT.min_success_rate,
        description="The shards' success_rate check warns under this share of successful samples.",
    )

    def to_settings(self) -> DownloadSettings:
        """The engine's settings; raises ConfigError naming the option when a value cannot work."""
        flags: dict[str, Any] = {name: getattr(self, name) for name in DownloadConfig.model_fields}
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
    refused: str | None = Field(
        default=None,
        description="Set by the inbox sensors for a file they cannot stage (its settings file has an "
        "unknown option or a bad value): the run fails with this message, so the table shows as failed.",
    )


class ShardsConfig(dg.Config):
    """The ``shards`` asset's run config: how a run builds its shards, not what they hold (a
    backfill or a launchpad run sets it)."""

    retry_failed: bool = Field(
        default=False,
        description=(
            "Download again only the rows of each built shard whose last try failed transiently "
            "(timeouts, connection errors, 429, 5xx) and rewrite it with the rows it had; a shard "
            "not built yet is built in full, one with nothing to retry is left as it is."
        ),
    )
