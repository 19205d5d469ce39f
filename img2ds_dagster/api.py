"""``download()``: img2dataset's function, same keyword arguments and defaults, run through the same
Dagster assets as the code location, in this process.

The Dagster instance lives in ``<output_folder>/.img2ds/`` (a hidden folder, so the visible layout is
img2dataset's): calling ``download()`` again with the same arguments only builds the shards that are
not materialized yet.
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
from typing import Any

import dagster as dg

from .config import DownloadConfig
from .defs.resources import StorageResource, WorkersResource
from .defs.stats import collect_stats
from .defs.url_tables import shard_keys
from .engine.sources import TableManifest, list_input_files, table_key
from .engine.storage import absolute, local_path, remove
from .errors import ConfigError, ShardError
from .runner import AssetRunner, ShardsOutcome

log = logging.getLogger(__name__)

STATE_FOLDER = ".img2ds"
INSTANCE_YAML = """\
# Dagster instance of img2ds_dagster.download() for this output folder (sqlite, next to this file).
storage:
  sqlite:
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


INCREMENTAL_MODES = ("incremental", "overwrite", "extend")
_DISTRIBUTION = (
    "img2ds_dagster does not distribute work with {name}: it is Dagster's job. One machine: "
    "download() or `dagster dev` (processes_count/thread_count set the parallelism). Several machines: "
    "the deploy/ profile, where Dagster's run launcher (ECS or Kubernetes) starts shard runs as "
    "separate tasks or pods and the shards asset's pool limits how many run at once"
)


def download(  # noqa: PLR0917 - img2dataset accepts its arguments positionally too
    url_list: str,
    image_size: int = 256,
    output_folder: str = "images",
    processes_count: int = 1,
    resize_mode: str = "border",
    resize_only_if_bigger: bool = False,
    upscale_interpolation: str = "lanczos",
    downscale_interpolation: str = "area",
    encode_quality: int = 95,
    encode_format: str = "jpg",
    skip_reencode: bool = False,
    output_format: str = "files",
    input_format: str = "txt",
    url_col: str = "url",
    caption_col: str | None = None,
    bbox_col: str | None = None,
    thread_count: int = 256,
    number_sample_per_shard: int = 10000,
    extract_exif: bool = True,
    save_additional_columns: list[str] | None = None,
    timeout: int = 10,
    enable_wandb: bool = False,
    wandb_project: str = "img2dataset",
    oom_shard_count: int = 5,
    compute_hash: str | None = "sha256",
    verify_hash: list[str] | None = None,
    distributor: str = "multiprocessing",
    subjob_size: int = 1000,
    retries: int = 0,
    disable_all_reencoding: bool = False,
    min_image_size: int = 0,
    max_image_area: float = float("inf"),
    max_aspect_ratio: float = float("inf"),
    incremental_mode: str = "incremental",
    max_shard_retry: int = 1,
    user_agent_token: str | None = None,
    disallowed_header_directives: list[str] | None = None,
    ignore_ssl_certificate: bool = False,
) -> DownloadReport:
    """Download the images of ``url_list`` into ``output_folder``, img2dataset-style.

    Raises ShardError at the end if some shards could not be built (the others are kept; call again
    to retry just those), ConfigError for a bad option and InputTableError for a bad URL file.
    """
    _check_run_options(
        processes_count=processes_count,
        thread_count=thread_count,
        enable_wandb=enable_wandb,
        distributor=distributor,
        incremental_mode=incremental_mode,
        max_shard_retry=max_shard_retry,
        subjob_size=subjob_size,
    )
    config = DownloadConfig(
        image_size=image_size,
        resize_mode=resize_mode,
        resize_only_if_bigger=resize_only_if_bigger,
        upscale_interpolation=upscale_interpolation,
        downscale_interpolation=downscale_interpolation,
        encode_quality=encode_quality,
        encode_format=encode_format,
        output_format=output_format,
        input_format=input_format,
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=save_additional_columns,
        number_sample_per_shard=number_sample_per_shard,
        oom_shard_count=oom_shard_count,
        extract_exif=extract_exif,
        compute_hash=compute_hash,
        timeout=timeout,
        retries=retries,
        user_agent_token=user_agent_token,
        disallowed_header_directives=(
            list(disallowed_header_directives)
            if disallowed_header_directives is not None
            else DownloadConfig.model_fields["disallowed_header_directives"].get_default(
                call_default_factory=True
            )
        ),
        min_image_size=min_image_size,
        max_image_area=None if math.isinf(max_image_area) else max_image_area,
        max_aspect_ratio=None if math.isinf(max_aspect_ratio) else max_aspect_ratio,
        skip_reencode=skip_reencode,
        disable_all_reencoding=disable_all_reencoding,
        bbox_col=bbox_col,
        verify_hash=list(verify_hash) if verify_hash is not None else None,
        ignore_ssl_certificate=ignore_ssl_certificate,
    )
    config.to_settings()  # fail fast, naming the option, before anything is written

    output_folder = absolute(output_folder)
    files = list_input_files(absolute(url_list), input_format)
    tables = _table_keys(files)
    state = _state_folder(output_folder)
    storage = StorageResource(
        inbox=str(state / "inbox"),
        staging=str(state / "staging"),
        datasets=output_folder,
        stats_file=str(state / "download_stats.json"),
    )
    # img2dataset builds processes_count shards at once, one per process. Here they are threads of
    # this process (the image work runs outside the GIL, so it already uses every core), and at
    # least 2, so that one shard's slowest downloads never leave the cores idle.
    workers = WorkersResource(thread_count=thread_count, parallel_shards=max(2, processes_count))
    with _instance(state) as instance:
        runner = AssetRunner(instance, {"storage": storage, "workers": workers})
        if incremental_mode == "overwrite":
            _start_over(runner, output_folder)
        keys = _stage_tables(
            runner, dict(zip(tables, files, strict=True)), config, output_folder, incremental_mode
        )
        outcome = _build_shards(runner, keys, subjob_size, max_shard_retry)
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
    )


def _stage_tables(
    runner: AssetRunner,
    sources: dict[str, str],
    config: DownloadConfig,
    output_folder: str,
    incremental_mode: str,
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


def _check_run_options(
    *,
    processes_count: int,
    thread_count: int,
    enable_wandb: bool,
    distributor: str,
    incremental_mode: str,
    max_shard_retry: int,
    subjob_size: int,
) -> None:
    if processes_count < 1 or thread_count < 1:
        raise ConfigError("processes_count and thread_count: must be at least 1")
    if enable_wandb:
        raise ConfigError(
            "enable_wandb: img2ds_dagster reports to Dagster, not to Weights & Biases: run `dagster dev` "
            "with DAGSTER_HOME=<output_folder>/.img2ds/dagster to see each shard's run, logs and "
            "metadata, and the download_stats asset (also written to .img2ds/download_stats.json)"
        )
    if distributor in ("pyspark", "ray"):
        raise ConfigError(f"distributor={distributor!r}: " + _DISTRIBUTION.format(name=distributor))
    if distributor != "multiprocessing":
        raise ConfigError(f"distributor: {distributor!r} is not one of multiprocessing, pyspark, ray")
    if incremental_mode not in INCREMENTAL_MODES:
        raise ConfigError(f"incremental_mode: {incremental_mode!r} is not one of {list(INCREMENTAL_MODES)}")
    if max_shard_retry < 0:
        raise ConfigError("max_shard_retry: must be 0 or more")
    if subjob_size < 1:
        raise ConfigError("subjob_size: must be at least 1")


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


def _instance(state: Path) -> dg.DagsterInstance:
    home = state / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_YAML.format(base=home / "storage"))
    return dg.DagsterInstance.from_config(str(home))
