"""The code location: ``dagster dev -w workspace.yaml`` loads ``defs`` from here.

Storage paths can be moved without editing code: IMG2DS_INBOX, IMG2DS_STAGING and IMG2DS_DATASETS
(fsspec URLs; relative paths are relative to the project folder).
"""

import os

import dagster as dg

from .defs.resources import StorageResource, WorkersResource
from .defs.sensors import new_shards_sensor, url_drop_sensor
from .defs.shards import shards
from .defs.stats import download_stats, download_stats_sensor
from .defs.url_tables import url_tables

defs = dg.Definitions(
    assets=[url_tables, shards, download_stats],
    sensors=[url_drop_sensor, new_shards_sensor, download_stats_sensor],
    resources={
        "storage": StorageResource(
            inbox=os.environ.get("IMG2DS_INBOX", "data/inbox"),
            staging=os.environ.get("IMG2DS_STAGING", "data/staging"),
            datasets=os.environ.get("IMG2DS_DATASETS", "data/datasets"),
        ),
        "workers": WorkersResource(),
    },
    # One process per run: a shard run parallelises inside (threads, and processes for several
    # shards); a process per step would only add start-up time.
    executor=dg.in_process_executor,
)
