"""``download()``: img2dataset's function, same keyword arguments and defaults, run through the same
Dagster assets as the code location, in this process.

The Dagster instance lives in ``<output_folder>/.img2ds/`` (a hidden folder, so the visible layout is
img2dataset's): calling ``download()`` again with the same arguments only builds the shards that are
not materialized yet; with ``incremental_mode="retry_failed"`` it also downloads again the rows of
the built shards whose last try failed transiently (engine/retry.py).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import dagster as dg
import fsspec
import pydantic

from .config import DownloadConfig, config_error
from .defs.partitions import shard_job, shard_keys
from .defs.resources import StorageResource, WorkersResource
from .defs.stats import collect_stats
from .engine.retry import Retried, transient_failures
from .engine.runtime import prepare_process
from .engine.settings import (
    BucketCrop,
    DistributorName,
    EncodeFormat,
    Interpolation,
    OutputFormat,
    ResizeMode,
)
from .engine.shard import Workers
from .engine.sources import TableManifest, input_format_of, list_input_files, table_key
from .engine.stats import stats_path
from .engine.storage import absolute, join, local_path, read_json, remove
from .errors import ConfigError, ShardError
from .runner import AssetRunner, ShardsOutcome

log = logging.getLogger(__name__)

STATE_FOLDER = ".img2ds"
INSTANCE_YAML = """\
# Dagster instance of img2ds_dagster.download() for this output folder (sqlite, next to this file;
# the storage is Dagster's, with a run's planned events written together: img2ds_dagster/instance).
storage:
  custom:
    module: img2ds_dagster.instance.sqlite
    class: SqliteStorage
    config:
      base_dir: {base}
telemetry:
  enabled: false
"""


@dataclass
class DownloadReport:
    """What a ``download()`` call did."""

    output_folder: str
    shards_total: int
    shards_built: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    stats_file: str = ""
    # incremental_mode="retry_failed": the rows downloaded again, and how many of them succeeded
    retried: int = 0
    recovered: int = 0


IncrementalMode = Literal["incremental", "overwrite", "extend", "retry_failed"]
# The per-table options' defaults, which are the engine's (config.py): the signature below reads them
# from here, so a default is written once.
_D = DownloadConfig()
_W = Workers()


def download(  # noqa: PLR0913, PLR0917 - img2dataset's signature, positional calls included
    url_list: str,
    image_size: int = _D.image_size,
    output_folder: str = "images",
    processes_count: int = 1,
    resize_mode: ResizeMode = _D.resize_mode,
    resize_only_if_bigger: bool = _D.resize_only_if_bigger,
    upscale_interpolation: Interpolation = _D.upscale_interpolation,
    downscale_interpolation: Interpolation = _D.downscale_interpolation,
    encode_quality: int = _D.encode_quality,
    encode_format: EncodeFormat = _D.encode_format,
    skip_reencode: bool = _D.skip_reencode,
    output_format: OutputFormat = _D.output_format,
    input_format: str = "txt",
    url_col: str = _D.url_col,
    caption_col: str | None = _D.caption_col,
    bbox_col: str | None = _D.bbox_col,
    thread_count: int = 256,
    number_sample_per_shard: int = _D.number_sample_per_shard,
    extract_exif: bool = _D.extract_exif,
    save_additional_columns: list[str] | None = None,
    timeout: float = _D.timeout,
    enable_wandb: bool = False,
    wandb_project: str = "img2dataset",
    oom_shard_count: int = _D.oom_shard_count,
    compute_hash: str | None = _D.compute_hash,
    verify_hash: list[str] | None = None,
    distributor: DistributorName = "multiprocessing",
    subjob_size: int = 1000,
    retries: int = _D.retries,
    disable_all_reencoding: bool = _D.disable_all_reencoding,
    min_image_size: int = _D.min_image_size,
    max_image_area: float = math.inf,
    max_aspect_ratio: float = math.inf,
    incremental_mode: IncrementalMode = "incremental",
    max_shard_retry: int = 1,
    user_agent_token: str | None = _D.user_agent_token,
    disallowed_header_directives: list[str] | None = None,
    ignore_ssl_certificate: bool = _D.ignore_ssl_certificate,
    proxy: str | None = _D.proxy,
    allowed_networks: list[str] | None = None,
    blocked_networks: list[str] | None = None,
    user_agent: str | None = _D.user_agent,
    user_agent_contact: str | None = _D.user_agent_contact,
    respect_robots_txt: bool = _D.respect_robots_txt,
    respect_tdm_reservation: bool = _D.respect_tdm_reservation,
    respect_content_usage: bool = _D.respect_content_usage,
    respect_xmp_data_mining: bool = _D.respect_xmp_data_mining,
    max_connections_per_host: int = _W.max_connections_per_host,
    min_request_interval: float = _W.min_request_interval,
    host_failure_limit: int = _W.host_failure_limit,
    ray_address: str | None = None,
    spark_master: str | None = None,
    task_retries: int = _W.task_retries,
    shared_filesystem: bool = _W.shared_filesystem,
    exif_transpose: bool | None = _D.exif_transpose,
    bucket_base: int = _D.bucket_base,
    bucket_divisible: int = _D.bucket_divisible,
    bucket_crop: BucketCrop = _D.bucket_crop,
    bucket_corners: list[int] | None = None,
    min_success_rate: float = _D.min_success_rate,
) -> DownloadReport:
    """Download the images of ``url_list`` into ``output_folder``, img2dataset-style.

    Raises ShardError at the end if some shards could not be built (the others are kept; call again
    to retry just those), ConfigError for a bad option and InputTableError for a bad URL file.
    """
    input_format = _inferred_format(url_list, input_format)
    config = table_config(locals())
    _check_run_options(locals())
    prepare_process()
    output_folder = absolute(output_folder)
    files = list_input_files(absolute(url_list), input_format)
    tables = _table_keys(files)
    state = _state_folder(output_folder)
    storage = StorageResource(
        inbox=str(state / "inbox"),
        staging=_staging_folder(output_folder, state, distributor),
        datasets=output_folder,
        stats_file=str(state / "download_stats.json"),
    )
    # img2dataset builds processes_count shards at once, one per process. Here they are threads of
    # this process (the image work runs outside the GIL, so it already uses every core), and at
    # least 2, so that one shard's slowest downloads never leave the cores idle.
    workers = WorkersResource(
        thread_count=thread_count,
        parallel_shards=max(2, processes_count),
        max_connections_per_host=max_connections_per_host,
        min_request_interval=min_request_interval,
        host_failure_limit=host_failure_limit,
        distributor=distributor,
        cluster=ray_address if distributor == "ray" else spark_master,
        task_retries=task_retries,
        shared_filesystem=shared_filesystem,
    )
    with _instance(state) as instance:
        runner = AssetRunner(instance, {"storage": storage, "workers": workers})
        if incremental_mode == "overwrite":
            _start_over(runner, output_folder)
        keys = _stage_tables(
            runner, dict(zip(tables, files, strict=True)), config, output_folder, incremental_mode
        )
        outcome = _build_shards(runner, keys, subjob_size, max_shard_retry)
        retried = _retry_failed(runner, outcome, subjob_size) if incremental_mode == "retry_failed" else None
        runner.refresh_stats()
    if outcome.failed:
        raise ShardError(
            f"{len(outcome.failed)} of {len(keys)} shards could not be built "
            f"({', '.join(outcome.failed[:10])}); "
            "the others are done: call download() again to retry these"
        )
    return DownloadReport(
        output_folder=output_folder,
        shards_total=len(keys),
        shards_built=outcome.built,
        shards_skipped=outcome.skipped,
        totals=collect_stats(storage).totals,
        stats_file=storage.stats_path(),
        retried=retried.retried if retried else 0,
        recovered=retried.recovered if retried else 0,
    )


def _stage_tables(
    runner: AssetRunner,
    sources: dict[str, str],
    config: DownloadConfig,
    output_folder: str,
    incremental_mode: IncrementalMode,
) -> list[str]:
    """Stage each URL file as a ``url_tables`` partition, numbering shards on from the previous
    file's, as img2dataset numbers a folder's files; returns the shard keys, in order."""
    existing = runner.staged_tables()
    first_shard_id = 0
    if incremental_mode == "extend":
        first_shard_id = 1 + max((m.shard_ids[-1] for m in existing.values() if m.shard_count), default=-1)
        # The same file again is new data to add, under a table name of its own.
        sources = dict(zip(fresh_names(list(sources), set(existing)), sources.values(), strict=True))
    others = {table: m for table, m in existing.items() if table not in sources}
    keys: list[str] = []
    for table, source in sources.items():
        manifest = runner.stage_table(
            table,
            {
                **config.model_dump(exclude_defaults=True),
                "source": source,
                "output_folder": output_folder,
                "first_shard_id": first_shard_id,
            },
        )
        clash = _overlapping(manifest, others)
        if clash is not None:
            if table not in existing:
                runner.forget_table(table)
            raise clash
        keys += shard_keys(manifest)
        first_shard_id += manifest.shard_count
    return keys


def _build_shards(
    runner: AssetRunner, keys: list[str], subjob_size: int, max_shard_retry: int
) -> ShardsOutcome:
    """The shards not built yet, in runs of ``subjob_size`` shards, then ``max_shard_retry`` more
    rounds over the failed ones (on top of the shards asset's own RetryPolicy)."""
    outcome = runner.build_missing_shards(keys, max_per_run=subjob_size)
    if outcome.skipped:
        log.info("%d of %d shards were already done and were skipped", len(outcome.skipped), len(keys))
    for attempt in range(1, max_shard_retry + 1):
        if not outcome.failed:
            break
        log.warning(
            "retrying %d failed shards (round %d of %d)", len(outcome.failed), attempt, max_shard_retry
        )
        retried = runner.build_shards(outcome.failed, max_per_run=subjob_size)
        outcome.built += retried.built
        outcome.failed = retried.failed
    return outcome


def _retry_failed(runner: AssetRunner, outcome: ShardsOutcome, max_per_run: int) -> Retried:
    """incremental_mode="retry_failed", after the shards not built yet were built: the built ones
    with transient failures built again in the shards asset's retry_failed mode; the others are
    left as they are. Recovered rows are counted from the shards' stats files, before and after."""
    tables = runner.staged_tables(shard_job(k).table for k in outcome.skipped)
    files: dict[str, tuple[str, str]] = {}
    for key in outcome.skipped:
        job = shard_job(key)
        manifest = tables[job.table]
        files[key] = (manifest.output_folder, manifest.shard_name(job.shard_id))
    transient = {key: transient_failures(*where) for key, where in files.items()}
    # None: built, but its files are not complete any more; the retry_failed build builds it in full.
    wanted = [key for key in outcome.skipped if transient[key] != 0]
    if not wanted:
        return Retried()
    before = {key: _successes(*files[key]) for key in wanted}
    log.info("retrying the transient failures of %d shards", len(wanted))
    built = set(runner.build_shards(wanted, max_per_run, run_config=RETRY_FAILED_RUN_CONFIG).built)
    done = [key for key in wanted if key in built]
    outcome.built += done
    outcome.failed += [key for key in wanted if key not in built]
    outcome.skipped = [key for key in outcome.skipped if key not in wanted]
    return Retried(
        retried=sum(transient[key] or 0 for key in done),
        recovered=sum(max(0, _successes(*files[key]) - before[key]) for key in done),
    )


RETRY_FAILED_RUN_CONFIG = {"ops": {"shards": {"config": {"retry_failed": True}}}}


def _successes(folder: str, name: str) -> int:
    """The successes a shard's stats file counts; 0 when it has none."""
    try:
        return int(read_json(stats_path(folder, name))["successes"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return 0


def _inferred_format(url_list: str, input_format: str) -> str:
    """img2dataset reads any file as txt unless told otherwise, which turns a CSV's header and rows
    into bad URLs. A single file left at the default is read in the format its name says (as the
    inbox does), and the caller is told."""
    named = input_format_of(url_list)
    if input_format != "txt" or named in (None, "txt"):
        return input_format
    fs, path = fsspec.core.url_to_fs(url_list)
    if fs.isdir(path):
        return input_format
    log.warning("%s: read as %s, as its name says (input_format was left at txt)", url_list, named)
    return str(named)


def table_config(arguments: Mapping[str, Any]) -> DownloadConfig:
    """The per-table options among ``download()``'s arguments, as the config of ``url_tables``,
    checked (ConfigError naming the option) before anything is written.

    img2dataset spells two things its own way, converted here, once: "no limit" is ``inf`` there and
    None in the config, and a list option given as None (``disallowed_header_directives``) means
    its default list.
    """
    given = {name: arguments[name] for name in DownloadConfig.model_fields if name in arguments}
    for name in ("max_image_area", "max_aspect_ratio"):
        if math.isinf(given[name]):
            given[name] = None
    for name in ("disallowed_header_directives", "allowed_networks", "blocked_networks", "bucket_corners"):
        if given[name] is None:  # the default list
            del given[name]
    try:
        config = DownloadConfig(**given)
    except pydantic.ValidationError as err:
        raise config_error(err) from None
    config.to_settings()
    return config


def _check_run_options(arguments: Mapping[str, Any]) -> None:
    """The options of ``download()`` that are not a table's: how it runs."""
    if arguments["processes_count"] < 1 or arguments["thread_count"] < 1:
        raise ConfigError("processes_count and thread_count: must be at least 1")
    if arguments["enable_wandb"]:
        raise ConfigError(
            "enable_wandb: img2ds_dagster reports to Dagster, not to Weights & Biases: run `dagster dev` "
            "with DAGSTER_HOME=<output_folder>/.img2ds/dagster to see each shard's run, logs and "
            "metadata, and the download_stats asset (also written to .img2ds/download_stats.json)"
        )
    _require_one_of("distributor", arguments["distributor"], DistributorName)
    _require_one_of("incremental_mode", arguments["incremental_mode"], IncrementalMode)
    if arguments["max_shard_retry"] < 0:
        raise ConfigError("max_shard_retry: must be 0 or more")
    if arguments["subjob_size"] < 1:
        raise ConfigError("subjob_size: must be at least 1")
    Workers(  # its own checks of the politeness and cluster options
        max_connections_per_host=arguments["max_connections_per_host"],
        min_request_interval=arguments["min_request_interval"],
        host_failure_limit=arguments["host_failure_limit"],
        distributor=arguments["distributor"],
        task_retries=arguments["task_retries"],
    )


def _require_one_of(option: str, value: str, allowed: Any) -> None:
    if value not in get_args(allowed):
        raise ConfigError(f"{option}: {value!r} is not one of {list(get_args(allowed))}")


def _start_over(runner: AssetRunner, output_folder: str) -> None:
    """incremental_mode="overwrite": the output folder emptied (but for this state folder), and the
    assets' materializations and partitions forgotten by this output folder's instance."""
    local = local_path(output_folder)
    if local is not None:
        if os.path.isdir(local):
            for entry in os.listdir(local):
                if entry != STATE_FOLDER:
                    remove(os.path.join(local, entry))
    else:
        remove(output_folder)
    runner.forget_everything()


def fresh_names(tables: list[str], existing: set[str]) -> list[str]:
    """``tables`` renamed ``<name>-2``, ``<name>-3``... where they clash with an existing table,
    never taking another one's name."""
    taken = existing | set(tables)
    names = []
    for table in tables:
        name = table
        if table in existing:
            name = next(f"{table}-{n}" for n in itertools.count(2) if f"{table}-{n}" not in taken)
        taken.add(name)
        names.append(name)
    return names


def _overlapping(manifest: TableManifest, others: Mapping[str, TableManifest]) -> ConfigError | None:
    """Two tables never write the same shard files (incremental mode keeps the other tables)."""
    mine = set(manifest.shard_ids)
    for other in others.values():
        if mine.intersection(other.shard_ids):
            names = f"{other.shard_name(other.shard_ids[0])}-{other.shard_name(other.shard_ids[-1])}"
            return ConfigError(
                f"url_list: {manifest.source} would write shards that {other.source} already wrote in "
                f"{manifest.output_folder} ({names}); incremental_mode='extend' adds the new file "
                "after them, incremental_mode='overwrite' starts the folder over"
            )
    return None


def _table_keys(files: list[str]) -> list[str]:
    keys = [table_key(f) for f in files]
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    if clashes:
        raise ConfigError(f"url_list: several input files give the same table name(s) {clashes}; rename them")
    return keys


def _state_folder(output_folder: str) -> Path:
    """``<output_folder>/.img2ds`` for local outputs; a per-output cache folder otherwise (sqlite
    needs a local disk)."""
    local = local_path(output_folder)
    if local is not None:
        return Path(local) / STATE_FOLDER
    digest = hashlib.sha256(output_folder.encode()).hexdigest()[:16]
    return Path(os.path.expanduser("~/.cache/img2ds_dagster")) / digest


def _staging_folder(output_folder: str, state: Path, distributor: DistributorName) -> str:
    """Where the URL files' rows are staged: in the state folder, which is local; for a cluster
    writing to an object store, next to the dataset (``<output_folder>/.img2ds/staging``), where
    the cluster's workers can read them."""
    if distributor != "multiprocessing" and local_path(output_folder) is None:
        return join(output_folder, STATE_FOLDER, "staging")
    return str(state / "staging")


def _instance(state: Path) -> dg.DagsterInstance:
    home = state / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    text = INSTANCE_YAML.format(base=home / "storage")
    if not config.exists() or config.read_text() != text:  # an instance made by an earlier version
        config.write_text(text)
    return dg.DagsterInstance.from_config(str(home))
