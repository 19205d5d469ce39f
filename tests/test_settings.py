"""Settings: validation that names the option, and img2dataset's names and defaults everywhere."""

from __future__ import annotations

import inspect
import math
import typing

import pytest

from img2ds_dagster import download
from img2ds_dagster.cli import parse_value
from img2ds_dagster.config import DownloadConfig, UrlTableConfig
from img2ds_dagster.engine.settings import DownloadSettings, sample_key, shard_name
from img2ds_dagster.errors import ConfigError

# img2dataset 1.47's download() parameters and defaults, from its reference README and signature.
IMG2DATASET_DEFAULTS = {
    "url_list": inspect.Parameter.empty,
    "image_size": 256,
    "output_folder": "images",
    "processes_count": 1,
    "resize_mode": "border",
    "resize_only_if_bigger": False,
    "upscale_interpolation": "lanczos",
    "downscale_interpolation": "area",
    "encode_quality": 95,
    "encode_format": "jpg",
    "skip_reencode": False,
    "output_format": "files",
    "input_format": "txt",
    "url_col": "url",
    "caption_col": None,
    "bbox_col": None,
    "thread_count": 256,
    "number_sample_per_shard": 10000,
    "extract_exif": True,
    "save_additional_columns": None,
    "timeout": 10,
    "enable_wandb": False,
    "wandb_project": "img2dataset",
    "oom_shard_count": 5,
    "compute_hash": "sha256",
    "verify_hash": None,
    "distributor": "multiprocessing",
    "subjob_size": 1000,
    "retries": 0,
    "disable_all_reencoding": False,
    "min_image_size": 0,
    "max_image_area": math.inf,
    "max_aspect_ratio": math.inf,
    "incremental_mode": "incremental",
    "max_shard_retry": 1,
    "user_agent_token": None,
    "disallowed_header_directives": None,
}


# Options of later img2dataset releases, accepted after 1.47's (so positional calls still line up).
LATER_OPTIONS = {"ignore_ssl_certificate": False}
# Options of img2ds_dagster's own, after img2dataset's.
OWN_OPTIONS = {
    "proxy": None,
    "allowed_networks": None,
    "blocked_networks": None,
    "user_agent": None,
    "user_agent_contact": None,
    "respect_robots_txt": True,
    "respect_tdm_reservation": True,
    "respect_content_usage": True,
    "respect_xmp_data_mining": True,
    "max_connections_per_host": 16,
    "min_request_interval": 0.0,
    "host_failure_limit": 8,
    "ray_address": None,
    "spark_master": None,
    "task_retries": 3,
    "shared_filesystem": False,
    "exif_transpose": None,
    "bucket_base": 512,
    "bucket_divisible": 32,
    "bucket_crop": "center",
    "bucket_corners": None,
    "min_success_rate": 0.5,
}


def test_download_has_img2datasets_signature() -> None:
    params = inspect.signature(download).parameters
    assert list(params) == [*IMG2DATASET_DEFAULTS, *LATER_OPTIONS, *OWN_OPTIONS]
    expected = {**IMG2DATASET_DEFAULTS, **LATER_OPTIONS, **OWN_OPTIONS}
    assert {name: p.default for name, p in params.items()} == expected


def test_dagster_config_defaults_are_the_engines() -> None:
    from_config = DownloadConfig().to_settings()
    assert from_config == DownloadSettings()
    # and both are img2dataset's, for every option they share with it
    flat = from_config.flat()
    for name, default in IMG2DATASET_DEFAULTS.items():
        if name in flat and name != "input_format":  # the code location infers it from the file name
            expected = list(default) if isinstance(default, tuple) else default
            if name == "disallowed_header_directives":  # None means the default directives
                expected = ["noai", "noimageai", "noindex", "noimageindex", "noml"]  # noml: ours
            if name == "save_additional_columns":  # None means no extra column
                expected = []
            if isinstance(expected, float) and math.isinf(expected):  # "no limit"
                expected = None
            assert flat[name] == expected, name


def test_settings_survive_a_json_round_trip() -> None:
    settings = DownloadSettings.from_flags(
        image_size=384, caption_col="text", save_additional_columns=["a"], max_aspect_ratio=3.5
    )
    assert DownloadSettings.from_dict(settings.to_dict()) == settings
    assert settings.to_dict()["image"]["max_image_area"] is None  # no limit
    # Tables staged by img2ds_dagster 0.1 saved "no limit" as "inf".
    old = settings.to_dict()
    old["image"]["max_image_area"] = "inf"
    assert DownloadSettings.from_dict(old) == settings


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"resize_mode": "stretch"}, "resize_mode: must be one of"),
        ({"encode_format": "gif"}, "encode_format: must be one of"),
        (
            {"encode_format": "png", "encode_quality": 95},
            "encode_quality: for png it is the compression level",
        ),
        ({"output_format": "csv"}, "output_format: must be one of"),
        ({"compute_hash": "crc32"}, "compute_hash: must be None or one of"),
        ({"upscale_interpolation": "magic"}, "upscale_interpolation: 'magic' is not one of"),
        ({"number_sample_per_shard": 0}, "number_sample_per_shard: must be at least 1"),
        ({"timeout": 0}, "timeout: must be a positive number"),
        ({"save_additional_columns": ["url", "x"]}, "save_additional_columns: ['url'] are written by"),
        ({"image_sise": 3}, "image_sise: unknown download option"),
    ],
)
def test_bad_values_name_the_option(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message.replace('[', '.').replace(']', '.')}"):
        DownloadSettings.from_flags(**flags)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"enable_wandb": True}, "enable_wandb: img2ds_dagster reports to Dagster"),
        ({"task_retries": -1}, "task_retries: must be 0 or more"),
        ({"distributor": "dask"}, "distributor: 'dask' is not one of"),
        ({"incremental_mode": "append"}, "incremental_mode: 'append' is not one of"),
        ({"max_shard_retry": -1}, "max_shard_retry: must be 0 or more"),
        ({"subjob_size": 0}, "subjob_size: must be at least 1"),
        ({"verify_hash": ["h"]}, r"verify_hash: must be \[column, hash type\]"),
        ({"verify_hash": ["h", "crc32"], "compute_hash": None}, "verify_hash: the hash type 'crc32'"),
        ({"verify_hash": ["h", "md5"]}, "verify_hash: the hash type 'md5' must be compute_hash's"),
        ({"bbox_col": "status"}, "bbox_col: 'status' is a column the downloader writes"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path: object, option: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        download(url_list=str(tmp_path), **option)  # type: ignore[arg-type]


def test_shard_names_and_keys() -> None:
    assert shard_name(12, 5) == "00012"
    # shard 12, sample 34 of a 10000-sample shard: 5 + ceil(log10(10000)) = 9 digits
    assert sample_key(12, 34, 4, 5) == "000120034"


@pytest.mark.parametrize(
    ("text", "annotation", "value"),
    [
        ("True", bool, True),
        ("false", bool, False),
        ("384", int, 384),
        ("inf", float, math.inf),
        ("None", str | None, None),
        ("caption", str | None, "caption"),
        ('["noai","noindex"]', list[str] | None, ["noai", "noindex"]),
        ("[]", list[str] | None, []),
        ("noai,noindex", list[str] | None, ["noai", "noindex"]),
        ("None", list[str] | None, None),
    ],
)
def test_cli_values_are_read_like_img2datasets_command_line(
    text: str, annotation: object, value: object
) -> None:
    assert parse_value(text, annotation) == value


def test_every_download_parameter_has_a_cli_type() -> None:
    hints = typing.get_type_hints(download)
    for name, param in inspect.signature(download).parameters.items():
        if param.default not in (inspect.Parameter.empty, None):
            assert parse_value(str(param.default), hints[name]) == param.default, name


def test_url_table_config_adds_location_fields() -> None:
    assert set(UrlTableConfig.model_fields) - set(DownloadConfig.model_fields) == {
        "source",
        "output_folder",
        "first_shard_id",
        "refused",
    }
