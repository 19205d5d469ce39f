"""``img2ds stage``: URL files registered as ``url_tables`` partitions of the instance at
$DAGSTER_HOME and staged by the code location's ``stage_table`` job, in this process, as
``url_drop_sensor`` would for a file dropped in the inbox."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import dagster as dg

from .defs.inbox import drop_config
from .defs.partitions import URL_TABLES
from .defs.url_tables import raise_user_error
from .engine.sources import table_key
from .engine.storage import absolute
from .errors import ConfigError

# Dagster's console logger prints every event at DEBUG, and a failed step with its traceback at
# ERROR; the command prints one line per file, and the error alone.
_QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def stage_files(paths: Sequence[str], name: str | None = None, stage: bool = True) -> Iterator[str]:
    """Register (and stage) each file; yields a line per file saying what was done."""
    if not os.environ.get("DAGSTER_HOME"):
        raise ConfigError(
            "DAGSTER_HOME is not set: it names the Dagster instance to register the tables in "
            "(this project's: export DAGSTER_HOME=$PWD IMG2DS_DAGSTER_STORAGE=$PWD/data/dagster)"
        )
    from .definitions import defs  # noqa: PLC0415 - the code location, with its storage settings

    job = defs.resolve_job_def("stage_table")
    with dg.DagsterInstance.get() as instance:
        for path in paths:
            source = absolute(path)
            table = name or table_key(source)
            config = drop_config(source)  # the settings files beside it; ConfigError names them
            instance.add_dynamic_partitions(URL_TABLES, [table])
            if not stage:
                yield f"url_tables[{table}]: registered ({source})"
                continue
            try:
                result = job.execute_in_process(
                    instance=instance,
                    partition_key=table,
                    run_config={
                        "ops": {"url_tables": {"config": config.model_dump(exclude_defaults=True)}},
                        **_QUIET,
                    },
                    tags={"img2ds/table": table},
                )
            except dg.Failure as failure:
                raise_user_error(failure)
                raise
            (event,) = result.asset_materializations_for_node("url_tables")
            meta = {k: v.value for k, v in event.metadata.items()}
            yield (
                f"url_tables[{table}]: {meta['row_count']} rows in {meta['shard_count']} shards "
                f"({meta['shards']}); run {result.run_id}"
            )
