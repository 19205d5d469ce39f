"""The commands the side-by-side benchmark runs, each in a fresh process: img2dataset 1.47 from its
own virtualenv, img2ds_dagster's ``download()``, and img2ds_dagster through its Dagster assets on a
persistent instance (``url_tables`` once, then multi-shard runs of ``shards``).

Run as a script with a JSON argument: ``python -m benchmarks.tools <tool> '<json options>'``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

IMG2DATASET_SCRIPT = """
import json, sys
from img2dataset import download
if __name__ == "__main__":
    download(**json.loads(sys.argv[1]))
"""


def run_download(options: dict[str, Any]) -> None:
    from img2ds_dagster import download

    download(**options)


def run_dagster_assets(options: dict[str, Any]) -> None:
    """url_tables, then every shard in runs of shards_per_run(), as the backfill daemon groups
    them, on a persistent sqlite instance; download() is not involved."""
    import dagster as dg

    from img2ds_dagster.api import INSTANCE_YAML
    from img2ds_dagster.defs.partitions import shard_keys, shards_per_run
    from img2ds_dagster.defs.resources import StorageResource, WorkersResource
    from img2ds_dagster.runner import AssetRunner

    output = Path(options.pop("output_folder"))
    url_list = options.pop("url_list")
    politeness = {
        name: options.pop(name)
        for name in ("max_connections_per_host", "min_request_interval", "host_failure_limit")
        if name in options
    }
    workers = WorkersResource(
        thread_count=options.pop("thread_count"),
        parallel_shards=max(2, options.pop("processes_count")),
        **politeness,
    )
    with tempfile.TemporaryDirectory(prefix="img2ds-bench-") as home:
        # The instance download() makes (api.py), so that the two paths differ only in how they are run.
        Path(home, "dagster.yaml").write_text(INSTANCE_YAML.format(base=f"{home}/storage"))
        storage = StorageResource(
            inbox=f"{home}/inbox", staging=f"{home}/staging", datasets=str(output.parent)
        )
        with dg.DagsterInstance.from_config(home) as instance:
            runner = AssetRunner(instance, {"storage": storage, "workers": workers})
            manifest = runner.stage_table(
                "bench", {**options, "source": url_list, "output_folder": str(output)}
            )
            outcome = runner.build_shards(shard_keys(manifest), max_per_run=shards_per_run())
            if outcome.failed:
                raise SystemExit(f"failed shards: {outcome.failed}")


if __name__ == "__main__":
    tool, raw = sys.argv[1], sys.argv[2]
    {"download": run_download, "dagster": run_dagster_assets}[tool](json.loads(raw))
