"""The code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here.

Storage paths can be moved without editing code: IMG2DS_INBOX, IMG2DS_STAGING and IMG2DS_DATASETS
(fsspec URLs, s3:// included; relative paths are relative to the project folder). IMG2DS_S3_INBOX
(``s3://bucket/prefix/``) adds ``s3_url_drop_sensor`` on that prefix. IMG2DS_DISTRIBUTOR ("ray",
"pyspark") and IMG2DS_CLUSTER send each run's shards to a cluster; IMG2DS_SHARDS_PER_RUN sizes runs.
S3 credentials and endpoint come from the standard AWS variables (see the README, "S3 and other
storage").
"""

import os
from typing import Any

import dagster as dg

from .defs.export import bucketed_dataset, bucketed_dataset_sensor, export_buckets
from .defs.jobs import build_shards, stage_table
from .defs.resources import S3InboxResource, StorageResource, WorkersResource, s3_resource
from .defs.sensors import new_shards_sensor, s3_url_drop_sensor, url_drop_sensor
from .defs.shards import shards
from .defs.stats import download_stats, download_stats_sensor, refresh_stats
from .defs.url_tables import url_tables
from .engine.runtime import prepare_process

prepare_process()  # this module is the code location's entry point, in every Dagster process
S3_INBOX = os.environ.get("IMG2DS_S3_INBOX")
# Checked by the resource (a bad distributor name stops the code location from loading, named).
CLUSTER: dict[str, Any] = {
    "distributor": os.environ.get("IMG2DS_DISTRIBUTOR") or "multiprocessing",
    "cluster": os.environ.get("IMG2DS_CLUSTER") or None,
}

defs = dg.Definitions(
    assets=[url_tables, shards, download_stats, bucketed_dataset],
    # What the launchpad offers and the sensors launch, instead of Dagster's unnamed asset job.
    jobs=[stage_table, build_shards, refresh_stats, export_buckets],
    sensors=[
        url_drop_sensor,
        new_shards_sensor,
        download_stats_sensor,
        bucketed_dataset_sensor,
        # Only where an S3 inbox is configured: elsewhere it could only fail or skip on every tick.
        *([s3_url_drop_sensor] if S3_INBOX else []),
    ],
    resources={
        "storage": StorageResource(
            inbox=os.environ.get("IMG2DS_INBOX", "data/inbox"),
            staging=os.environ.get("IMG2DS_STAGING", "data/staging"),
            datasets=os.environ.get("IMG2DS_DATASETS", "data/datasets"),
        ),
        # Where a run builds its shards: in its own process, or on a Ray or Spark cluster
        # (deploy/README.md, "A run's shards on a cluster").
        "workers": WorkersResource(**CLUSTER),
        "s3": s3_resource(),
        **({"s3_inbox": S3InboxResource(url=S3_INBOX)} if S3_INBOX else {}),
    },
    # One process per run: a shard run parallelises inside (threads, and processes for several
    # shards); a process per step would only add start-up time.
    executor=dg.in_process_executor,
)
