"""Materialize the assets in this process (``download()``, the CLI and the demo use it): stage a URL
file as a ``url_tables`` partition, build its missing ``shards`` partitions in ranged runs, refresh
``download_stats``. The same asset definitions run here as in the code location.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from .defs.jobs import build_shards as build_shards_job
from .defs.jobs import stage_table
from .defs.partitions import SHARDS, URL_TABLES, contiguous_ranges, range_tags, shard_job
from .defs.resources import StorageResource
from .defs.shards import built_from_staging, shards
from .defs.stats import download_stats, refresh_stats
from .defs.url_tables import raise_user_error, url_tables
from .engine import progress
from .engine.sources import TableManifest
from .engine.storage import remove
from .errors import StagingMissingError

log = logging.getLogger(__name__)

ASSETS = [url_tables, shards, download_stats]
JOBS = [stage_table, build_shards_job, refresh_stats]
_JOB_OF = {url_tables.key: stage_table, shards.key: build_shards_job, download_stats.key: refresh_stats}
# Dagster's console logger prints every event at DEBUG, and a failed step with its traceback at
# ERROR; in-process callers get the error itself, raised.
_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@dataclass
class ShardsOutcome:
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class AssetRunner:
    """Runs the assets against one instance with one set of resources."""

    def __init__(self, instance: dg.DagsterInstance, resources: Mapping[str, Any]) -> None:
        self.instance = instance
        self.resources = dict(resources)
        # The code location's named jobs, so that these runs show in the UI as what they are.
        self._jobs = dg.Definitions(assets=ASSETS, jobs=JOBS, resources=self.resources)

    def _materialize(
        self, asset: dg.AssetsDefinition, raise_on_error: bool = True, **kwargs: Any
    ) -> dg.ExecuteInProcessResult:
        """One in-process run of the asset's job; with ``raise_on_error`` the asset's own exception
        comes through."""
        run_config = {**kwargs.pop("run_config", {}), **_QUIET}
        job = self._jobs.resolve_job_def(_JOB_OF[asset.key].name)
        return job.execute_in_process(
            instance=self.instance, run_config=run_config, raise_on_error=raise_on_error, **kwargs
        )

    def stage_table(self, table: str, config: Mapping[str, Any]) -> TableManifest:
        """Materialize ``url_tables[table]`` with this run config; raises what staging raised."""
        self.instance.add_dynamic_partitions(URL_TABLES, [table])
        try:
            self._materialize(
                url_tables, partition_key=table, run_config={"ops": {"url_tables": {"config": dict(config)}}}
            )
        except dg.Failure as failure:
            raise_user_error(failure)
            raise
        storage: StorageResource = self.resources["storage"]
        return storage.staging_area().manifest(table)

    def staged_tables(self, among: Iterable[str] | None = None) -> dict[str, TableManifest]:
        """The tables registered in this instance (or those of ``among`` that are) whose staging is
        complete, by name."""
        staging = self.resources["storage"].staging_area()
        registered = self.instance.get_dynamic_partitions(URL_TABLES)
        found = {}
        for table in registered if among is None else set(among).intersection(registered):
            try:
                found[table] = staging.manifest(table)
            except StagingMissingError:
                continue
        return found

    def forget_table(self, table: str) -> None:
        """Unregister a table and its shards, and drop its staged rows."""
        prefix = f"{table}/"
        for key in self.instance.get_dynamic_partitions(SHARDS):
            if key.startswith(prefix):
                self.instance.delete_dynamic_partition(SHARDS, key)
        self.instance.delete_dynamic_partition(URL_TABLES, table)
        remove(self.resources["storage"].staging_area().table_dir(table))

    def forget_everything(self) -> None:
        """Wipe the assets' materializations and every partition and staged table: a fresh start.
        Runs and their logs stay. (Dagster's SQL storages cannot wipe single partitions.)"""
        self.instance.wipe_assets([asset.key for asset in ASSETS])
        for table in self.instance.get_dynamic_partitions(URL_TABLES):
            self.forget_table(table)

    def build_missing_shards(self, keys: Sequence[str], max_per_run: int | None = None) -> ShardsOutcome:
        """Materialize the shards among ``keys`` that are not built from their current rows yet: never
        materialized, or last materialized from other rows than their table's staging holds now (a
        URL file edited, or grown into its last shard, since)."""
        wanted = set(keys)
        tables = self.staged_tables(shard_job(k).table for k in wanted)
        done = {key for m in tables.values() for key in built_from_staging(self.instance, m)}
        done &= wanted
        materialized = set(self.instance.get_materialized_partitions(shards.key) or ()) & wanted
        if materialized - done:
            log.info(
                "%d built shards have other rows staged now and are built again", len(materialized - done)
            )
        outcome = self.build_shards([k for k in keys if k not in done], max_per_run)
        outcome.skipped = [k for k in keys if k in done]
        return outcome

    def build_shards(
        self, keys: Sequence[str], max_per_run: int | None = None, run_config: Mapping[str, Any] | None = None
    ) -> ShardsOutcome:
        """Materialize these shards, in runs over contiguous key ranges of ``max_per_run`` at most,
        with the shards asset's ``run_config`` (its retry_failed mode) when given."""
        ordered = self.instance.get_dynamic_partitions(SHARDS)
        built: set[str] = set()
        progress.expect(len(keys))
        for first, last in contiguous_ranges(ordered, keys, max_per_run or max(1, len(keys))):
            # A failed shard shows in its partition status and is reported below; it is not raised.
            result = self._materialize(
                shards, raise_on_error=False, tags=range_tags(first, last), run_config=dict(run_config or {})
            )
            built.update(e.partition for e in result.get_asset_materialization_events() if e.partition)
        return ShardsOutcome(
            built=[k for k in keys if k in built], failed=[k for k in keys if k not in built]
        )

    def refresh_stats(self) -> None:
        self._materialize(download_stats)
